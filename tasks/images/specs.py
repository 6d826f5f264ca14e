"""The images we build: what goes into each (its files, build args and bases) and its content-hash tag."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.images import engine
from tasks.images.bases import BaseResolver, dockerfile_bases, known_args, resolve_args
from tasks.settings import Settings

CONTAINERS = "containers"
COMMON = "common"
_IGNORED = {"__pycache__", ".pytest_cache", ".ruff_cache"}


@dataclass(frozen=True)
class ImageSpec:
    """One image we build: the folders under containers/ that go into it, its Dockerfile, and the
    settings that override its build args."""

    name: str
    #: (build arg, the setting that overrides it; an empty setting keeps the Dockerfile's default)
    args: tuple[tuple[str, str], ...]
    #: folders under containers/ (default: its own and the programs' shared code, common/)
    folders: tuple[str, ...] = ()
    #: the Dockerfile, under containers/ (default: <name>/Dockerfile)
    dockerfile_path: str = ""
    #: whether the `build_args` setting applies (our programs' images)
    extra_args: bool = True
    #: a Dockerfile target whose one file, a JSON report, goes into the image's record
    report: str = ""
    #: how its image tasks make it: "buildx" (its Dockerfile), or "kernel-source" (tasks.kernel.source)
    maker: str = "buildx"

    def dirs(self, root: Path) -> tuple[Path, ...]:
        """What goes into the image: its folders (by default its own and the shared code)."""
        return tuple(root / CONTAINERS / f for f in (self.folders or (self.name, COMMON)))

    def dockerfile(self, root: Path) -> Path:
        return root / CONTAINERS / (self.dockerfile_path or f"{self.name}/Dockerfile")


IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec("hook-bootkit", (("BASE_IMAGE", "bootkit_base"), ("BUILD_IMAGE", "build_image"))),
    ImageSpec("hook-docker", (("BASE_IMAGE", "docker_base"), ("BUILD_IMAGE", "build_image"))),
    # Debian's udev and acpid, unpacked for the target arch in a Debian build stage (no emulation)
    ImageSpec("hook-events", (("BUILD_IMAGE", "debian_builder"),), folders=("hook-events",), extra_args=False),
)
#: The kernel image per flavour (setting kernel_flavour), when the setting `kernel` names none of the user's.
KERNELS: dict[str, ImageSpec] = {
    "debian": ImageSpec("hook-kernel", (("BUILD_IMAGE", "debian_builder"), ("KERNEL_SUITE", "kernel_suite"),
                                        ("KERNEL_VERSION", "kernel_version")),
                        folders=("hook-kernel/debian", "hook-kernel/common"),
                        dockerfile_path="hook-kernel/debian/Dockerfile", extra_args=False, report="report"),
    # the Dockerfile is the builder's (its base is the kernel's too); KERNEL_SRC* and KERNEL_CONFIG are
    # not build args of it: they are what the image is made from (tasks.kernel.source)
    "source": ImageSpec("hook-kernel", (("BASE_IMAGE", "debian_builder"), ("KERNEL_SUITE", "kernel_suite"),
                                        ("KERNEL_SRC", "kernel_src"), ("KERNEL_SRC_SHA256", "kernel_src_sha256"),
                                        ("KERNEL_CONFIG", "kernel_config")),
                        folders=("hook-kernel/source", "hook-kernel/common"),
                        dockerfile_path="hook-kernel/source/Dockerfile", extra_args=False, maker="kernel-source"),
}
KERNEL = "hook-kernel"


def os_images(settings: Settings) -> tuple[ImageSpec, ...]:
    """The images the OS is made of: our programs, and our kernel unless `kernel` names another."""
    return IMAGES + (() if settings.kernel else (KERNELS[settings.kernel_flavour],))


def context_files(spec: ImageSpec, root: Path) -> list[Path]:
    """Every file that goes into the image's build, sorted: the task's file_dep and the hash input."""
    files: list[Path] = []
    for top in spec.dirs(root):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED)
            files.extend(Path(dirpath, f) for f in sorted(filenames) if not f.endswith(".pyc"))
    if not spec.dockerfile(root).is_file():
        raise HookError(f"{spec.dockerfile(root)} is missing: restore it from git (git checkout -- containers)")
    return files


def build_args(spec: ImageSpec, settings: Settings, arch: Arch) -> dict[str, str]:
    """The build args for one arch: only what the settings override; '{arch}' becomes amd64/arm64."""
    given = {arg: getattr(settings, setting) for arg, setting in spec.args}
    extra = settings.build_args if spec.extra_args else {}
    args = {**{k: v for k, v in given.items() if v}, **extra}  # build_args may set KEY= (empty)
    return {k: v.replace("{arch}", arch.docker) for k, v in args.items()}


def content_hash(spec: ImageSpec, root: Path, files: Iterable[Path], inputs: dict[str, Any]) -> str:
    """A tag that changes when anything that goes into the image changes: its files (path, exec bit,
    bytes), its build args and the identity of its base images (tasks.bases)."""
    digest = hashlib.sha256()
    base = root / CONTAINERS
    for path in files:
        rel = path.relative_to(base).as_posix()
        mode = "x" if os.access(path, os.X_OK) else "-"
        digest.update(f"{rel}\0{mode}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(inputs, sort_keys=True).encode())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Resolved:
    """One image for one arch as it would be built now: its build args (registry bases pinned to a
    digest) and the identity of each base (tasks.bases)."""

    args: dict[str, str]
    bases: dict[str, str]

    def tag(self, spec: ImageSpec, root: Path, files: Iterable[Path]) -> str:
        return content_hash(spec, root, files, {"args": self.args, "bases": self.bases})


def resolve(spec: ImageSpec, settings: Settings, arch: Arch, resolver: BaseResolver) -> Resolved:
    bases = dockerfile_bases(spec.dockerfile(settings.root).read_text())
    args, identities = resolve_args(build_args(spec, settings, arch), bases, resolver)
    return Resolved(args, identities)


def known(spec: ImageSpec, settings: Settings, arch: Arch, resolver: BaseResolver) -> Resolved | None:
    """What `resolve` would give, from what is known without the network (pinned, recorded, or in
    the local engine); None when a base would need a registry lookup."""
    bases = dockerfile_bases(spec.dockerfile(settings.root).read_text())
    found = known_args(build_args(spec, settings, arch), bases, resolver)
    return Resolved(*found) if found else None


def is_current(spec: ImageSpec, settings: Settings, arch: Arch, record: Path, resolver: BaseResolver) -> bool:
    """doit's up-to-date check of an image task (its files are doit's file_dep): the record exists,
    names this org, and was made from the same build args and base identities as now."""
    data = read_record(record)
    if data is None or not str(data.get("ref", "")).startswith(f"{settings.org}/{spec.name}:"):
        return False
    if data.get("local") and engine.image_id(data["ref"]) != data.get("id"):
        return False  # removed from the engine (or re-tagged) since
    now = known(spec, settings, arch, resolver)
    return now is not None and data.get("args") == now.args and data.get("bases") == now.bases


def image_ref(settings: Settings, spec: ImageSpec, tag: str, arch: Arch | None = None) -> str:
    """<org>/<image>:<hash> for the index, <org>/<image>:<hash>-<arch> for one arch."""
    suffix = f"-{arch.docker}" if arch else ""
    return f"{settings.org}/{spec.name}:{tag}{suffix}"


def read_record(path: Path) -> dict[str, Any] | None:
    """An image task's record (what was built or pushed), or None when there is none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def index_tag(arch_tags: dict[str, str]) -> str:
    """The multi-arch index's tag: a hash of its per-arch tags (each a content hash of its own)."""
    return hashlib.sha256(json.dumps(arch_tags, sort_keys=True).encode()).hexdigest()[:24]


def platforms_of(manifest: Any) -> set[str]:
    """os/arch platforms an index lists (ignoring attestation entries marked unknown)."""
    found = set()
    for entry in manifest.manifests or []:
        plat = entry.platform
        if plat and plat.os and plat.architecture and plat.architecture != "unknown":
            found.add(f"{plat.os}/{plat.architecture}")
    return found
