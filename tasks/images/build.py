"""The image tasks: build one arch into the local engine or push it, and join the pushed arches into an index."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text
from tasks.core.refs import registry_of
from tasks.core.run import log_step, timed
from tasks.images import docker
from tasks.images.bases import BaseResolver
from tasks.images.specs import ImageSpec, Resolved, image_ref, index_tag, platforms_of, read_record, resolve

if TYPE_CHECKING:
    from tasks.settings import Settings


def _record(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _resolved(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path],
              resolver: BaseResolver) -> tuple[Resolved, str]:
    resolved = resolve(spec, settings, arch, resolver)
    resolver.save()
    return resolved, resolved.tag(spec, settings.root, files)


def _report(spec: ImageSpec, settings: Settings, arch: Arch, args: dict[str, str], tag: str,
            record: Path) -> dict[str, Any]:
    """{"report": ...} for an image whose Dockerfile has a report target (the kernel): the JSON file
    that target holds, built from BuildKit's cache right after the image (or kept from the record
    of the same tag); {} for the others."""
    if not spec.report:
        return {}
    old = read_record(record)
    if old and old.get("tag") == tag and isinstance(old.get("report"), dict):
        return {"report": old["report"]}
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-report-", dir=record.parent) as folder:
        docker.buildx_build(spec, settings, arch, None, args, push=False, target=spec.report, output_dir=Path(folder))
        found = sorted(Path(folder).glob("*.json"))
        if len(found) != 1:
            raise HookError(f"the {spec.report} target of {spec.dockerfile(settings.root)} made {len(found)} JSON "
                            "files, not one: fix the Dockerfile")
        return {"report": json.loads(found[0].read_text())}


def load_image(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path], record: Path,
               resolver: BaseResolver) -> None:
    """Build one arch into the local engine (unless that tag is there already) and record it."""
    client = docker.client(settings)
    resolved, tag = _resolved(spec, settings, arch, files, resolver)
    ref = image_ref(settings, spec, tag, arch)
    with timed("docker image inspect"):
        exists = client.image.exists(ref)
    if exists:
        log_step(f"{ref} is in the local engine already: not rebuilt")
    else:
        docker.buildx_build(spec, settings, arch, ref, resolved.args, push=False)
    with timed("docker image inspect"):
        image = client.image.inspect(ref)
    if image.architecture != arch.docker:
        raise HookError(
            f"{ref} is {image.architecture}, not {arch.docker}: remove it (docker rmi {ref}) and build again"
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    report = _report(spec, settings, arch, resolved.args, tag, record)
    _record(record, {"ref": ref, "tag": tag, "id": image.id, "arch": arch.value, "platform": arch.docker_platform,
                     "local": True, "bases": resolved.bases, "args": resolved.args, **report})


def push_image(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path], record: Path,
               resolver: BaseResolver) -> None:
    """Build and push one arch (unless the registry has that tag already) and record what is there."""
    docker.client(settings)
    resolved, tag = _resolved(spec, settings, arch, files, resolver)
    ref = image_ref(settings, spec, tag, arch)
    if docker.remote_manifest(ref) is not None:
        log_step(f"{ref} is in the registry already: not rebuilt or pushed")
    else:
        docker.buildx_build(spec, settings, arch, ref, resolved.args, push=True)
    manifest = docker.remote_manifest(ref)
    if manifest is None or manifest.config is None:
        raise HookError(f"{ref} was pushed but the registry does not show it; try: docker login {registry_of(ref)}")
    record.parent.mkdir(parents=True, exist_ok=True)
    report = _report(spec, settings, arch, resolved.args, tag, record)
    _record(record, {"ref": ref, "tag": tag, "config": manifest.config.digest, "arch": arch.value,
                     "layers": [layer.digest for layer in manifest.layers or []],
                     "bases": resolved.bases, "args": resolved.args, **report})


def create_index(spec: ImageSpec, settings: Settings, arch_records: dict[Arch, Path], record: Path) -> None:
    """Join the pushed per-arch images into the multi-arch index <org>/<image>:<hash>."""
    from python_on_whales.exceptions import DockerException

    client = docker.client(settings)
    sources, tags = [], {}
    for arch, path in arch_records.items():
        data = read_record(path)
        if data is None or "ref" not in data:
            raise HookError(f"{path} is missing: run `doit image_push:{spec.name}-{arch}` first")
        sources.append(data["ref"])
        tags[arch.docker] = data["tag"]
    ref = image_ref(settings, spec, index_tag(tags))
    want = {a.docker_platform for a in arch_records}
    existing = docker.remote_manifest(ref)
    if existing is not None and platforms_of(existing) == want:
        log_step(f"{ref} (index of {', '.join(sorted(want))}) is in the registry already")
    else:
        log_step(f"creating index {ref} from {', '.join(sources)}")
        try:
            client.buildx.imagetools.create(sources, tags=[ref], builder=settings.builder)
        except DockerException as exc:
            msg = docker.last_line(exc)
            fix = docker.docker_fix(msg, registry_of(ref))
            raise HookError(f"imagetools create {ref} failed: {msg}; try: {fix}") from None
        existing = docker.remote_manifest(ref)
    if existing is None or platforms_of(existing) != want:
        raise HookError(f"index {ref} does not list {', '.join(sorted(want))} after creating it; try again")
    _record(record, {"ref": ref, "platforms": sorted(want), "sources": sources,
                     "manifests": sorted(m.digest or "" for m in existing.manifests or [])})
