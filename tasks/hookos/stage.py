"""The OS stage of one build and arch: render the LinuxKit configs and run `linuxkit build`.

Its inputs are the image references the image tasks recorded; its outputs are LinuxKit's kernel,
initrd and cmdline in out/linuxkit/<build>/<arch>/ (tasks.settings.builds), which the convert stage
(tasks.convert.stage) turns into what iPXE boots.
"""

from __future__ import annotations

import yaml

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text
from tasks.core.run import log_step
from tasks.hookos import build as linuxkit_build
from tasks.hookos import config, embed
from tasks.hookos.tool import linuxkit_for
from tasks.images import engine
from tasks.images.specs import KERNEL, read_record
from tasks.settings import Settings
from tasks.settings.builds import Build, image_record, linuxkit_dir


def render_values(settings: Settings, refs: dict[str, str], arch: Arch) -> dict[str, str]:
    """What the ${placeholders} of linuxkit/*.yaml stand for, for one arch: our kernel image
    (hook-kernel) unless the setting `kernel` names another."""
    return {
        "serial": arch.serial_console,
        "kernel": settings.kernel or refs.get(KERNEL, ""),
        "pkg_org": settings.pkg_org,
        "hook_docker": refs["hook-docker"],
        "hook_bootkit": refs["hook-bootkit"],
        "hook_events": refs["hook-events"],
    }


def render_configs(settings: Settings, build: Build, arch: Arch, refs: dict[str, str]) -> list:
    """Render and validate the build's configs into out/linuxkit/<build>/<arch>/."""
    folder = linuxkit_dir(settings, build, arch)
    values = render_values(settings, refs, arch)
    rendered = []
    for name in build.templates:
        template = settings.root / "linuxkit" / name
        if not template.is_file():
            raise HookError(f"{template} is missing: restore it from git")
        text = config.render(template, values)
        config.parse(text, str(template.relative_to(settings.root)))
        target = folder / name
        atomic_write_text(target, text)
        rendered.append(target)
    if build.flavour == "debug":
        atomic_write_text(folder / "authorized_keys", config.ssh_public_keys(settings.ssh_keys), mode=0o600)
    return rendered


def package_refs(settings: Settings, build: Build, arch: Arch) -> list[str]:
    """The LinuxKit images (kernel, init, services) a build's configs name, other than ours."""
    values = render_values(settings, {"hook-docker": "", "hook-bootkit": "", "hook-events": ""}, arch)
    refs: list[str] = []
    for name in build.templates:
        template = settings.root / "linuxkit" / name
        try:
            loaded = yaml.load(config.render(template, values), Loader=config.Yaml12Loader)  # noqa: S506
        except (OSError, HookError, yaml.YAMLError):
            continue  # the linuxkit task itself says what is wrong with it
        if isinstance(loaded, dict):
            refs += [r for r in config.images_of(loaded) if isinstance(r, str) and r]
    return sorted(set(refs))


def os_inputs(settings: Settings, build: Build, arch: Arch) -> dict[str, object]:
    """What, besides its files, the OS of one build and arch is made from (doit's config_changed).

    For a local build this includes the id of each LinuxKit package in the local engine: a package
    image re-made under the same tag re-makes the OS.
    """
    inputs: dict[str, object] = {"kernel": settings.kernel, "pkg_org": settings.pkg_org,
                                 "linuxkit": [settings.linuxkit, settings.linuxkit_src, settings.linuxkit_sha256],
                                 "compression": settings.compression}
    if build.flavour == "debug":
        inputs["ssh_keys"] = list(settings.ssh_keys)
    if build.local:
        inputs["packages"] = {ref: engine.image_id(ref) for ref in package_refs(settings, build, arch)}
    return inputs


def kernel_report(settings: Settings, build: Build, arch: Arch) -> dict | None:
    """What our kernel image holds (its record's report: version, modules, firmware), or None for
    a kernel of the user's (setting `kernel`)."""
    if settings.kernel:
        return None
    data = read_record(image_record(settings, KERNEL, arch, local=build.local)) or {}
    return data.get("report") if isinstance(data.get("report"), dict) else None


def kernel_lines(settings: Settings, build: Build, arch: Arch) -> list[str]:
    """The kernel section of the build's size report."""
    report = kernel_report(settings, build, arch)
    if report is None:
        return [f"size report: kernel {settings.kernel} (the setting kernel: not ours, not inspected)"]
    mb = 1e6
    firmware = report.get("firmware", {})
    unsigned = ("not signed (the ISOs sign their copy: iso_sign_key)" if settings.iso_sign
                else "not signed: it will not boot with Secure Boot on")
    lines = [
        f"size report: kernel {report['version']} ({report.get('flavour', '?')}, {report.get('package') or 'built'}; "
        f"config sha256 {report['config_sha256'][:16]}): {report['kernel_bytes'] / mb:.1f} MB, "
        f"{'EFI stub' if report.get('efi_stub') else 'no EFI stub'}, "
        f"{'signed (Secure Boot)' if report.get('signed') else unsigned}",
        f"size report: kernel modules: {report['modules']} ({report['modules_bytes'] / mb:.1f} MB), "
        f"{report.get('builtin', 0)} drivers built in",
        f"size report: kernel firmware: {len(firmware)} files ({report['firmware_bytes'] / mb:.1f} MB) from "
        f"{', '.join(report.get('firmware_packages', [])) or 'no packages'}; "
        f"{len(report.get('firmware_missing', []))} named by modules but in none of them",
    ]
    largest = sorted(firmware.items(), key=lambda item: -item[1])[:5]
    if largest:
        lines.append("size report: kernel firmware, largest: " +
                     ", ".join(f"{name} {size / mb:.1f} MB" for name, size in largest))
    return lines


def _check_kernel(settings: Settings, build: Build, arch: Arch) -> None:
    """Refuse, before linuxkit runs, an OS whose initramfs our kernel could not read."""
    report = kernel_report(settings, build, arch)
    if report and settings.compression == "zstd" and report.get("config", {}).get("RD_ZSTD") != "y":
        raise HookError(f"compression=zstd, but kernel {report['version']} cannot read a zstd initramfs "
                        "(CONFIG_RD_ZSTD is not y): set compression=gzip")


def build_os(settings: Settings, build: Build, arch: Arch, refs: dict[str, str]) -> None:
    """Render the configs and run linuxkit build: LinuxKit's kernel and initrd of one build and arch."""
    _check_kernel(settings, build, arch)
    folder = linuxkit_dir(settings, build, arch)
    configs = render_configs(settings, build, arch, refs)
    log_step(f"linuxkit build {build.name} {arch} ({'local images' if build.local else 'registry images'})")
    images = [ref for path in configs for ref in config.images_of(
        yaml.load(path.read_text(), Loader=config.Yaml12Loader))]  # noqa: S506 - a SafeLoader
    linuxkit_build.build(
        linuxkit=linuxkit_for(settings),
        configs=configs + embed.extra_configs(folder),  # embed_images: their archives' files
        arch=arch,
        name=build.prefix,
        outdir=folder,
        local_images=build.local,
        mirrors=() if build.local else linuxkit_build.mirrors_for(images),
    )
