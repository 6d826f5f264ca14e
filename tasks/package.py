"""Reproducible tarballs of the kernels and initramfs, with a sha512 checksum file."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

from tasks.errors import HookError
from tasks.files import atomic_writer, remove


def write_tarball(path: Path, members: Sequence[Path], *, mtime: int) -> None:
    """A gzip tar of members as ./<name>, byte-identical for identical inputs.

    Sorted entries, owner 0:0 (root), mode 0644, mtime fixed, gzip header without name or time.
    """
    with (
        atomic_writer(path) as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for member in sorted(members, key=lambda p: p.name):
            info = tarfile.TarInfo(f"./{member.name}")
            info.size = member.stat().st_size
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with member.open("rb") as handle:
                tar.addfile(info, handle)


def sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(path: Path, files: Sequence[Path]) -> None:
    """`sha512sum -c` compatible: '<hex>  <name>' lines, names relative to path's folder."""
    lines = io.StringIO()
    for file in sorted(files, key=lambda p: p.name):
        lines.write(f"{sha512(file)}  {file.name}\n")
    with atomic_writer(path) as handle:
        handle.write(lines.getvalue().encode())


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
    made = []
    for arch, members in sorted(per_arch.items()):
        target = dist / f"{prefix}_{arch}.tar.gz"
        write_tarball(target, members, mtime=mtime)
        made.append(target)
    write_tarball(combined, [m for members in per_arch.values() for m in members], mtime=mtime)
    made.append(combined)
    keep = {p.name for p in made}
    for stale in dist.glob(f"{prefix}-*.tar.gz"):
        if stale.name not in keep:
            remove(stale)
    write_checksums(dist / "checksum.txt", made)
    return made
