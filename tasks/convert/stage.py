"""The convert stage of one build and arch: LinuxKit's initrd re-packed into initramfs-<arch>, and
its kernel copied to vmlinuz-<arch> (the files iPXE boots, tasks.settings.builds.boot_files)."""

from __future__ import annotations

import os
import shutil

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_writer, remove
from tasks.core.run import timed
from tasks.settings import Settings
from tasks.settings.builds import Build, boot_files, linuxkit_outputs


def convert(settings: Settings, build: Build, arch: Arch) -> None:
    """Re-pack linuxkit's initrd into initramfs-<arch> and copy its kernel to vmlinuz-<arch>."""
    from tasks.convert import engine

    made = linuxkit_outputs(settings, build, arch)
    for kind in ("kernel", "initrd.img"):
        if not made[kind].is_file():
            raise HookError(f"{made[kind]} is missing: run `doit {build.task}` first (convert never runs linuxkit)")
    kernel, initrd = boot_files(settings, build, arch)
    with made["kernel"].open("rb") as src, atomic_writer(kernel) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    with timed("hook convert"):  # ours, but bench/bench_incremental.py shows it apart
        engine.repack(made["initrd.img"], initrd, compression=settings.compression)  # logs its own summary


def clean_converted(settings: Settings, build: Build, arch: Arch) -> None:
    """What `doit clean` removes beyond the targets: the convert engine's record beside the initramfs."""
    from tasks.convert.write import check_path

    remove(check_path(boot_files(settings, build, arch)[1]))


def convert_is_current(settings: Settings, build: Build, arch: Arch) -> bool:
    """doit's up-to-date check for `convert`: outputs exist, are newer than linuxkit's, and pass the cheap verify.

    A build that linuxkit never made is up to date: there is nothing to convert.
    """
    from tasks.convert import engine

    made = linuxkit_outputs(settings, build, arch)
    if not (made["kernel"].exists() and made["initrd.img"].exists()):
        return True  # never built: nothing to convert (`doit convert` never runs linuxkit)
    kernel, initrd = boot_files(settings, build, arch)
    try:
        newest_input = max(os.stat(made["kernel"]).st_mtime_ns, os.stat(made["initrd.img"]).st_mtime_ns)
        oldest_output = min(os.stat(kernel).st_mtime_ns, os.stat(initrd).st_mtime_ns)
    except FileNotFoundError:
        return False
    return oldest_output >= newest_input and engine.quick_check(initrd)
