"""Reproducible tarballs of the kernels and initramfs, with a sha512 checksum file."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from zlib_ng import gzip_ng

from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text, atomic_writer, file_digest, remove
from tasks.core.run import log_step, timed
from tasks.settings import Settings
from tasks.settings.builds import Build, boot_files, dist_dir

#: The members (a compressed kernel, a compressed initramfs) do not compress again: deflate level 6
#: saved 0.5 % of a 98 MB initramfs in 2.3 s, where stored blocks take 0.2 s with zlib and 0.13 s
#: with zlib-ng (measured).
COMPRESSLEVEL = 0


class _Sha512Writer:
    """Writes to fh and hashes what it writes in a thread of its own (hashlib releases the GIL), so
    the checksum costs no second pass over the file and little time."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.digest = hashlib.sha512()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha512")

    def write(self, data: bytes) -> int:
        chunk = bytes(data)  # the caller may reuse its buffer
        self.pool.submit(self.digest.update, chunk)
        return self.fh.write(chunk)

    def flush(self) -> None:
        self.fh.flush()

    def hexdigest(self) -> str:
        self.pool.shutdown(wait=True)
        return self.digest.hexdigest()


def write_tarball(path: Path, members: Sequence[Path | tuple[str, Path]], *, mtime: int) -> str:
    """A gzip tar of members as ./<name> (or ./<path>: a (path in the tar, file) pair), byte-identical
    for identical inputs; returns its sha512.

    Sorted entries, owner 0:0 (root), mode 0644, mtime fixed, gzip header without name or time.
    The gzip stream holds stored blocks (COMPRESSLEVEL): any gunzip reads it.
    """
    with atomic_writer(path) as raw:
        hashing = _Sha512Writer(raw)
        try:
            _write_tar(hashing, members, mtime=mtime)
        finally:
            digest = hashing.hexdigest()
    return digest


def _write_tar(fh: _Sha512Writer, members: Sequence[Path | tuple[str, Path]], *, mtime: int) -> None:
    with (
        gzip_ng.GzipNGFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=COMPRESSLEVEL) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        tar.copybufsize = 1 << 20  # not 16 KiB: a tenth of the calls for a 100 MB initramfs
        named = [(m.name, m) if isinstance(m, Path) else m for m in members]  # (name in the tar, file)
        for name, member in sorted(named, key=lambda m: m[0]):
            info = tarfile.TarInfo(f"./{name}")
            info.size = member.stat().st_size
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with member.open("rb") as handle:
                tar.addfile(info, handle)


def sha512(path: Path) -> str:
    return file_digest(path, "sha512")


def update_checksums(folder: Path, digests: dict[str, str | None]) -> None:
    """Set (a digest) or remove (None) lines of folder/checksum.txt, keeping the other lines whose
    files are still there: `sha512sum -c` compatible '<hex>  <name>' lines, sorted by name.

    The tarballs (package) and the ISOs (tasks.media.iso) are made by different tasks into one folder.
    """
    path = folder / "checksum.txt"
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:  # tasks that doit runs in parallel (-n) update one checksum.txt: one after the other
        fcntl.flock(handle, fcntl.LOCK_EX)
        _update_checksums(folder, path, digests)
    finally:
        os.close(handle)


def _update_checksums(folder: Path, path: Path, digests: dict[str, str | None]) -> None:
    lines: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            hexdigest, sep, name = line.partition("  ")
            if sep and name not in digests and (folder / name).is_file():
                lines[name] = hexdigest
    except FileNotFoundError:
        pass
    lines.update({name: digest for name, digest in digests.items() if digest is not None})
    if not lines and not path.exists():
        return
    text = io.StringIO()
    for name in sorted(lines):
        text.write(f"{lines[name]}  {name}\n")
    with atomic_writer(path) as handle:
        handle.write(text.getvalue().encode())


def write_checksums(path: Path, files: Sequence[Path]) -> None:
    """Set the lines of files in path (checksum.txt), keeping lines of other files still there."""
    update_checksums(path.parent, {file.name: sha512(file) for file in files})


def record_output(target: Path, digest: str, record: Path, *, key: str, **fields: object) -> None:
    """An output that checksum.txt lists (an ISO, a netboot tarball): its line there, then its record
    (name, sha512, size, mtime and the task's own fields), which output_is_current reads back."""
    update_checksums(target.parent, {target.name: digest})
    stat = target.stat()
    atomic_write_text(record, json.dumps({key: target.name, "sha512": digest, "size": stat.st_size,
                                          "mtime_ns": stat.st_mtime_ns, **fields}, indent=2, sort_keys=True) + "\n")


def output_is_current(target: Path, record: Path) -> bool:
    """Part of such a task's up-to-date check (file_dep and config_changed do the rest): the output is
    the one recorded (size, mtime: not patched or replaced since) and checksum.txt lists it."""
    try:
        data = json.loads(record.read_text())
        stat = target.stat()
        sums = (target.parent / "checksum.txt").read_text().splitlines()
    except (OSError, ValueError):
        return False
    return (stat.st_size, stat.st_mtime_ns) == (data.get("size"), data.get("mtime_ns")) and \
        f"{data.get('sha512')}  {target.name}" in sums


def clean_output(target: Path) -> None:
    """`doit clean` of such an output: its line in checksum.txt goes with it."""
    if target.parent.is_dir():
        update_checksums(target.parent, {target.name: None})


def _same_file(src: Path, dst: Path) -> None:
    """dst becomes a hardlink of src (a copy where the file system has no hardlinks), atomically.

    Safe because no output is ever changed in place: the next build replaces either name with a
    new file and leaves the other as it was.
    """
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        with src.open("rb") as fin, atomic_writer(dst) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        remove(tmp)
        raise


def package(
    *,
    dist: Path,
    prefix: str,
    version: str,
    per_arch: dict[str, Sequence[Path]],
    mtime: int,
) -> list[Path]:
    """Write <prefix>-<version>.tar.gz (all arches), <prefix>_<arch>.tar.gz each, checksum.txt.

    Tarballs of other versions left in dist by earlier builds are removed, so checksum.txt
    always covers exactly what the folder holds.
    """
    for member in (m for members in per_arch.values() for m in members):
        if not member.is_file():
            raise HookError(f"{member} is missing: run the build that makes it (doit dev_dist or doit dist)")
    dist.mkdir(parents=True, exist_ok=True)
    combined = dist / f"{prefix}-{version}.tar.gz"
    made: dict[Path, str] = {}
    for arch, members in sorted(per_arch.items()):
        target = dist / f"{prefix}_{arch}.tar.gz"
        made[target] = write_tarball(target, members, mtime=mtime)
    if len(per_arch) == 1:  # the same members, so the same bytes: link (or copy), not write again
        (only,) = made
        _same_file(only, combined)
        made[combined] = made[only]
    else:
        made[combined] = write_tarball(combined, [m for members in per_arch.values() for m in members], mtime=mtime)
    stale = [p for p in dist.glob(f"{prefix}-*.tar.gz") if p not in made]
    remove(*stale)
    update_checksums(dist, {**{p.name: digest for p, digest in made.items()}, **{p.name: None for p in stale}})
    return list(made)


def package_build(settings: Settings, build: Build) -> None:
    """`package:<build>`: the tarballs and checksum.txt of one build, every arch it makes."""
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
