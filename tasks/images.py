"""The hook images: content-hash tags, per-arch builds with buildx (load or push), multi-arch indexes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import engine
from tasks.arch import Arch
from tasks.bases import BaseResolver, dockerfile_bases, known_args, resolve_args
from tasks.config import Settings
from tasks.errors import HookError
from tasks.files import atomic_write_text
from tasks.linuxkit import registry_of
from tasks.run import log_step, timed

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


# --- docker through python-on-whales ------------------------------------------------------------


@functools.cache
def _docker() -> Any:
    """The docker client, checked once per process: the daemon answers and buildx is there."""
    from python_on_whales import DockerClient
    from python_on_whales.exceptions import DockerException

    client = DockerClient()
    with timed("docker version"):
        try:
            client.version()
        except DockerException as exc:
            raise HookError(
                f"docker daemon not reachable ({_last_line(exc)}): start dockerd, check DOCKER_HOST"
            ) from None
        except FileNotFoundError:
            raise HookError("docker not found: install Docker (Debian: apt-get install docker.io)") from None
        try:
            client.buildx.version()
        except DockerException:
            raise HookError("docker buildx not installed: install it (Debian trixie: docker-buildx)") from None
    return client


def _client(settings: Settings) -> Any:
    """The checked docker client; a named buildx builder must exist (said before any build fails on it)."""
    if settings.builder:
        _check_builder(settings.builder)
    return _docker()


@functools.cache
def _check_builder(name: str) -> None:
    from python_on_whales.exceptions import DockerException

    try:
        _docker().buildx.inspect(name)
    except DockerException:
        raise HookError(
            f"buildx builder {name!r} not found: `docker buildx ls` lists them, `docker buildx create --name {name}` "
            "makes one; or leave builder= empty for the current one"
        ) from None


def _last_line(exc: Exception) -> str:
    text = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines()
    lines = [line.strip() for line in text if line.strip() and not line.startswith(("#", "---"))]
    return lines[-1] if lines else type(exc).__name__


def _docker_fix(message: str, registry: str) -> str:
    lowered = message.lower()
    if any(s in lowered for s in ("unauthorized", "no basic auth", "authentication required", "denied")):
        return f"docker login {registry} (the registry refused our credentials)"
    if "connection refused" in lowered or "no such host" in lowered:
        return f"check that the registry {registry} is up and reachable"
    if "pull access denied" in lowered or "not found" in lowered:
        return "check the base image settings (bootkit_base, docker_base, build_image) exist locally or remotely"
    return "see the build output above"


def _stream(lines: Iterator[str]) -> None:
    for line in lines:
        print(f"  {line.rstrip()}", flush=True)


def _buildx(spec: ImageSpec, settings: Settings, arch: Arch, ref: str, args: dict[str, str], *, push: bool) -> None:
    from python_on_whales.exceptions import DockerException

    client = _client(settings)
    secrets = [f"id=ca,src={settings.build_ca}"] if settings.build_ca else []
    log_step(f"building {ref} for {arch.docker_platform} ({'push' if push else 'load'})")
    with timed("docker buildx build"):
        try:
            _stream(
                client.buildx.build(
                    settings.root / CONTAINERS,
                    file=spec.dockerfile(settings.root),
                    platforms=[arch.docker_platform],
                    tags=[ref],
                    build_args=args,
                    builder=settings.builder,
                    load=not push,
                    push=push,
                    secrets=secrets,
                    progress="plain",
                    stream_logs=True,
                )
            )
        except DockerException as exc:
            msg = _last_line(exc)
            fix = _docker_fix(msg, registry_of(ref))
            raise HookError(
                f"docker buildx build of {ref} failed (exit {exc.return_code}): {msg}; try: {fix}"
            ) from None


def _remote_manifest(ref: str) -> Any | None:
    """The manifest (or index) of ref in its registry, or None when it cannot be had."""
    from python_on_whales.exceptions import DockerException

    try:
        return _docker().buildx.imagetools.inspect(ref)
    except DockerException:
        return None


def _record(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_record(path: Path) -> dict[str, Any] | None:
    """An image task's record (what was built or pushed), or None when there is none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _resolved(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path],
              resolver: BaseResolver) -> tuple[Resolved, str]:
    resolved = resolve(spec, settings, arch, resolver)
    resolver.save()
    return resolved, resolved.tag(spec, settings.root, files)


def load_image(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path], record: Path,
               resolver: BaseResolver) -> None:
    """Build one arch into the local engine (unless that tag is there already) and record it."""
    client = _client(settings)
    resolved, tag = _resolved(spec, settings, arch, files, resolver)
    ref = image_ref(settings, spec, tag, arch)
    with timed("docker image inspect"):
        exists = client.image.exists(ref)
    if exists:
        log_step(f"{ref} is in the local engine already: not rebuilt")
    else:
        _buildx(spec, settings, arch, ref, resolved.args, push=False)
    with timed("docker image inspect"):
        image = client.image.inspect(ref)
    if image.architecture != arch.docker:
        raise HookError(
            f"{ref} is {image.architecture}, not {arch.docker}: remove it (docker rmi {ref}) and build again"
        )
    _record(record, {"ref": ref, "tag": tag, "id": image.id, "arch": arch.value, "platform": arch.docker_platform,
                     "local": True, "bases": resolved.bases, "args": resolved.args})


def push_image(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path], record: Path,
               resolver: BaseResolver) -> None:
    """Build and push one arch (unless the registry has that tag already) and record what is there."""
    _client(settings)
    resolved, tag = _resolved(spec, settings, arch, files, resolver)
    ref = image_ref(settings, spec, tag, arch)
    if _remote_manifest(ref) is not None:
        log_step(f"{ref} is in the registry already: not rebuilt or pushed")
    else:
        _buildx(spec, settings, arch, ref, resolved.args, push=True)
    manifest = _remote_manifest(ref)
    if manifest is None or manifest.config is None:
        raise HookError(f"{ref} was pushed but the registry does not show it; try: docker login {registry_of(ref)}")
    _record(record, {"ref": ref, "tag": tag, "config": manifest.config.digest, "arch": arch.value,
                     "layers": [layer.digest for layer in manifest.layers or []],
                     "bases": resolved.bases, "args": resolved.args})


def index_tag(arch_tags: dict[str, str]) -> str:
    """The multi-arch index's tag: a hash of its per-arch tags (each a content hash of its own)."""
    return hashlib.sha256(json.dumps(arch_tags, sort_keys=True).encode()).hexdigest()[:24]


def create_index(spec: ImageSpec, settings: Settings, arch_records: dict[Arch, Path], record: Path) -> None:
    """Join the pushed per-arch images into the multi-arch index <org>/<image>:<hash>."""
    from python_on_whales.exceptions import DockerException

    client = _client(settings)
    sources, tags = [], {}
    for arch, path in arch_records.items():
        data = read_record(path)
        if data is None or "ref" not in data:
            raise HookError(f"{path} is missing: run `doit image_push:{spec.name}-{arch}` first")
        sources.append(data["ref"])
        tags[arch.docker] = data["tag"]
    ref = image_ref(settings, spec, index_tag(tags))
    want = {a.docker_platform for a in arch_records}
    existing = _remote_manifest(ref)
    if existing is not None and platforms_of(existing) == want:
        log_step(f"{ref} (index of {', '.join(sorted(want))}) is in the registry already")
    else:
        log_step(f"creating index {ref} from {', '.join(sources)}")
        try:
            client.buildx.imagetools.create(sources, tags=[ref], builder=settings.builder)
        except DockerException as exc:
            msg = _last_line(exc)
            fix = _docker_fix(msg, registry_of(ref))
            raise HookError(f"imagetools create {ref} failed: {msg}; try: {fix}") from None
        existing = _remote_manifest(ref)
    if existing is None or platforms_of(existing) != want:
        raise HookError(f"index {ref} does not list {', '.join(sorted(want))} after creating it; try again")
    _record(record, {"ref": ref, "platforms": sorted(want), "sources": sources,
                     "manifests": sorted(m.digest or "" for m in existing.manifests or [])})


def platforms_of(manifest: Any) -> set[str]:
    """os/arch platforms an index lists (ignoring attestation entries marked unknown)."""
    found = set()
    for entry in manifest.manifests or []:
        plat = entry.platform
        if plat and plat.os and plat.architecture and plat.architecture != "unknown":
            found.add(f"{plat.os}/{plat.architecture}")
    return found
