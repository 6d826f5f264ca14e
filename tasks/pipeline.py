"""The builds and their stages, as plain functions with explicit inputs and outputs (dodo.py wires them)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks import images, linuxkit
from tasks.arch import Arch
from tasks.config import Settings
from tasks.errors import HookError
from tasks.files import atomic_write_text, atomic_writer, remove
from tasks.package import package
from tasks.run import log_step


@dataclass(frozen=True)
class Build:
    """One kind of build: which OS flavour, and whether its images come from the local engine."""

    name: str
    flavour: str
    local: bool

    @property
    def prefix(self) -> str:
        """Output name: hook for the release flavour, hook-debug for debug."""
        return "hook" if self.flavour == "release" else "hook-debug"

    @property
    def templates(self) -> tuple[str, ...]:
        return ("hook.yaml", "debug.yaml") if self.flavour == "debug" else ("hook.yaml",)

    def arches(self, settings: Settings) -> tuple[Arch, ...]:
        """dist builds every arch; the local builds this machine's, unless `arches` says otherwise."""
        return settings.arches_for((Arch.native(),) if self.local else tuple(Arch))


BUILDS: dict[str, Build] = {
    "release": Build("release", "release", local=False),
    "dev": Build("dev", "release", local=True),
    "debug": Build("debug", "debug", local=True),
}


def get_build(name: str) -> Build:
    try:
        return BUILDS[name]
    except KeyError:
        raise HookError(f"unknown build {name!r}: one of {', '.join(BUILDS)}") from None


# --- where things go -----------------------------------------------------------------------------


def linuxkit_dir(settings: Settings, build: Build, arch: Arch) -> Path:
    return settings.out / "linuxkit" / build.name / arch.value


def linuxkit_outputs(settings: Settings, build: Build, arch: Arch) -> dict[str, Path]:
    folder = linuxkit_dir(settings, build, arch)
    return {kind: folder / f"{build.prefix}-{kind}" for kind in linuxkit.OUTPUTS}


def rendered_files(settings: Settings, build: Build, arch: Arch) -> list[Path]:
    """What render_configs writes: the configs, and for debug the authorized_keys they point at."""
    folder = linuxkit_dir(settings, build, arch)
    extra = ["authorized_keys"] if build.flavour == "debug" else []
    return [folder / name for name in (*build.templates, *extra)]


def boot_files(settings: Settings, build: Build, arch: Arch) -> tuple[Path, Path]:
    """(vmlinuz-<arch>, initramfs-<arch>): what iPXE boots, after convert."""
    folder = settings.out / build.name / arch.value
    return folder / f"vmlinuz-{arch}", folder / f"initramfs-{arch}"


def dist_dir(settings: Settings, build: Build) -> Path:
    return settings.out / "dist" / build.name


def package_targets(settings: Settings, build: Build) -> list[Path]:
    folder = dist_dir(settings, build)
    return [
        *(folder / f"{build.prefix}_{arch}.tar.gz" for arch in build.arches(settings)),
        folder / f"{build.prefix}-{settings.version}.tar.gz",
        folder / "checksum.txt",
    ]


def image_record(settings: Settings, spec: images.ImageSpec, arch: Arch | None, *, local: bool) -> Path:
    kind = "local" if local else "registry"
    suffix = f"-{arch}" if arch else ""
    return settings.out / "images" / kind / f"{spec.name}{suffix}.json"


# --- images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlan:
    """What one image is made of now: its files (file_dep) and its content-hash tag."""

    spec: images.ImageSpec
    files: tuple[Path, ...]
    tag: str


def plan_images(settings: Settings) -> dict[str, ImagePlan]:
    plans = {}
    for spec in images.IMAGES:
        files = images.context_files(spec, settings.root)
        args = {arch.docker: images.build_args(spec, settings, arch) for arch in Arch}
        tag = images.content_hash(spec, settings.root, files, args)
        plans[spec.name] = ImagePlan(spec, tuple(files), tag)
    return plans


def image_refs(settings: Settings, plans: dict[str, ImagePlan], build: Build, arch: Arch) -> dict[str, str]:
    """The references a build's config uses: per-arch local tags, or the pushed multi-arch index."""
    return {
        name: images.image_ref(settings, plan.spec, plan.tag, arch if build.local else None)
        for name, plan in plans.items()
    }


def image_inputs(settings: Settings, plans: dict[str, ImagePlan], build: Build, arch: Arch) -> list[Path]:
    """The image records a build's linuxkit step depends on."""
    return [
        image_record(settings, plan.spec, arch if build.local else None, local=build.local)
        for plan in plans.values()
    ]


# --- the OS: render, linuxkit build, convert ------------------------------------------------------


def render_values(settings: Settings, refs: dict[str, str], arch: Arch) -> dict[str, str]:
    return {
        "serial": arch.serial_console,
        "kernel": settings.kernel,
        "pkg_org": settings.pkg_org,
        "hook_docker": refs["hook-docker"],
        "hook_bootkit": refs["hook-bootkit"],
    }


def render_configs(settings: Settings, build: Build, arch: Arch, refs: dict[str, str]) -> list[Path]:
    """Render and validate the build's configs into out/linuxkit/<build>/<arch>/."""
    folder = linuxkit_dir(settings, build, arch)
    values = render_values(settings, refs, arch)
    rendered = []
    for name in build.templates:
        template = settings.root / "linuxkit" / name
        if not template.is_file():
            raise HookError(f"{template} is missing: restore it from git")
        text = linuxkit.render(template, values)
        linuxkit.parse(text, str(template.relative_to(settings.root)))
        target = folder / name
        atomic_write_text(target, text)
        rendered.append(target)
    if build.flavour == "debug":
        atomic_write_text(folder / "authorized_keys", linuxkit.ssh_public_keys(settings.ssh_keys), mode=0o600)
    return rendered


def make_os(settings: Settings, build: Build, arch: Arch, plans: dict[str, ImagePlan]) -> None:
    """Render the configs, run linuxkit build, then convert its initrd: the whole OS of one arch."""
    configs = render_configs(settings, build, arch, image_refs(settings, plans, build, arch))
    log_step(f"linuxkit build {build.name} {arch} ({'local images' if build.local else 'registry images'})")
    linuxkit.build(
        linuxkit=settings.linuxkit,
        configs=configs,
        arch=arch,
        name=build.prefix,
        outdir=linuxkit_dir(settings, build, arch),
        local_images=build.local,
    )
    convert(settings, build, arch)


def convert(settings: Settings, build: Build, arch: Arch) -> None:
    """Re-pack linuxkit's initrd into initramfs-<arch> and copy its kernel to vmlinuz-<arch>."""
    from tasks import initramfs

    made = linuxkit_outputs(settings, build, arch)
    for kind in ("kernel", "initrd.img"):
        if not made[kind].is_file():
            hint = f"run `doit {_task_for(build)}` first (convert never runs linuxkit)"
            raise HookError(f"{made[kind]} is missing: {hint}")
    kernel, initrd = boot_files(settings, build, arch)
    with made["kernel"].open("rb") as src, atomic_writer(kernel) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    initramfs.repack(made["initrd.img"], initrd, compression=settings.compression)  # logs its own summary


def clean_converted(settings: Settings, build: Build, arch: Arch) -> None:
    """What `doit clean` removes beyond the targets: the convert engine's record beside the initramfs."""
    from tasks import initramfs

    remove(initramfs.check_path(boot_files(settings, build, arch)[1]))


def convert_is_current(settings: Settings, build: Build, arch: Arch) -> bool:
    """doit's up-to-date check for `convert`: outputs exist, are newer than linuxkit's, and pass the cheap verify.

    A build that linuxkit never made is up to date: there is nothing to convert.
    """
    from tasks import initramfs

    made = linuxkit_outputs(settings, build, arch)
    if not (made["kernel"].exists() and made["initrd.img"].exists()):
        return True  # never built: nothing to convert (`doit convert` never runs linuxkit)
    kernel, initrd = boot_files(settings, build, arch)
    try:
        newest_input = max(os.stat(made["kernel"]).st_mtime_ns, os.stat(made["initrd.img"]).st_mtime_ns)
        oldest_output = min(os.stat(kernel).st_mtime_ns, os.stat(initrd).st_mtime_ns)
    except FileNotFoundError:
        return False
    return oldest_output >= newest_input and initramfs.quick_check(initrd)


def _task_for(build: Build) -> str:
    return {"release": "dist", "dev": "dev_dist", "debug": "debug_image"}[build.name]


def package_build(settings: Settings, build: Build) -> None:
    per_arch = {arch.value: list(boot_files(settings, build, arch)) for arch in build.arches(settings)}
    made = package(
        dist=dist_dir(settings, build),
        prefix=build.prefix,
        version=settings.version,
        per_arch=per_arch,
        mtime=settings.source_date_epoch,
    )
    log_step("packaged: " + ", ".join(str(p.relative_to(settings.root)) for p in made))


def boot_build(settings: Settings, build: Build, arch: Arch, *, cmdline: str, memory_mb: int, accel: str,
               expect: str, timeout: float) -> None:
    """Boot a build's converted kernel and initramfs under QEMU: on this terminal, or until `expect` shows."""
    import subprocess

    from tasks import qemu

    kernel, initrd = boot_files(settings, build, arch)
    if not expect:
        argv = qemu.interactive_argv(kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=accel)
        log_step("booting on this terminal (Ctrl-A X quits): " + " ".join(argv))
        subprocess.run(argv, check=False)
        return
    result = qemu.boot(kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=accel,
                       expect=expect, timeout=timeout, echo=True)
    log_step(f"saw {expect!r} on the console after {result.seconds:.1f}s")
