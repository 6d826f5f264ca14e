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

#: The members (a compressed kernel, a compressed initramfs) do not compress again: deflate level 6
#: saved 0.5 % of a 98 MB initramfs in 2.3 s, where stored blocks take 0.2 s (measured).
COMPRESSLEVEL = 0


def write_tarball(path: Path, members: Sequence[Path], *, mtime: int) -> None:
    """A gzip tar of members as ./<name>, byte-identical for identical inputs.

    Sorted entries, owner 0:0 (root), mode 0644, mtime fixed, gzip header without name or time.
    The gzip stream holds stored blocks (COMPRESSLEVEL): any gunzip reads it.
    """
    with (
        atomic_writer(path) as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=COMPRESSLEVEL) as gz,
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


def update_checksums(folder: Path, digests: dict[str, str | None]) -> None:
    """Set (a digest) or remove (None) lines of folder/checksum.txt, keeping the other lines whose
    files are still there: `sha512sum -c` compatible '<hex>  <name>' lines, sorted by name.

    The tarballs (package) and the ISOs (tasks.iso) are made by different tasks into one folder.
    """
    path = folder / "checksum.txt"
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
    stale = [p for p in dist.glob(f"{prefix}-*.tar.gz") if p.name not in keep]
    remove(*stale)
    update_checksums(dist, {**{p.name: sha512(p) for p in made}, **{p.name: None for p in stale}})
    return made
