"""The three builds (release, dev, debug) and where each one's outputs go under out/.

Every stage finds its inputs and writes its outputs through these paths, so the layout of out/ is
in one place (README "Outputs").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.arch import Arch
from tasks.core.errors import HookError

if TYPE_CHECKING:
    from tasks.settings import Settings

#: The repository of a build's files as OCI images (tasks.deploy.oci): <org>/hook-artifacts:<version>[-<arch>].
ARTIFACTS = "hook-artifacts"
#: What `linuxkit build --format kernel+initrd` writes, as <name>-<kind>.
LINUXKIT_OUTPUTS = ("kernel", "initrd.img", "cmdline")


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

    @property
    def task(self) -> str:
        """The doit task a user runs for this build."""
        return {"release": "dist", "dev": "dev_dist", "debug": "debug_image"}[self.name]

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


def linuxkit_dir(settings: Settings, build: Build, arch: Arch) -> Path:
    return settings.out / "linuxkit" / build.name / arch.value


def linuxkit_outputs(settings: Settings, build: Build, arch: Arch) -> dict[str, Path]:
    folder = linuxkit_dir(settings, build, arch)
    return {kind: folder / f"{build.prefix}-{kind}" for kind in LINUXKIT_OUTPUTS}


def rendered_files(settings: Settings, build: Build, arch: Arch) -> list[Path]:
    """What the OS stage renders: the configs, and for debug the authorized_keys they point at."""
    folder = linuxkit_dir(settings, build, arch)
    extra = ["authorized_keys"] if build.flavour == "debug" else []
    return [folder / name for name in (*build.templates, *extra)]


def boot_files(settings: Settings, build: Build, arch: Arch) -> tuple[Path, Path]:
    """(vmlinuz-<arch>, initramfs-<arch>): what iPXE boots, after convert."""
    folder = settings.out / build.name / arch.value
    return folder / f"vmlinuz-{arch}", folder / f"initramfs-{arch}"


def dist_dir(settings: Settings, build: Build) -> Path:
    return settings.out / "dist" / build.name


def netboot_sb_tarball(settings: Settings, build: Build, arch: Arch) -> Path:
    """`doit netboot_sb`'s output (tasks.media.netboot_sb), which `doit boot --secure-boot` boots."""
    return dist_dir(settings, build) / f"{build.prefix}-netboot-sb_{arch}.tar.gz"


def package_targets(settings: Settings, build: Build) -> list[Path]:
    folder = dist_dir(settings, build)
    return [
        *(folder / f"{build.prefix}_{arch}.tar.gz" for arch in build.arches(settings)),
        folder / f"{build.prefix}-{settings.version}.tar.gz",
        folder / "checksum.txt",
    ]


def image_record(settings: Settings, name: str, arch: Arch | None, *, local: bool) -> Path:
    """What an image task built (local) or pushed (registry); arch None: the multi-arch index."""
    kind = "local" if local else "registry"
    suffix = f"-{arch}" if arch else ""
    return settings.out / "images" / kind / f"{name}{suffix}.json"


def artifacts_record(settings: Settings) -> Path:
    """What `doit artifacts` pushed: each artefact image's reference and digest."""
    return image_record(settings, ARTIFACTS, None, local=False)


def bases_record(settings: Settings) -> Path:
    """Registry base images resolved to a digest (tasks.images.bases), shared by every build of this checkout."""
    return settings.out / "images" / "bases.json"
