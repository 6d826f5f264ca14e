"""Embedded images: images that are in hook-docker's engine when the Hook OS starts (setting `embed_images`).

Each image is exported at build time, for the build's arch, into an archive that `docker load` takes
(docker's `manifest.json` layout, every layer gzip-compressed); the OS carries the archives in its
read-only root under /usr/share/hook/embedded/ (a generated LinuxKit config, `embed.yaml`, beside
the rendered hook.yaml), and hook-docker loads them into dockerd before the docker socket that
hook-bootkit waits for appears. Nothing here needs privileges: local builds `docker save` from the
local engine, release builds pull with LinuxKit's own cache (`linuxkit cache pull`/`export`, the
same registry code and credentials as `linuxkit build`). See docs/embedded.md.

Where things go, per build and arch (the folder linuxkit runs in, out/linuxkit/<build>/<arch>/):

    embedded/NN-<name>.tar   one archive per image, in the order of the list
    embed.yaml               the extra LinuxKit config that puts them into the root (none: no images)
    embedded.json            the record: what was embedded, from which identity, and what it costs

The record is the linuxkit task's file dependency: it changes when the list or an image changes,
and then only the OS is made again. Release builds pin each image to the digest its registry had
when it was first looked up, recorded in out/images/embedded-digests.json (`doit bases` looks again).

The setting itself is parsed by tasks.settings.embed_list. This module is imported when dodo.py
loads (it defines the embed tasks): the standard library and our light modules only; tarfile and
zlib-ng are imported when an export runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text, atomic_writer, remove
from tasks.core.refs import registry_of, split_tag
from tasks.core.run import log_step, run
from tasks.images import engine
from tasks.settings.embed_list import Entry, default_name

if TYPE_CHECKING:
    from tasks.settings import Settings

#: Where the archives are in the OS (hook.yaml makes the directory and binds it into hook-docker).
OS_DIR = "usr/share/hook/embedded"
STORE = "embedded"
CONFIG = "embed.yaml"
RECORD = "embedded.json"
#: Bumped when the archive layout changes: every embedded image is exported again.
FORMAT = 1
GZIP_LEVEL = 6
#: Layers are stored gzip-compressed: the archive costs its compressed size in the initramfs AND in
#: the root's RAM (measured against uncompressed layers in docs/embedded.md).
GZIP_LAYERS = True


def _format() -> str:
    """What the archives' layout is: an archive made in another one is exported again."""
    return f"{FORMAT}-{'gzip' if GZIP_LAYERS else 'tar'}"


CHUNK = 1 << 20


def entries(settings: Settings, arch: Arch) -> list[Entry]:
    """The setting's images for one arch ({arch} filled in)."""
    found = []
    for item in settings.embed_images:
        source, _, name = item.partition(" ")
        source = source.replace("{arch}", arch.docker)
        found.append(Entry(source, (name or default_name(source) or source).replace("{arch}", arch.docker)))
    return found


# --- where things go -----------------------------------------------------------------------------


def record_path(folder: Path) -> Path:
    """The record of one build and arch (the linuxkit task's file dependency); folder is linuxkit's."""
    return folder / RECORD


def archive_name(index: int, entry: Entry) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "_", entry.name.lower()).strip("_")[:80]
    return f"{index:02d}-{slug}.tar"


def targets(settings: Settings, folder: Path, arch: Arch) -> list[Path]:
    """What the embed task makes: the record, and with images the archives and embed.yaml."""
    wanted = entries(settings, arch)
    made = [record_path(folder)]
    if wanted:
        made += [folder / CONFIG, *(folder / STORE / archive_name(i, e) for i, e in enumerate(wanted))]
    return made


def digests_path(settings: Settings) -> Path:
    """Release builds: the registry digest of each embedded image, looked up once (`doit bases` again)."""
    return settings.out / "images" / "embedded-digests.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_record(folder: Path) -> dict[str, Any] | None:
    data = _read_json(record_path(folder))
    return data if isinstance(data, dict) and isinstance(data.get("images"), list) else None


# --- identities: what an image is now, without the network ---------------------------------------


def _recorded_digests(settings: Settings) -> dict[str, str]:
    data = _read_json(digests_path(settings))
    if not isinstance(data, dict):
        return {}
    return {ref: entry["digest"] for ref, entry in data.items() if isinstance(entry, dict) and "digest" in entry}


def identity_now(settings: Settings, entry: Entry, *, local: bool) -> str | None:
    """The image's identity as known without the network: its local image id, or its pinned or
    recorded registry digest; None when it would take a lookup (or the image is not there)."""
    if local:
        return engine.image_id(entry.source)
    if "@sha256:" in entry.source:
        return entry.source.split("@", 1)[1]
    return _recorded_digests(settings).get(entry.source)


def is_current(settings: Settings, folder: Path, arch: Arch, *, local: bool) -> bool:
    """doit's up-to-date check of the embed task: the record names the same images, in the same
    order, with the same identities (image id or digest) as now. A local lookup costs ~1 ms (one
    request to the engine's socket, shared with the other tasks); a release one reads a file."""
    wanted = entries(settings, arch)
    record = read_record(folder)
    if record is None or record.get("format") != _format() or record.get("arch") != arch.value:
        return False
    images = record["images"]
    if [(i.get("source"), i.get("name")) for i in images] != [(e.source, e.name) for e in wanted]:
        return False
    return all(identity_now(settings, e, local=local) == item.get("identity")
               for e, item in zip(wanted, images, strict=True))


# --- export ---------------------------------------------------------------------------------------


def export(settings: Settings, folder: Path, arch: Arch, *, local: bool) -> None:
    """Export every embedded image of one build and arch, write embed.yaml and the record.

    An archive whose image did not change (same name, same identity, file still there) is kept.
    """
    wanted = entries(settings, arch)
    store = folder / STORE
    record = read_record(folder)
    reusable = record["images"] if record and record.get("format") == _format() else []
    old = {(i.get("name"), i.get("identity"), i.get("file")): i for i in reusable if isinstance(i, dict)}
    items: list[dict[str, Any]] = []
    for index, entry in enumerate(wanted):
        file = f"{STORE}/{archive_name(index, entry)}"
        target = folder / file
        identity, pinned = _identity_for_export(settings, entry, local=local)
        kept = old.get((entry.name, identity, file))
        if kept and target.is_file() and target.stat().st_size == kept.get("archive_bytes"):
            log_step(f"embedded {entry.name}: unchanged ({_short(identity)}), archive kept")
            items.append({**kept, "source": entry.source})
            continue
        started = time.monotonic()
        spool = store / f".{target.name}.spool"
        store.mkdir(parents=True, exist_ok=True)
        try:
            remove(spool)
            if local:
                _docker_save(entry, spool)
            else:
                _linuxkit_export(settings, entry, pinned, arch, spool)
            info = write_archive(spool, target, entry, arch)
        finally:
            remove(spool)
        items.append({"source": entry.source, "name": entry.name, "identity": identity,
                      "from": "local engine" if local else pinned, "file": file, **info})
        log_step(f"embedded {entry.name} ({arch}) from {entry.source if local else pinned}: "
                 f"{_cost(items[-1])} [{time.monotonic() - started:.1f}s]")
    keep = {Path(i["file"]).name for i in items}
    if store.is_dir():
        for stale in store.iterdir():
            if stale.name not in keep:
                remove(stale)
    config = folder / CONFIG
    if items:
        from tasks.hookos.config import parse

        text = embed_config(items)
        parse(text, str(config))  # LinuxKit v1.8.2's schema
        atomic_write_text(config, text)
    else:
        remove(config)
    atomic_write_text(record_path(folder), json.dumps(
        {"format": _format(), "arch": arch.value, "images": items}, indent=2, sort_keys=True) + "\n")
    for line in size_report(folder):
        log_step(line)


def embed_config(items: list[dict[str, Any]]) -> str:
    """The LinuxKit config that adds the archives to the root (read relative to linuxkit's folder)."""
    lines = ["# Generated by hook (tasks/hookos/embed.py) from embed_images: the embedded images' archives,",
             f"# loaded by hook-docker from /{OS_DIR} (hook.yaml binds it in) before its socket appears.",
             "files:"]
    for item in items:
        name = Path(item["file"]).name
        lines += [f"  - path: {OS_DIR}/{name}", f"    source: {item['file']}", '    mode: "0444"']
    return "\n".join(lines) + "\n"


def extra_configs(folder: Path) -> list[Path]:
    """[embed.yaml] when the record lists images (linuxkit build takes it after hook.yaml), else []."""
    record = read_record(folder)
    if not record or not record["images"]:
        return []
    config = folder / CONFIG
    if not config.is_file():
        raise HookError(f"{config} is missing: run `doit forget embed` and build again")
    return [config]


def _identity_for_export(settings: Settings, entry: Entry, *, local: bool) -> tuple[str, str]:
    """(identity, what to pull): the local image id; or the registry digest (looked up and recorded
    the first time) and the digest-pinned reference."""
    if local:
        images = engine.local_images()
        if images is None:
            raise HookError("docker daemon not reachable (embedded images of a local build come from it): start "
                            "dockerd, check DOCKER_HOST")
        found = engine.image_id(entry.source)
        if found is None:
            raise HookError(f"embedded image {entry.source} is not in the local engine: pull it (docker pull "
                            f"--platform <os/arch> {entry.source}) or build it, or take it out of embed_images")
        return found, entry.source
    digest = identity_now(settings, entry, local=False) or resolve_digest(settings, entry.source)
    repo, _, _ = split_tag(entry.source)
    return digest, f"{repo}@{digest}"


def resolve_digest(settings: Settings, source: str, *, refresh: bool = False) -> str:
    """The digest of source in its registry, looked up once (network) and recorded in
    embedded-digests.json; every arch of a build then takes the same one. refresh: look again.

    Under a lock: two arches exported at once (`doit -n 2`) look it up once and lose no entry."""
    import fcntl

    from tasks.images.bases import registry_digest

    path = digests_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = _recorded_digests(settings).get(source)
        if old and not refresh:
            return old
        log_step(f"embedded image {source}: looking up its digest in {registry_of(source)}")
        digest = registry_digest(source)
        if digest is None:
            raise HookError(f"embedded image {source} cannot be found in its registry: check the name, that "
                            f"{registry_of(source)} is up, and `docker login {registry_of(source)}`; or take it "
                            "out of embed_images")
        if old != digest:
            if old:
                log_step(f"embedded image {source} moved: {old} -> {digest}")
            data = _read_json(path)
            data = data if isinstance(data, dict) else {}
            data[source] = {"digest": digest, "resolved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return digest


def refresh_digests(settings: Settings, arches: tuple[Arch, ...]) -> None:
    """`doit bases`: look the release builds' embedded images up again in their registries."""
    seen: set[str] = set()
    for arch in arches:
        for entry in entries(settings, arch):
            if entry.source in seen or "@sha256:" in entry.source:
                continue
            seen.add(entry.source)
            old = _recorded_digests(settings).get(entry.source)
            new = resolve_digest(settings, entry.source, refresh=True)
            state = "unchanged" if old == new else (f"was {old}" if old else "new")
            log_step(f"embedded {entry.source}: {new} ({state})")


def _docker_save(entry: Entry, spool: Path) -> None:
    try:
        run(["docker", "image", "save", "-o", str(spool), entry.source], tool="docker save", quiet=True)
    except HookError as exc:
        raise HookError(f"embedded image {entry.source} cannot be read from the local engine: {exc}") from None


def _linuxkit_export(settings: Settings, entry: Entry, pinned: str, arch: Arch, spool: Path) -> None:
    """Pull the pinned image into LinuxKit's cache (all its platforms), export this arch's."""
    from tasks.hookos.build import mirrors_for
    from tasks.hookos.tool import linuxkit_for

    exe = linuxkit_for(settings)
    mirrors = [arg for m in mirrors_for([pinned]) for arg in ("--mirror", m)]
    registry = registry_of(pinned)
    try:
        run([exe, *mirrors, "cache", "pull", pinned], tool="linuxkit cache pull", quiet=True,
            fix=f"check that {registry} is up and has it, and `docker login {registry}`")
        run([exe, "cache", "export", "--platform", arch.docker_platform, "--format", "docker", "--name", entry.name,
             "--outfile", str(spool), pinned], tool="linuxkit cache export", quiet=True)
    except HookError as exc:
        if "for platform" in str(exc):
            raise HookError(f"embedded image {entry.source} ({pinned}) has no {arch.docker_platform} image: push "
                            f"one (a multi-arch index), or build only the arches it has (arches=...)") from None
        raise HookError(f"embedded image {entry.source} cannot be read from its registry: {exc}") from None


# --- the archive ----------------------------------------------------------------------------------


class _Hashing:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)


def _unreadable(entry: Entry, why: str) -> HookError:
    return HookError(f"embedded image {entry.source} cannot be read: {why}; export it again (`doit forget embed`), "
                     f"and check it with `docker image inspect {entry.source}`")


def _gunzip_chunks(stream: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(compressed chunk, its decompressed bytes) of a gzip stream, members concatenated."""
    from zlib_ng import zlib_ng

    inflate = zlib_ng.decompressobj(31)
    while True:
        raw = stream.read(CHUNK)
        if not raw:
            if not inflate.eof:
                raise ValueError("the gzip stream is cut short")
            return
        data = raw
        out = b""
        while data:
            out += inflate.decompress(data)
            data = inflate.unused_data
            if inflate.eof and data:
                inflate = zlib_ng.decompressobj(31)
        yield raw, out


def _layer(src: IO[bytes], spool: IO[bytes], *, gzip: bool = True) -> tuple[str, int]:
    """Copy one layer to spool gzip-compressed (as is when it is gzip already), or with gzip=False
    uncompressed; return the sha256 and size of its uncompressed tar (the config's diff_id)."""
    from zlib_ng import zlib_ng

    head = src.read(2)
    sha = hashlib.sha256()
    size = 0
    if head == b"\x1f\x8b":
        for raw, data in _gunzip_chunks(_Prefixed(head, src)):
            spool.write(raw if gzip else data)
            sha.update(data)
            size += len(data)
        return "sha256:" + sha.hexdigest(), size
    deflate = zlib_ng.compressobj(GZIP_LEVEL, zlib_ng.DEFLATED, 31)  # header: no name, mtime 0
    data = head
    while data:
        sha.update(data)
        size += len(data)
        spool.write(deflate.compress(data) if gzip else data)
        data = src.read(CHUNK)
    if gzip:
        spool.write(deflate.flush())
    return "sha256:" + sha.hexdigest(), size


class _Prefixed:
    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out + self.rest.read(max(0, n - len(out)))
        return self.rest.read(n)


def write_archive(spool: Path, target: Path, entry: Entry, arch: Arch) -> dict[str, Any]:
    """Turn an exported image (`docker save` or LinuxKit's docker tar) into the archive the OS loads.

    Checked: one image, for linux and this arch, every layer matching its diff_id. Written
    reproducibly: manifest.json (RepoTags: the entry's name), config.json (the image's own bytes, so
    its id stays), layers/NNN.tar.gz; in that order, mtime 0, owner 0:0. Returns what it costs.
    """
    import tarfile

    try:
        with tarfile.open(spool, "r:") as src:
            return _rewrite(src, target, entry, arch)
    except (OSError, tarfile.TarError) as exc:
        raise _unreadable(entry, f"the export is not a readable tar archive ({exc})") from None


def _rewrite(src: Any, target: Path, entry: Entry, arch: Arch) -> dict[str, Any]:
    import tarfile

    try:
        manifest = json.load(_member(src, "manifest.json"))
        if not isinstance(manifest, list) or len(manifest) != 1:
            raise ValueError(f"manifest.json lists {len(manifest) if isinstance(manifest, list) else 0} images")
        config_bytes = _member(src, manifest[0]["Config"]).read()
        config = json.loads(config_bytes)
        layers = list(manifest[0]["Layers"])
        diff_ids = list(config["rootfs"]["diff_ids"])
    except (KeyError, TypeError, ValueError, tarfile.TarError) as exc:
        raise _unreadable(entry, f"the export has no readable manifest and config ({exc})") from None
    found = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    if found != arch.docker_platform:
        raise HookError(
            f"embedded image {entry.source} is {found}, but this build is {arch} ({arch.docker_platform}): "
            f"embed a {arch.docker_platform} image (docker pull --platform {arch.docker_platform} ..., or a "
            f"per-arch tag with {{arch}}, e.g. '{entry.source}-{{arch}} {entry.name}')")
    if len(layers) != len(diff_ids):
        raise _unreadable(entry, f"its manifest lists {len(layers)} layers, its config {len(diff_ids)}")
    names = [f"layers/{n:03d}.tar{'.gz' if GZIP_LAYERS else ''}" for n in range(len(layers))]
    out_manifest = json.dumps([{"Config": "config.json", "RepoTags": [entry.name], "Layers": names}],
                              separators=(",", ":")).encode()
    unpacked = 0
    scratch = target.parent / f".{target.name}.layer"
    with atomic_writer(target) as raw:
        out = _Hashing(raw)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            _add(tar, "manifest.json", out_manifest)
            _add(tar, "config.json", config_bytes)
            for n, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
                try:
                    with open(scratch, "w+b") as spool:
                        try:
                            got, size = _layer(_member(src, layer), spool, gzip=GZIP_LAYERS)
                        except Exception as exc:  # noqa: BLE001 - tar, gzip or I/O: the layer cannot be read
                            raise _unreadable(entry, f"layer {n} ({layer}): {exc}") from None
                        if got != diff_id:
                            raise _unreadable(entry, f"layer {n} is {got}, but its config says {diff_id}")
                        unpacked += size
                        tar.addfile(_info(names[n], spool.tell()), _rewound(spool))
                finally:
                    remove(scratch)
    return {"image_id": "sha256:" + hashlib.sha256(config_bytes).hexdigest(), "platform": found,
            "layers": len(layers), "archive_bytes": out.size, "archive_sha256": out.sha.hexdigest(),
            "unpacked_bytes": unpacked}


def _rewound(handle: IO[bytes]) -> IO[bytes]:
    handle.seek(0)
    return handle


def _member(tar: Any, name: str) -> IO[bytes]:
    handle = tar.extractfile(name)
    if handle is None:
        raise KeyError(f"{name} is not a file in the export")
    return handle


def _info(name: str, size: int) -> Any:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o444, 0, 0, 0
    return info


def _add(tar: Any, name: str, data: bytes) -> None:
    import io

    tar.addfile(_info(name, len(data)), io.BytesIO(data))


# --- the size report ------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _short(identity: str) -> str:
    return identity.split(":", 1)[-1][:12]


def _cost(item: dict[str, Any]) -> str:
    return (f"{_mb(item['archive_bytes'])} archive in the initramfs and the root (gzip layers), "
            f"{_mb(item['unpacked_bytes'])} in /var/lib/docker once loaded")


def size_report(folder: Path, initramfs: Path | None = None) -> list[str]:
    """Lines that say what each embedded image costs (archive: initramfs and root RAM; unpacked:
    /var/lib/docker RAM) and, given the initramfs, how much of it they are."""
    record = read_record(folder)
    if not record or not record["images"]:
        return []
    images = record["images"]
    total = sum(i["archive_bytes"] for i in images)
    unpacked = sum(i["unpacked_bytes"] for i in images)
    lines = [f"size report: embedded {i['name']} ({_short(i['image_id'])}, {i['layers']} layers): {_cost(i)}"
             for i in images]
    of = ""
    if initramfs is not None and initramfs.is_file():
        size = initramfs.stat().st_size
        of = f" of {initramfs.name}'s {_mb(size)} ({100 * total / size:.0f}%)"
    lines.append(f"size report: {len(images)} embedded image(s): {_mb(total)}{of}; RAM at boot: +{_mb(total)} "
                 f"root (tmpfs), +{_mb(unpacked)} /var/lib/docker")
    return lines


def clean(folder: Path) -> None:
    """`doit clean embed`: the archives' folder and embed.yaml too (whatever the list is now)."""
    shutil.rmtree(folder / STORE, ignore_errors=True)
    remove(folder / CONFIG)
