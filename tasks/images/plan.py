"""Which images a build uses, the files that go into each (their tasks' file_dep), and the
references the image tasks recorded for the OS stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.run import log_step
from tasks.images import engine
from tasks.images.bases import BaseResolver, base_ref, dockerfile_bases
from tasks.images.specs import ImageSpec, build_args, context_files, os_images, read_record
from tasks.settings import Settings
from tasks.settings.builds import Build, image_record


@dataclass(frozen=True)
class ImagePlan:
    """One image we build and the files that go into it (its tasks' file_dep)."""

    spec: ImageSpec
    files: tuple[Path, ...]


def plan_images(settings: Settings) -> dict[str, ImagePlan]:
    return {spec.name: ImagePlan(spec, tuple(context_files(spec, settings.root))) for spec in os_images(settings)}


def image_records(settings: Settings, plans: dict[str, ImagePlan], build: Build, arch: Arch) -> dict[str, Path]:
    """The image records a build's linuxkit step depends on: per-arch local images, or the pushed indexes."""
    return {name: image_record(settings, name, arch if build.local else None, local=build.local) for name in plans}


def image_refs(settings: Settings, plans: dict[str, ImagePlan], build: Build, arch: Arch) -> dict[str, str]:
    """The references a build's config uses, as the image tasks recorded them."""
    refs = {}
    for name, record in image_records(settings, plans, build, arch).items():
        data = read_record(record)
        if data is None or "ref" not in data:
            task = f"image_load:{name}-{arch}" if build.local else f"image_index:{name}"
            raise HookError(f"{record} is missing: run `doit {task}` first")
        refs[name] = data["ref"]
    return refs


def refresh_bases(settings: Settings, plans: dict[str, ImagePlan], resolver: BaseResolver) -> None:
    """`doit bases`: look up again, in their registries, the base images that are not local."""
    seen: set[str] = set()
    for plan in plans.values():
        for arch in Arch:
            bases = dockerfile_bases(plan.spec.dockerfile(settings.root).read_text())
            args = build_args(plan.spec, settings, arch)
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
