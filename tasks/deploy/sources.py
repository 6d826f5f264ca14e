"""What a deploy installs: a packaged build, as a folder (out/dist/<build>/, or any copy of one) or as
an artefact image (tasks.deploy.oci). Either way its checksum.txt says which files it has; the
version is in the name of its all-arches tarball (`<prefix>-<version>.tar.gz`), or the image's label.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.media.checksums import read_checksums

_ARCHES = "|".join(a.value for a in Arch)
PER_ARCH = re.compile(rf"^(?P<prefix>[a-z][a-z0-9-]*)_(?P<arch>{_ARCHES})\.tar\.gz$")


class Source(Protocol):
    """A build to deploy: its checksum.txt lines, a version label (images), and one file fetched."""

    label: str

    def listing(self) -> dict[str, str]: ...

    def version_label(self) -> str | None: ...

    def fetch(self, name: str, dest: Path) -> None: ...


@dataclass(frozen=True)
class Layout:
    """What the files of a build are: `<prefix>_<arch>.tar.gz` per arch, `<prefix>-<version>.tar.gz`."""

    prefix: str
    arches: tuple[Arch, ...]
    version: str

    def tarball(self, arch: Arch) -> str:
        return f"{self.prefix}_{arch}.tar.gz"

    def arch_files(self, arch: Arch, names: Iterable[str]) -> list[str]:
        """The files of one arch: its tarball and its ISO."""
        return sorted(n for n in names if n in (self.tarball(arch), f"{self.prefix}-{arch}.iso"))


def layout_of(listing: dict[str, str], label: str | None, where: str) -> Layout:
    """The build a checksum.txt describes; a version label (an image's) must agree with the tarball's name."""
    found = {m["prefix"]: m for m in map(PER_ARCH.match, listing) if m}
    if len(found) != 1:
        what = "no <name>_<arch>.tar.gz" if not found else f"tarballs of {len(found)} names"
        raise HookError(f"{where}: checksum.txt lists {what}: not one packaged hook build")
    if "checksum.txt" in listing:
        raise HookError(f"{where}: checksum.txt lists itself")
    (prefix,) = found
    arches = tuple(sorted((Arch(m["arch"]) for m in map(PER_ARCH.match, listing) if m), key=lambda a: a.value))
    named = {n[len(prefix) + 1:-len(".tar.gz")] for n in listing
             if n.startswith(f"{prefix}-") and n.endswith(".tar.gz")}
    versions = named | ({label} if label else set())
    if len(versions) != 1:
        what = ", ".join(sorted(versions)) or "none"
        raise HookError(f"{where}: the version is not clear (found: {what}); a build has one "
                        f"{prefix}-<version>.tar.gz, an artefact image its version label")
    return Layout(prefix, arches, versions.pop())


def copy_file(src: Path, dest: Path) -> None:
    """A copy, on disk (fsync) before it is checked and renamed into place."""
    shutil.copyfile(src, dest)
    fsync_file(dest)


def fsync_file(path: Path) -> None:
    os.chmod(path, 0o644)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FolderSource:
    """A packaged build in a folder: out/dist/<build>/, or a copy of a release's files."""

    folder: Path
    label: str

    def listing(self) -> dict[str, str]:
        if not (self.folder / "checksum.txt").is_file():
            raise HookError(f"{self.label} has no checksum.txt: not a packaged build (doit dist or doit dev_dist "
                            "makes one)")
        return read_checksums(self.folder / "checksum.txt")

    def version_label(self) -> str | None:
        return None

    def fetch(self, name: str, dest: Path) -> None:
        src = self.folder / name
        if not src.is_file():
            raise HookError(f"{name} is listed in {self.label}'s checksum.txt but is not there: build it again")
        copy_file(src, dest)
