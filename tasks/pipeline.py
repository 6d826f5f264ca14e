"""The builds and their stages, as plain functions with explicit inputs and outputs (dodo.py wires them)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks import embed, engine, images, linuxkit
from tasks.arch import Arch
from tasks.bases import BaseResolver, base_ref, dockerfile_bases
from tasks.config import Settings
from tasks.errors import HookError
from tasks.files import atomic_write_text, atomic_writer, remove
from tasks.package import package
from tasks.run import log_step, timed


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
    """One image we build and the files that go into it (its tasks' file_dep)."""

    spec: images.ImageSpec
    files: tuple[Path, ...]


def plan_images(settings: Settings) -> dict[str, ImagePlan]:
    return {spec.name: ImagePlan(spec, tuple(images.context_files(spec, settings.root))) for spec in images.IMAGES}


def bases_record(settings: Settings) -> Path:
    """Registry base images resolved to a digest (tasks.bases), shared by every build of this checkout."""
    return settings.out / "images" / "bases.json"


def image_records(settings: Settings, plans: dict[str, ImagePlan], build: Build, arch: Arch) -> dict[str, Path]:
    """The image records a build's linuxkit step depends on: per-arch local images, or the pushed indexes."""
    return {name: image_record(settings, plan.spec, arch if build.local else None, local=build.local)
            for name, plan in plans.items()}


def image_refs(settings: Settings, plans: dict[str, ImagePlan], build: Build, arch: Arch) -> dict[str, str]:
    """The references a build's config uses, as the image tasks recorded them."""
    refs = {}
    for name, record in image_records(settings, plans, build, arch).items():
        data = images.read_record(record)
        if data is None or "ref" not in data:
            task = f"image_load:{name}-{arch}" if build.local else f"image_index:{name}"
            raise HookError(f"{record} is missing: run `doit {task}` first")
        refs[name] = data["ref"]
    return refs


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


def package_refs(settings: Settings, build: Build, arch: Arch) -> list[str]:
    """The LinuxKit images (kernel, init, services) a build's configs name, other than ours."""
    values = render_values(settings, {"hook-docker": "", "hook-bootkit": ""}, arch)
    refs: list[str] = []
    for name in build.templates:
        template = settings.root / "linuxkit" / name
        try:
            config = yaml.load(linuxkit.render(template, values), Loader=linuxkit.Yaml12Loader)  # noqa: S506
        except (OSError, HookError, yaml.YAMLError):
            continue  # the linuxkit task itself says what is wrong with it
        if isinstance(config, dict):
            refs += [r for r in linuxkit.images_of(config) if isinstance(r, str) and r]
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


def refresh_bases(settings: Settings, plans: dict[str, ImagePlan], resolver: BaseResolver) -> None:
    """`doit bases`: look up again, in their registries, the base images that are not local."""
    seen: set[str] = set()
    for plan in plans.values():
        for arch in Arch:
            bases = dockerfile_bases(plan.spec.dockerfile(settings.root).read_text())
            args = images.build_args(plan.spec, settings, arch)
            for name, default in bases.items():
                ref = base_ref(name, default, args)
                if not ref or ref in seen or "@sha256:" in ref or engine.image_id(ref):
                    continue
                seen.add(ref)
                old = resolver.recorded.get(ref)
                _, digest = resolver.resolve(ref, refresh=True)
                state = "unchanged" if old == digest else (f"was {old}" if old else "new")
                log_step(f"{ref} ({plan.spec.name}, {arch}): {digest} ({state})")
    resolver.save()
    if not seen:
        log_step("every base image is pinned or in the local engine: nothing to look up")


def linuxkit_tool(settings: Settings) -> str:
    """The LinuxKit v1.8.2 binary the settings ask for: given, on PATH, built from source or downloaded."""
    from tasks.tools import linuxkit_binary

    return linuxkit_binary(linuxkit=settings.linuxkit, url=settings.linuxkit_url, sha256=settings.linuxkit_sha256,
                           src=settings.linuxkit_src, cache=settings.cache_dir)


def make_os(settings: Settings, build: Build, arch: Arch, plans: dict[str, ImagePlan]) -> None:
    """Render the configs, run linuxkit build, then convert its initrd: the whole OS of one arch."""
    configs = render_configs(settings, build, arch, image_refs(settings, plans, build, arch))
    log_step(f"linuxkit build {build.name} {arch} ({'local images' if build.local else 'registry images'})")
    refs = [ref for config in configs for ref in linuxkit.images_of(
        yaml.load(config.read_text(), Loader=linuxkit.Yaml12Loader))]  # noqa: S506 - a SafeLoader
    embedded = embed.extra_configs(linuxkit_dir(settings, build, arch))  # embed_images: their archives' files
    linuxkit.build(
        linuxkit=linuxkit_tool(settings),
        configs=configs + embedded,
        arch=arch,
        name=build.prefix,
        outdir=linuxkit_dir(settings, build, arch),
        local_images=build.local,
        mirrors=() if build.local else linuxkit.mirrors_for(refs),
    )
    convert(settings, build, arch)
    for line in embed.size_report(linuxkit_dir(settings, build, arch), boot_files(settings, build, arch)[1]):
        log_step(line)


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
    with timed("hook convert"):  # ours, but bench/bench_incremental.py shows it apart
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
    with timed("hook package"):
        made = package(
            dist=dist_dir(settings, build),
            prefix=build.prefix,
            version=settings.version,
            per_arch=per_arch,
            mtime=settings.source_date_epoch,
        )
    log_step("packaged: " + ", ".join(str(p.relative_to(settings.root)) for p in made))


def boot_build(settings: Settings, build: Build, arch: Arch, *, cmdline: str, memory_mb: int, accel: str,
               expect: str, timeout: float, registry: str = "", ssh_port: int = 0, net: str = "user",
               smp: int = 2) -> None:
    """Boot a build's converted kernel and initramfs under QEMU: on this terminal, or until `expect` shows.

    The guest's network (net="user") is QEMU's user net with restrict=on: it reaches nothing but a
    registry on this machine given as `registry` (HOST:PORT, seen in the guest as 10.0.2.100:5000,
    which `{registry}` in the cmdline stands for) and is reached on `ssh_port` (127.0.0.1) for sshd.
    The serial port is made the last console= (/dev/console), so init's and the services' lines show.
    """
    from tasks import qemu

    if net not in ("user", "none"):
        raise HookError(f"unknown --net {net!r}: user (restricted, forwards only) or none")
    guest_registry = f"{qemu.GUEST_SERVICE_IP}:5000"
    if "{registry}" in cmdline and not registry:
        raise HookError("the cmdline names {registry}: give --registry HOST:PORT (a registry on this machine)")
    forwards: tuple[qemu.Forward, ...] = ()
    if registry:
        host, _, port = registry.rpartition(":")
        if not port.isdigit() or host not in ("127.0.0.1", "localhost", "[::1]"):
            raise HookError(f"--registry {registry!r}: the HOST:PORT of a registry on this machine (127.0.0.1:5000)")
        forwards = (qemu.Forward(5000, int(port)),)
        log_step(f"the guest reaches {registry} as {guest_registry}")
    nics = [qemu.Nic(forwards=forwards, hostfwd=((ssh_port, 22),) if ssh_port else ())] if net == "user" else []
    kernel, initrd = boot_files(settings, build, arch)
    cmdline = qemu.console_cmdline(cmdline.replace("{registry}", guest_registry), arch)
    guest = qemu.Guest(kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=accel, smp=smp,
                       nics=nics, extra=["-device", "virtio-rng-pci"], milestone_patterns=qemu.HOOK_MILESTONES)
    if not expect:
        log_step("the console is this terminal: Ctrl-A X quits QEMU, Ctrl-A C its monitor")
        qemu.interactive(guest)
        return
    with guest:
        guest.echo = True
        guest.wait_for(expect, timeout=timeout)
        log_step(f"saw {expect!r} on the console after {guest.elapsed:.1f}s; milestones: {guest.milestone_report()}")
