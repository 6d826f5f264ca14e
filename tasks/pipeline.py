"""The top of the pipeline: the one module that knows every stage and joins them for dodo.py.

Stages, bottom to top (docs/ARCHITECTURE.md has the picture): core, settings, images, then
hookos (the OS), convert, media and boot; this module makes one build's OS from its images' records
and converts it. dodo.py only wires these functions into doit tasks.
"""

from __future__ import annotations

from tasks.convert.stage import convert
from tasks.core.arch import Arch
from tasks.core.run import log_step
from tasks.hookos import embed
from tasks.hookos.stage import build_os, kernel_lines
from tasks.images.plan import ImagePlan, image_refs
from tasks.settings import Settings
from tasks.settings.builds import Build, boot_files, linuxkit_dir


def make_os(settings: Settings, build: Build, arch: Arch, plans: dict[str, ImagePlan]) -> None:
    """`linuxkit:<build>-<arch>`: the whole OS of one arch, from the image records to what iPXE boots."""
    build_os(settings, build, arch, image_refs(settings, plans, build, arch))
    convert(settings, build, arch)
    for line in kernel_lines(settings, build, arch):
        log_step(line)
    for line in embed.size_report(linuxkit_dir(settings, build, arch), boot_files(settings, build, arch)[1]):
        log_step(line)
