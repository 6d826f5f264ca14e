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
from tasks.settings import Settings
from tasks.settings.builds import Build, linuxkit_dir


def render_values(settings: Settings, refs: dict[str, str], arch: Arch) -> dict[str, str]:
    """What the ${placeholders} of linuxkit/*.yaml stand for, for one arch."""
    return {
        "serial": arch.serial_console,
        "kernel": settings.kernel,
        "pkg_org": settings.pkg_org,
        "hook_docker": refs["hook-docker"],
        "hook_bootkit": refs["hook-bootkit"],
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
    values = render_values(settings, {"hook-docker": "", "hook-bootkit": ""}, arch)
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


def build_os(settings: Settings, build: Build, arch: Arch, refs: dict[str, str]) -> None:
    """Render the configs and run linuxkit build: LinuxKit's kernel and initrd of one build and arch."""
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
