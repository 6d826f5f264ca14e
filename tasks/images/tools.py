"""Tools images: images the pipeline runs on the build machine (the ISO tools, the kernel builder).

Built into the local engine for this machine's arch and never pushed; tagged `<name>:<content hash>`
like our other images (their files, build args and base identities), and recorded in
out/images/tools/<name>.json. An image that did not change is not built again.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text
from tasks.core.run import find_tool, log_step, timed
from tasks.images import docker, engine
from tasks.images.bases import dockerfile_bases, known_args, resolve_args
from tasks.images.specs import ImageSpec, Resolved, build_args, content_hash, context_files, read_record

if TYPE_CHECKING:
    from tasks.images.bases import BaseResolver
    from tasks.settings import Settings


def record_path(settings: Settings, spec: ImageSpec) -> Path:
    return settings.out / "images" / "tools" / f"{spec.name}.json"


def _bases(settings: Settings, spec: ImageSpec) -> tuple[dict[str, str], dict[str, str]]:
    return build_args(spec, settings, Arch.native()), dockerfile_bases(spec.dockerfile(settings.root).read_text())


def known(settings: Settings, spec: ImageSpec, resolver: BaseResolver) -> Resolved | None:
    """The tool image's build args and base identities from what is known without the network
    (pinned, recorded in bases.json, or in the local engine); None when a lookup is needed."""
    found = known_args(*_bases(settings, spec), resolver)
    return Resolved(*found) if found else None


def is_current(settings: Settings, spec: ImageSpec, resolver: BaseResolver) -> bool:
    """doit's up-to-date check of a tools image's task: the recorded image is in the engine and was
    built from the same build args and base identities as now (its files are doit's file_dep)."""
    data = read_record(record_path(settings, spec))
    if data is None or engine.image_id(str(data.get("ref", ""))) != data.get("id"):
        return False
    now = known(settings, spec, resolver)
    return now is not None and data.get("args") == now.args and data.get("bases") == now.bases


def build(settings: Settings, spec: ImageSpec, resolver: BaseResolver, *, versions: str = "",
          record: Path | None = None) -> None:
    """Build a tools image for this machine (unless that tag is there) and record it (by default in
    record_path()), with the package versions its file `versions` lists."""
    dockerfile = spec.dockerfile(settings.root)
    if not dockerfile.is_file():
        raise HookError(f"{dockerfile} is missing: restore it from git (git checkout -- containers)")
    args, bases = _bases(settings, spec)
    args, identities = resolve_args(args, bases, resolver)
    resolver.save()
    tag = content_hash(spec, settings.root, context_files(spec, settings.root), {"args": args, "bases": identities})
    ref = f"{spec.name}:{tag}"
    client = docker.client(settings)
    with timed("docker image inspect"):
        exists = client.image.exists(ref)
    if exists:
        log_step(f"{ref} is in the local engine already: not rebuilt")
    else:
        docker.buildx_build(spec, settings, Arch.native(), ref, args, push=False)
    image = client.image.inspect(ref)
    listed = _docker_output(["run", "--rm", "--network", "none", "--entrypoint", "cat", ref, versions]).split("\n") \
        if versions else []
    atomic_write_text(record or record_path(settings, spec), json.dumps(
        {"ref": ref, "tag": tag, "id": image.id, "args": args, "bases": identities,
         "versions": [v for v in listed if v]}, indent=2, sort_keys=True) + "\n")


def recorded_ref(settings: Settings, spec: ImageSpec, task: str) -> str:
    """The reference of a tools image as its task recorded it."""
    data = read_record(record_path(settings, spec))
    if data is None or "ref" not in data:
        raise HookError(f"{record_path(settings, spec)} is missing: run `doit {task}` first")
    return str(data["ref"])


def _docker_output(args: list[str]) -> str:
    exe = find_tool("docker")
    done = subprocess.run([exe, *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HookError(f"docker {args[0]} failed (exit {done.returncode}): {last}")
    return done.stdout.strip()
