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
    """One image we build: its directory under containers/ and the setting that picks its base."""

    name: str
    base_setting: str

    def dirs(self, root: Path) -> tuple[Path, Path]:
        """What goes into the image: its own directory and the shared code."""
        return root / CONTAINERS / self.name, root / CONTAINERS / COMMON

    def dockerfile(self, root: Path) -> Path:
        return root / CONTAINERS / self.name / "Dockerfile"


IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec("hook-bootkit", "bootkit_base"),
    ImageSpec("hook-docker", "docker_base"),
)


def image_spec(name: str) -> ImageSpec:
    for spec in IMAGES:
        if spec.name == name:
            return spec
    raise HookError(f"unknown image {name!r}: one of {', '.join(s.name for s in IMAGES)}")


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
    bases = {"BASE_IMAGE": getattr(settings, spec.base_setting), "BUILD_IMAGE": settings.build_image}
    args = {**{k: v for k, v in bases.items() if v}, **settings.build_args}  # build_args may set KEY= (empty)
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
