"""A build's files as OCI artefact images, and a deploy from one.

`push_artifacts` pushes `<org>/hook-artifacts:<version>` (every file of out/dist/release/) and
`<org>/hook-artifacts:<version>-<arch>` (that arch's tarball and ISO), each with a checksum.txt of its
files. Every file is one layer, a tar we write ourselves: one entry `<name>`, mode 0644, owner 0:0,
mtime `source_date_epoch`, no other header field; the image config (created = the same time, the
version label) is ours too. So identical files give identical layers, configs and image ids, and the
image is made without a Dockerfile or a build: the archive is streamed into `docker load` and the
image is `docker push`ed (docker's credentials; dockerd gzips the layers as it pushes).

A deploy reads an image without running it: `docker pull`, `docker create`, `docker cp` of each file.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text
from tasks.core.refs import registry_of
from tasks.core.run import find_tool, log_step, run, stop_process, timed
from tasks.deploy.sources import Layout, fsync_file, layout_of
from tasks.media.checksums import format_checksums, parse_checksums, read_checksums
from tasks.settings.builds import ARTIFACTS

VERSION_LABEL = "org.opencontainers.image.version"
ARCHES_LABEL = "io.tinkerbell.hook.arches"
#: A platform is required of an image; the all-arches image holds data for both and says amd64.
ALL_PLATFORM = Arch.X86_64
_BLOCK = 512


def artifact_ref(org: str, version: str, arch: Arch | None = None) -> str:
    return f"{org}/{ARTIFACTS}:{version}" + (f"-{arch}" if arch else "")


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def layer_size(size: int) -> int:
    """One header, the data padded to a block, two zero blocks (the end of the archive)."""
    return _BLOCK + size + (-size % _BLOCK) + 2 * _BLOCK


class _Layer(io.RawIOBase):
    """The bytes of a one-file layer, read once: sha256 of them (the diff id) and sha512 of the file's
    own bytes (checked against checksum.txt, so a file changed since it was listed is never pushed)."""

    def __init__(self, name: str, source: Path | bytes, size: int, mtime: int) -> None:
        self.name, self.size = name, size
        self.diff = hashlib.sha256()
        self.content = hashlib.sha512()
        self._handle: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        self._parts = iter([("raw", _header(name, size, mtime)), ("file", b""),
                            ("raw", b"\0" * ((-size % _BLOCK) + 2 * _BLOCK))])
        self._part: tuple[str, bytes] | None = next(self._parts)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # exactly n bytes until the end: tarfile's copy wants that
        chunks, want = [], n if n >= 0 else 1 << 62
        while want and self._part is not None:
            kind, data = self._part
            if kind == "file":
                data = self._handle.read(min(want, 1 << 20))
                if not data:
                    self._handle.close()
                    self._part = next(self._parts, None)
                    continue
                self.content.update(data)
            else:
                self._part = (kind, data[want:]) if len(data) > want else next(self._parts, None)
                data = data[:want]
            chunks.append(data)
            want -= len(data)
        out = b"".join(chunks)
        self.diff.update(out)
        return out


def _created(mtime: int) -> str:
    return datetime.datetime.fromtimestamp(mtime, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archive(out: IO[bytes], ref: str, files: dict[str, tuple[Path | bytes, str | None]], *,
                  arch: Arch, labels: dict[str, str], mtime: int) -> str:
    """Stream a `docker load` archive of one image, a layer per file (sorted by name) into out; returns
    the image id (the config's sha256). files: name -> (path or bytes, sha512 it must have or None)."""
    diff_ids, history = [], []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for index, name in enumerate(sorted(files)):
            source, want = files[name]
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            layer = _Layer(name, source, size, mtime)
            info = tarfile.TarInfo(f"layers/{index:03}.tar")
            info.size = layer_size(size)
            tar.addfile(info, layer)
            if want and layer.content.hexdigest() != want:
                raise HookError(f"{name} changed since checksum.txt listed it (its sha512 differs): build again; "
                                f"nothing was pushed")
            diff_ids.append("sha256:" + layer.diff.hexdigest())
            history.append({"created": _created(mtime), "created_by": f"hook artifacts: /{name}"})
        config = json.dumps({
            "architecture": arch.docker, "os": "linux", "created": _created(mtime),
            "config": {"Labels": labels},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        }, sort_keys=True, separators=(",", ":")).encode()
        _add(tar, "config.json", config)
        _add(tar, "manifest.json", json.dumps([{"Config": "config.json", "RepoTags": [ref],
                                               "Layers": [f"layers/{i:03}.tar" for i in range(len(files))]}]).encode())
    return "sha256:" + hashlib.sha256(config).hexdigest()


def _load(ref: str, files: dict[str, tuple[Path | bytes, str | None]], *, arch: Arch, labels: dict[str, str],
          mtime: int) -> str:
    """docker load the image, streamed (nothing is spooled to disk); returns its id."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([find_tool("docker"), "load"], stdin=subprocess.PIPE, stdout=log,
                                stderr=subprocess.STDOUT)
        assert proc.stdin is not None
        image_id = None
        try:
            with timed("docker load"):
                try:
                    image_id = write_archive(proc.stdin, ref, files, arch=arch, labels=labels, mtime=mtime)
                    proc.stdin.close()
                except BrokenPipeError:  # docker load stopped reading: what it said is the failure
                    pass
                except (OSError, tarfile.TarError) as exc:  # a file that changed size or went while read
                    raise HookError(f"the files of {ref} could not be read ({exc}): build again") from None
                rc = proc.wait()
        except BaseException:
            stop_process(proc, grace=5)
            raise
        log.seek(0)
        said = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    if rc != 0 or image_id is None:
        raise HookError(f"docker load of {ref} failed (exit {rc}): {said[-1] if said else 'no output'}")
    return image_id


def _push(ref: str) -> str:
    registry = registry_of(ref)
    out = run(["docker", "push", ref], tool="docker push",
              fix=f"docker login {registry} (DOCKER_CONFIG), and check that {registry} is up")
    found = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
    if not found:
        raise HookError(f"docker push {ref} printed no digest: check the registry {registry}")
    return found.group(1)


def artifact_images(layout: Layout, listing: dict[str, str], org: str) -> dict[str, tuple[Arch | None, dict[str, str]]]:
    """ref -> (arch or None for the all-arches image, the checksum.txt lines of its files)."""
    images: dict[str, tuple[Arch | None, dict[str, str]]] = {artifact_ref(org, layout.version): (None, dict(listing))}
    for arch in layout.arches:
        lines = {name: listing[name] for name in layout.arch_files(arch, listing)}
        images[artifact_ref(org, layout.version, arch)] = (arch, lines)
    return images


def push_artifacts(org: str, folder: Path, record: Path, *, mtime: int) -> dict[str, str]:
    """`doit artifacts` (and `doit dist artifacts=true`): push the build in folder as artefact images."""
    listing = read_checksums(folder / "checksum.txt")
    layout = layout_of(listing, None, str(folder))
    pushed = {}
    for ref, (arch, lines) in artifact_images(layout, listing, org).items():
        files: dict[str, tuple[Path | bytes, str | None]] = {name: (folder / name, lines[name]) for name in lines}
        files["checksum.txt"] = (format_checksums(lines).encode(), None)
        labels = {VERSION_LABEL: layout.version, "org.opencontainers.image.title": ARTIFACTS,
                  ARCHES_LABEL: ",".join(a.value for a in ((arch,) if arch else layout.arches))}
        log_step(f"artifacts: {ref}: {', '.join(sorted(files))} (a layer each)")
        image_id = _load(ref, files, arch=arch or ALL_PLATFORM, labels=labels, mtime=mtime)
        try:
            pushed[ref] = _push(ref)
        finally:
            subprocess.run(["docker", "image", "rm", ref], capture_output=True)  # the registry has it now
        log_step(f"artifacts: pushed {ref}@{pushed[ref]} (image {image_id[:19]})")
    text = json.dumps({"version": layout.version, "images": pushed}, indent=2, sort_keys=True)
    atomic_write_text(record, text + "\n")
    return pushed


@dataclass
class ImageSource:
    """An artefact image, pulled and created (never run); files are copied out with `docker cp`."""

    ref: str
    container: str
    labels: dict[str, str]

    @property
    def label(self) -> str:
        return f"image {self.ref}"

    @classmethod
    @contextlib.contextmanager
    def opened(cls, ref: str) -> Iterator[ImageSource]:
        registry = registry_of(ref)
        run(["docker", "pull", ref], tool="docker pull",
            fix=f"check the reference, `docker login {registry}` (DOCKER_CONFIG), and that it was pushed "
                "(doit dist artifacts=true)")
        labels = json.loads(run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", ref],
                                tool="docker image inspect", quiet=True).strip() or "null") or {}
        if VERSION_LABEL not in labels:
            raise HookError(f"{ref} has no {VERSION_LABEL} label: not a hook artefact image (doit dist artifacts=true "
                            "pushes them)")
        with tempfile.TemporaryDirectory(prefix="hook-deploy-") as scratch:
            cidfile = Path(scratch) / "cid"
            run(["docker", "create", "--cidfile", str(cidfile), ref, "/none"], tool="docker create", quiet=True)
            container = cidfile.read_text().strip()
        try:
            yield cls(ref, container, labels)
        finally:
            subprocess.run(["docker", "rm", container], capture_output=True)

    def listing(self) -> dict[str, str]:
        with tempfile.TemporaryDirectory(prefix="hook-deploy-") as scratch:
            path = Path(scratch) / "checksum.txt"
            self.fetch("checksum.txt", path)
            return parse_checksums(path.read_text(encoding="ascii", errors="replace"), f"{self.ref}:/checksum.txt")

    def version_label(self) -> str | None:
        return self.labels.get(VERSION_LABEL)

    def fetch(self, name: str, dest: Path) -> None:
        run(["docker", "cp", f"{self.container}:/{name}", str(dest)], tool="docker cp", quiet=True,
            fix=f"{self.ref} lacks /{name}: push it again (doit dist artifacts=true)")
        fsync_file(dest)
