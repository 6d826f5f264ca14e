"""Initramfs convert engine: stream any initramfs the kernel accepts into one canonical,
validated, deduplicated, reproducible cpio newc archive, compressed with parallel gzip or zstd.

Input: gzip (one or several members), zstd, xz or uncompressed; cpio newc, crc or odc; several
archives in a row, as the kernel reads them. Nothing is extracted: names never touch the file
system. Pass 1 streams the input once, validates every header and spools regular-file data into
one anonymous temporary file; pass 2 writes the entries sorted (parents first) from that spool.
Memory holds only the entries' metadata. An input that starts with an uncompressed early-load
archive (microcode, ACPI tables under kernel/) keeps it: it is written first, uncompressed.

    python -m tasks.initramfs repack INPUT OUTPUT [--compression gzip|zstd] [--level N] [--merge-early]
                                                  [--no-reuse]
    python -m tasks.initramfs list INPUT
    python -m tasks.initramfs verify INPUT [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import mmap
import os
import queue
import stat
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from zlib_ng import zlib_ng

from tasks import cpio
from tasks.errors import HookError
from tasks.run import log_step

try:
    from compression import zstd  # Python 3.14+
except ImportError:
    from backports import zstd

CHUNK = 1 << 20
#: Parallel deflate blocks end at places chosen by the content, never by the cores: before an
#: entry whose name hashes to 0 mod MARK_EVERY and every BODY_MARK bytes into a large file's data,
#: once the block holds GZIP_BLOCK_MIN bytes; at GZIP_BLOCK_MAX in any case. So a changed, added or
#: removed file changes only the blocks around it, and the next repack copies the others from its
#: previous output instead of compressing them again (_OldBlocks).
GZIP_BLOCK_MIN = 64 << 10
GZIP_BLOCK_MAX = 2 << 20
BODY_MARK = 1 << 20
MARK_EVERY = 16
#: What a compressed block's bytes depend on besides its input: the deflate library and its version.
DEFLATE_ID = f"zlib-ng {zlib_ng.ZLIBNG_RUNTIME_VERSION}"
#: How much of a file's start and end quick_check hashes.
EDGE = 64 << 10
COMPRESSIONS = {"gzip": range(1, 10), "zstd": range(1, 20)}

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
#: Formats the kernel knows but this engine does not read: name them in the error.
UNSUPPORTED = {b"BZh": "bzip2", b"\x02\x21\x4c\x18": "lz4", b"\x89LZO": "lzo", b"\x5d\x00\x00": "lzma"}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------
# Reading: byte sources, decompressors, the cpio scanner
# ---------------------------------------------------------------------------------------------


class _Source:
    """Buffered reads with look-ahead and push-back over a read(n) callable; pos counts consumed bytes."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._buf = b""
        self._off = 0
        self.pos = 0

    def _fill(self, n: int) -> int:
        have = len(self._buf) - self._off
        if have >= n:
            return have
        parts = [self._buf[self._off:]]
        while have < n:
            chunk = self._read(max(n - have, CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self._buf = b"".join(parts)
        self._off = 0
        return have

    def peek(self, n: int) -> bytes:
        self._fill(n)
        return self._buf[self._off:self._off + n]

    def read(self, n: int) -> bytes:
        """Up to n bytes: what is buffered, or one more chunk; b'' only at the end."""
        if self._off >= len(self._buf):
            self._fill(1)
        data = self._buf[self._off:self._off + n]
        self._off += len(data)
        self.pos += len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        """n bytes, or fewer only at the end of the source."""
        self._fill(n)
        data = self._buf[self._off:self._off + n]
        self._off += len(data)
        self.pos += len(data)
        return data

    def unread(self, data: bytes) -> None:
        if data:
            self._buf = data + self._buf[self._off:]
            self._off = 0
            self.pos -= len(data)

    def skip_zeros(self) -> int:
        """Consume NUL padding (the kernel skips it between archives); return how much."""
        skipped = 0
        while self._fill(1):
            view = self._buf[self._off:]
            rest = view.lstrip(b"\0")
            n = len(view) - len(rest)
            self._off += n
            self.pos += n
            skipped += n
            if rest:
                break
        return skipped


class _Budget:
    """Counts uncompressed bytes read; the guard against decompression bombs."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.total = 0

    def add(self, n: int, where: str) -> None:
        self.total += n
        if self.limit is not None and self.total > self.limit:
            raise HookError(
                f"input expands beyond the limit of {self.limit} bytes ({where}): a decompression bomb "
                "or a bigger initramfs than expected; raise --max-output-bytes if it is genuine"
            )


class _Decoder:
    """Decompressed bytes of one compressed stream: gzip members, zstd frames or xz streams in a row."""

    def __init__(self, raw: _Source, kind: str, budget: _Budget) -> None:
        self.raw = raw
        self.kind = kind
        self.start = raw.pos
        self.budget = budget
        self.done = False
        self._tail = b""
        self._magic = {"gzip": GZIP_MAGIC, "zstd": ZSTD_MAGIC, "xz": XZ_MAGIC}[kind]
        self._d = self._new()

    def _new(self) -> zlib_ng._Decompress | zstd.ZstdDecompressor | lzma.LZMADecompressor:
        if self.kind == "gzip":
            return zlib_ng.decompressobj(31)
        if self.kind == "zstd":
            return zstd.ZstdDecompressor()
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    @property
    def label(self) -> str:
        return f"{self.kind} stream at input byte {self.start}"

    def read(self, n: int) -> bytes:
        while not self.done:
            out = self._step(n)
            if out:
                self.budget.add(len(out), f"{self.label}, input byte {self.raw.pos}")
                return out
        return b""

    def _step(self, n: int) -> bytes:
        d = self._d
        try:
            if isinstance(d, zlib_ng._Decompress):
                data = self._tail or self.raw.read(CHUNK)
                if not data:
                    raise self._truncated()
                out = d.decompress(data, n)
                self._tail = d.unconsumed_tail
            else:
                data = b""
                if d.needs_input:
                    data = self.raw.read(CHUNK)
                    if not data:
                        raise self._truncated()
                out = d.decompress(data, max_length=n)
        except (zlib_ng.error, zstd.ZstdError, lzma.LZMAError) as exc:
            what = "CRC or data error" if "check" in str(exc) else "corrupt data"
            raise HookError(
                f"{self.label}: {what} near input byte {self.raw.pos} ({exc}); the file is damaged: "
                "rebuild or re-download it"
            ) from None
        if d.eof:
            self._tail = b""  # zlib leaves the rest in both unconsumed_tail and unused_data
            self.raw.unread(d.unused_data)
            if self.raw.peek(len(self._magic)) == self._magic:
                self._d = self._new()
            else:
                self.done = True
        return out

    def _truncated(self) -> HookError:
        return HookError(
            f"{self.label} is truncated at input byte {self.raw.pos}: the file is incomplete; "
            "rebuild or re-download it"
        )


class _Prefetch:
    """read(CHUNK) of a decoder, run in a thread up to DEPTH chunks ahead of the reader, so that
    decompression (zlib-ng, zstd and lzma release the GIL) overlaps parsing and spooling.
    An error reaches the reader in its place in the stream; close() stops the thread."""

    DEPTH = 8

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="decompress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._read(CHUNK)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int) -> bytes:
        """The next decoded chunk (its size is the decoder's, whatever n is); b'' at the end."""
        if self._ended:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item:
            self._ended = True
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _compression_of(head: bytes, offset: int) -> str:
    for magic, kind in ((GZIP_MAGIC, "gzip"), (ZSTD_MAGIC, "zstd"), (XZ_MAGIC, "xz")):
        if head.startswith(magic):
            return kind
    for magic, kind in UNSUPPORTED.items():
        if head.startswith(magic):
            raise HookError(f"{kind} data at input byte {offset} is not supported: decompress it first, "
                            "or rebuild with gzip, zstd or xz")
    raise HookError(f"unknown data {head[:6]!r} at input byte {offset}: not a cpio archive nor gzip, zstd "
                    "or xz; is this an initramfs?")


@dataclass(slots=True, eq=False)
class _Entry:
    """One cpio entry as read (name normalised), later annotated for output."""

    raw_name: bytes
    name: bytes
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    size: int
    rdevmajor: int
    rdevminor: int
    #: (archive, devmajor, devminor, ino, mode) of a regular file with nlink >= 2: the kernel's hardlink key.
    link_key: tuple[int, int, int, int, int] | None
    #: Offset of the data in the spool, -1 when none was stored.
    data: int
    target: bytes
    where: str
    #: Which archive of the input (1 = the first) the entry came from.
    archive: int = 0
    ino: int = 0
    store: bool = True

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


def _normalise(raw: bytes, where: str) -> bytes:
    """Relative name without leading '/' or './', no empty or '.' components; '.' for the root."""
    if not raw:
        raise HookError(f"entry {where} has an empty name; fix the tool that made the archive")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise HookError(f"entry {where} has a '..' component: refused, it could write outside the root; "
                        "fix the archive")
    return b"/".join(parts) or b"."


class _Scanner:
    """Pass 1: read every archive of an input file, validate each entry, spool regular-file data."""

    def __init__(self, src: Path, *, spool: BinaryIO | None, limit: int | None,
                 progress: _Progress | None = None) -> None:
        self.src = src
        self.spool = spool
        self.spooled = 0
        self.budget = _Budget(limit)
        self.progress = progress
        self.archives = 0
        #: Numbers of the archives read straight from the file, not from a compressed stream.
        self.plain_archives: set[int] = set()
        self.streams: list[str] = []
        self.bytes_in = 0
        self.raw = _Source(lambda n: b"")

    def entries(self) -> Iterator[_Entry]:
        try:
            fh = open(self.src, "rb")  # noqa: SIM115 - closed below, also when the generator is dropped
        except OSError as exc:
            raise HookError(f"cannot read input {self.src}: {exc.strerror}") from None
        with fh:
            self.bytes_in = os.fstat(fh.fileno()).st_size
            raw = self.raw = _Source(fh.read)
            while True:
                raw.skip_zeros()
                head = raw.peek(6)
                if not head:
                    break
                if head.startswith(b"0707"):
                    self.streams.append("cpio")
                    self.plain_archives.add(self.archives + 1)
                    yield from self._archive(raw, "input byte {}", base=raw.pos, size=self.bytes_in)
                    continue
                kind = _compression_of(head, raw.pos)
                self.streams.append(kind)
                dec = _Decoder(raw, kind, self.budget)
                ahead = _Prefetch(dec.read)  # raw is the decoder's alone until it ends
                try:
                    stream = _Source(ahead.read)
                    label = f"byte {{}} of the {dec.label}"
                    while True:
                        stream.skip_zeros()
                        if not stream.peek(1):
                            break
                        yield from self._archive(stream, label, base=stream.pos, size=None)
                finally:
                    ahead.close()
        if self.archives == 0:
            raise HookError(f"{self.src} holds no cpio archive: is it an initramfs?")

    def _archive(self, src: _Source, label: str, *, base: int, size: int | None) -> Iterator[_Entry]:
        """Entries of one archive, up to and including its trailer; base is the archive's start."""
        self.archives += 1
        archive = self.archives
        prev = "the start of the archive"
        while True:
            where = label.format(src.pos)
            magic = src.peek(6)
            if magic in (cpio.NEWC, cpio.CRC):
                hsize, parse = cpio.NEWC_HEADER, cpio.parse_newc
            elif magic == cpio.ODC:
                hsize, parse = cpio.ODC_HEADER, cpio.parse_odc
            elif len(magic) < 6:
                raise HookError(f"archive ends without {cpio.TRAILER.decode()} at {where}, after {prev}: "
                                "the input is truncated; rebuild it")
            else:
                raise HookError(f"bad magic {magic!r} at {where}, after {prev}: not a cpio newc/crc/odc "
                                "header; the input is corrupt")
            buf = src.read_exact(hsize)
            if len(buf) < hsize:
                raise HookError(f"truncated cpio header at {where}, after {prev}: the input is incomplete")
            try:
                h = parse(buf)
            except ValueError as exc:
                raise HookError(f"bad cpio header at {where}, after {prev}: {exc}") from None
            if h.namesize > cpio.PATH_MAX:
                raise HookError(f"entry at {where} has a name of {h.namesize} bytes, over PATH_MAX "
                                f"({cpio.PATH_MAX}): the kernel would skip it; the archive is corrupt")
            name = src.read_exact(h.namesize)
            if len(name) < h.namesize:
                raise HookError(f"name of the entry at {where} is truncated (namesize {h.namesize}, "
                                f"{len(name)} bytes left): the input is incomplete")
            if h.namesize == 0 or name[-1] != 0 or b"\0" in name[:-1]:
                raise HookError(f"entry at {where} has a malformed name {name[:64]!r} (namesize "
                                f"{h.namesize}): must be NUL-terminated, without NUL inside")
            raw_name = name[:-1]
            if h.aligned:
                src.read_exact(cpio.pad4(src.pos - base))
            if raw_name == cpio.TRAILER:
                src.read_exact(h.filesize + (cpio.pad4(h.filesize) if h.aligned else 0))
                return
            shown = f"{_show(raw_name)!r} ({where})"
            entry = self._entry(src, h, raw_name, shown, archive, None if size is None else size - src.pos)
            if h.aligned:
                src.read_exact(cpio.pad4(src.pos - base))
            prev = f"entry {shown}"
            if self.progress and self.progress.due("read"):
                self.progress.show(f"read {_mib(self.raw.pos)} of {_mib(self.bytes_in)} in, "
                                   f"{_mib(self.spooled)} of file data")
            yield entry

    def _entry(self, src: _Source, h: cpio.Header, raw_name: bytes, shown: str, archive: int,
               left: int | None) -> _Entry:
        kind = stat.S_IFMT(h.mode)
        if kind not in cpio.TYPES or h.mode > 0o177777:
            raise HookError(f"entry {shown} has an unknown file type (mode {h.mode:#o}): the archive is corrupt")
        name = _normalise(raw_name, shown)
        size = h.filesize
        if max(size, h.mtime) > 0xFFFFFFFF:
            raise HookError(f"entry {shown} has a size or mtime over 32 bits (odc allows it, newc cannot "
                            "hold it): fix the archive")
        if kind == stat.S_IFLNK and not 0 < size <= cpio.PATH_MAX:
            raise HookError(f"symlink {shown} has a target of {size} bytes: must be 1..{cpio.PATH_MAX}")
        if kind not in (stat.S_IFREG, stat.S_IFLNK) and size:
            raise HookError(f"entry {shown} is {cpio.TYPE_NAMES[kind]} with {size} bytes of data: only "
                            "files and symlinks carry data; the archive is corrupt")
        if left is not None and size > left:
            raise HookError(f"entry {shown} declares {size} bytes of data but the input has only "
                            f"{left} left: the input is truncated or the header corrupt")
        if self.budget.limit is not None and size > self.budget.limit:
            raise HookError(f"entry {shown} declares {size} bytes of data, over the limit of "
                            f"{self.budget.limit}: raise --max-output-bytes if it is genuine")
        target = b""
        data = -1
        if kind == stat.S_IFLNK:
            target = src.read_exact(size)
            if len(target) < size:
                raise HookError(f"symlink target of {shown} is truncated: the input is incomplete")
            total = 0  # GNU cpio sums regular files only
        else:
            total, data = self._copy(src, size, shown, crc=h.magic == cpio.CRC)
        if left is not None:
            self.budget.add(size, shown)  # decoded streams count themselves
        if h.magic == cpio.CRC and total & 0xFFFFFFFF != h.check:
            raise HookError(f"entry {shown} fails its crc-format checksum ({total & 0xFFFFFFFF:#x} != "
                            f"{h.check:#x}): the data is corrupt")
        link_key = None
        if kind == stat.S_IFREG and h.nlink >= 2:
            link_key = (archive, h.devmajor, h.devminor, h.ino, h.mode)
        return _Entry(raw_name, name, h.mode, h.uid, h.gid, h.nlink, h.mtime, size, h.rdevmajor,
                      h.rdevminor, link_key, data, target, shown, archive)

    def _copy(self, src: _Source, size: int, shown: str, *, crc: bool) -> tuple[int, int]:
        """Move size bytes of file data to the spool; return (byte sum for crc, spool offset)."""
        offset = self.spooled if self.spool is not None and size else -1
        total = 0
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, CHUNK))
            if not chunk:
                raise HookError(f"data of entry {shown} is truncated: {size} bytes declared, "
                                f"{size - remaining} present; the input is incomplete")
            remaining -= len(chunk)
            if self.spool is not None:
                self.spool.write(chunk)
            if crc:
                total += sum(chunk)
        if offset >= 0:
            self.spooled += size
        return total, offset


# ---------------------------------------------------------------------------------------------
# Planning: last name wins, parents first, hardlinks and dedup
# ---------------------------------------------------------------------------------------------


@dataclass
class _Tree:
    order: list[_Entry]
    duplicates: list[bytes]
    parents_added: int


def _sort_key(entry: _Entry) -> list[bytes]:
    return [] if entry.name == b"." else entry.name.split(b"/")


def _resolve(entries: list[_Entry]) -> _Tree:
    """Keep the last entry of each name (as the kernel does), add missing parent directories, give
    hardlinked files their group's data, sort parents before children."""
    by_name: dict[bytes, _Entry] = {}
    duplicates: list[bytes] = []
    for entry in entries:
        if entry.name in by_name:
            duplicates.append(entry.name)
        by_name[entry.name] = entry
    root = by_name.get(b".")
    if root is not None and root.kind != stat.S_IFDIR:
        raise HookError(f"entry {root.where} names the root but is not a directory; fix the archive")

    links: dict[tuple[int, int, int, int, int], _Entry] = {}
    for entry in entries:
        if entry.link_key is not None and by_name[entry.name] is entry and entry.size:
            links[entry.link_key] = entry  # the kernel: the last member with data wins
    for entry in by_name.values():
        if entry.link_key is not None and (owner := links.get(entry.link_key)) is not None:
            entry.size, entry.data = owner.size, owner.data

    added = 0
    for name in list(by_name):
        child = by_name[name]
        parent_name = name.rpartition(b"/")[0]
        while parent_name:
            parent = by_name.get(parent_name)
            if parent is None:
                by_name[parent_name] = _Entry(parent_name, parent_name, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0,
                                              0, 0, None, -1, b"", "added: missing parent directory")
                added += 1
            elif parent.kind != stat.S_IFDIR:
                raise HookError(f"entry {child.where}: its parent {parent.where} is "
                                f"{cpio.TYPE_NAMES[parent.kind]}, not a directory; fix the archive")
            else:
                break
            child = by_name[parent_name]
            parent_name = parent_name.rpartition(b"/")[0]
    return _Tree(sorted(by_name.values(), key=_sort_key), duplicates, added)


#: Names an early-load archive may hold besides `kernel` and `kernel/...`: the root, which Debian's
#: and dracut's early archives carry, and dracut's (and genkernel's) marker file.
EARLY_EXTRA = (b".", b"early_cpio")


def _is_early(name: bytes) -> bool:
    return name == b"kernel" or name.startswith(b"kernel/") or name in EARLY_EXTRA


def _early_cut(entries: list[_Entry], plain: set[int]) -> tuple[int, str]:
    """How many leading entries form the early-load part of the input, and why an uncompressed
    first archive is not early-load ('' when there is none, or when it is).

    The kernel's early microcode loader and ACPI table override (lib/earlycpio.c) read only the
    uncompressed cpio archives at the very start of the initrd. The early part is the leading run
    of archives read straight from the file (not from a compressed stream) whose entries are all
    `kernel`, under `kernel/`, the root or dracut's `early_cpio` marker, with at least one of the
    first two. Entries come in archive order, so that part is a prefix of entries.
    """
    cut = 0
    archive = 1
    while archive in plain:
        end = cut
        while end < len(entries) and entries[end].archive == archive:
            end += 1
        stray = next((e for e in entries[cut:end] if not _is_early(e.name)), None)
        if stray is not None:
            if archive == 1:
                return 0, f"its entry {stray.where} is not under kernel/, so it is not early-load content"
            break
        cut = end
        archive += 1
    if cut and not any(e.name not in EARLY_EXTRA for e in entries[:cut]):
        return 0, "it holds nothing under kernel/"
    return cut, ""


@dataclass
class _Plan:
    order: list[_Entry]
    size: int
    dedup_saved: int
    dedup_files: int


def _stable_ino(name: bytes, used: set[int]) -> int:
    """An inode number from the name, unique in the archive (the next free one on a clash).

    Not a running count: a file added or removed then changes no other entry's header, so the
    compressed blocks around the rest of the archive stay the same (see _GzipWriter's reuse).
    Only hardlinks (nlink >= 2) share a number, as the kernel and cpio read it.
    """
    ino = zlib_ng.crc32(name) & 0x7FFFFFFF or 1
    while ino in used:
        ino = ino % 0x7FFFFFFF + 1
    used.add(ino)
    return ino


def _plan(tree: _Tree, *, dedup: bool, spool: memoryview, links: bool = True) -> _Plan:
    """Group regular files into output hardlinks, number inodes, size the output.

    links=False (the early-load archive): every file is its own inode carrying its own data. The
    early loader reads the data stored under the name it looks for, so a hardlink whose data sits
    on another name would look empty to it.
    """
    groups: dict[tuple, list[_Entry]] = {}
    for entry in tree.order:
        if entry.kind != stat.S_IFREG or not links:
            continue
        meta = (entry.mode, entry.uid, entry.gid, entry.mtime)
        if dedup and entry.size:
            groups.setdefault(("content", entry.size, *meta), []).append(entry)
        elif entry.link_key is not None:
            groups.setdefault(("link", entry.link_key, *meta), []).append(entry)

    # Files of one size and metadata are told apart by a hash of their data, hashed on all cores
    # (hashlib releases the GIL).
    split = {key for key, members in groups.items() if key[0] == "content" and len({m.data for m in members}) > 1}
    spans = sorted({(m.data, m.size) for key in split for m in groups[key]})
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        hashes = dict(zip((at for at, _ in spans),
                          pool.map(lambda span: hashlib.sha256(spool[span[0]:span[0] + span[1]]).digest(), spans),
                          strict=True))
    final: list[list[_Entry]] = []
    for key, members in groups.items():
        if key in split:
            digests: dict[bytes, list[_Entry]] = {}
            for m in members:
                digests.setdefault(hashes[m.data], []).append(m)
            final.extend(digests.values())
        else:
            final.append(members)

    saved = files = 0
    group_of: dict[int, list[_Entry]] = {}
    for members in final:
        if len(members) < 2:
            continue
        stored = len({m.data for m in members})
        saved += members[0].size * (stored - 1)
        files += stored - 1
        for m in members:
            group_of[id(m)] = members

    used: set[int] = set()
    size = 0
    for entry in tree.order:
        members = group_of.get(id(entry))
        if members is not None and members[0] is not entry:
            entry.ino = members[0].ino
        else:
            entry.ino = _stable_ino(entry.name, used)
        kind = entry.kind
        if kind == stat.S_IFREG:
            entry.nlink = len(members) if members else 1
            entry.store = members is None or members[-1] is entry
        elif kind != stat.S_IFDIR:
            entry.nlink = 1
        body = entry.size if (kind == stat.S_IFREG and entry.store) or kind == stat.S_IFLNK else 0
        head = cpio.NEWC_HEADER + len(entry.name) + 1
        size += head + cpio.pad4(head) + body + cpio.pad4(body)
    size += len(cpio.trailer())
    size += -size % 512
    return _Plan(tree.order, size, saved, files)


# ---------------------------------------------------------------------------------------------
# Writing: parallel gzip, zstd, the newc stream
# ---------------------------------------------------------------------------------------------


def _deflate(block: memoryview | bytes, zdict: memoryview | bytes, level: int, last: bool) -> tuple[bytes, int]:
    if zdict:
        comp = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15, 8, zlib_ng.Z_DEFAULT_STRATEGY, zdict)
    else:
        comp = zlib_ng.compressobj(level, zlib_ng.DEFLATED, -15)
    out = comp.compress(block) + comp.flush(zlib_ng.Z_FINISH if last else zlib_ng.Z_SYNC_FLUSH)
    return out, zlib_ng.crc32(block)


def _block_key(block: memoryview | bytes, zdict: memoryview | bytes, level: int, last: bool) -> str:
    """Everything a block's compressed bytes depend on, hashed."""
    digest = hashlib.sha256(f"{DEFLATE_ID}/{level}/{int(last)}/{len(zdict)}/".encode())
    digest.update(zdict)
    digest.update(block)
    return digest.hexdigest()[:32]


class _OldBlocks:
    """The compressed blocks of the previous output at the same path, found by their keys.

    Read through a descriptor opened before the new output replaces it. A block is used only when
    its key matches, its length is the recorded one and its compressed bytes still have the
    recorded CRC; anything else is compressed afresh, so the output bytes never depend on it.
    """

    def __init__(self, fd: int, blocks: dict[str, tuple[int, int, int, int, int]]) -> None:
        self.fd = fd
        self.blocks = blocks

    @classmethod
    def open(cls, dst: Path) -> _OldBlocks | None:
        try:
            record = json.loads(check_path(dst).read_text())
            fd = os.open(dst, os.O_RDONLY | os.O_NONBLOCK)  # never waits on a FIFO
        except (OSError, ValueError):
            return None
        try:
            st = os.fstat(fd)
            if (stat.S_ISREG(st.st_mode) and record.get("format") == "hook-initramfs-check/1"
                    and record.get("compression") == "gzip"
                    and st.st_size == record["size"] and st.st_mtime_ns == record["mtime_ns"]):
                blocks = {str(b[0]): (int(b[1]), int(b[2]), int(b[3]), int(b[4]), int(b[5]))
                          for b in record.get("blocks", [])}
                if blocks:
                    return cls(fd, blocks)
        except (OSError, KeyError, TypeError, ValueError, IndexError, AttributeError):
            pass
        os.close(fd)
        return None

    def get(self, key: str, length: int) -> tuple[bytes, int] | None:
        """(compressed bytes, CRC of the uncompressed block) of a previous block, or None."""
        found = self.blocks.get(key)
        if found is None:
            return None
        offset, clen, ccrc, ulen, ucrc = found
        if ulen != length or clen <= 0:
            return None
        try:
            data = os.pread(self.fd, clen, offset)
        except (OSError, ValueError, OverflowError):
            return None
        if len(data) != clen or zlib_ng.crc32(data) != ccrc:
            return None
        return data, ucrc

    def close(self) -> None:
        os.close(self.fd)


def _block_job(block: memoryview | bytes, zdict: memoryview | bytes, level: int, last: bool,
               old: _OldBlocks | None) -> tuple[bytes, int, str, int, bool]:
    """In a worker thread: (compressed, CRC of block, key, CRC of compressed, reused)."""
    key = _block_key(block, zdict, level, last)
    hit = old.get(key, len(block)) if old is not None else None
    if hit is not None:
        out, crc = hit
        reused = True
    else:
        out, crc = _deflate(block, zdict, level, last)
        reused = False
    return out, crc, key, zlib_ng.crc32(out), reused


class _GzipWriter:
    """One standard gzip member made like pigz: blocks deflated in parallel, each primed with the
    previous block's last 32 KiB and ended by a sync flush. Header mtime 0, no name.

    Blocks end at content-defined marks (see GZIP_BLOCK_MIN): the caller calls mark() where one
    may end. Each block's key, place and CRCs are kept in .blocks for the check record, and
    blocks that old (the previous output) holds are copied from it instead of compressed.
    """

    HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"

    def __init__(self, fh: BinaryIO, level: int, threads: int, old: _OldBlocks | None = None) -> None:
        self.fh = fh
        self.level = level
        self.old = old
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deflate")
        self.inflight: deque[tuple[Future[tuple[bytes, int, str, int, bool]], int]] = deque()
        self.depth = 2 * threads
        self.parts: list[memoryview] = []
        self.pending = 0
        self.prev: memoryview | bytes = b""
        self.crc = 0
        self.size = 0
        self.blocks: list[list[str | int]] = []
        self.reused = 0
        fh.write(self.HEADER)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Take data; the caller must not change it afterwards (blocks may be views of it)."""
        view = memoryview(data)
        while len(view):
            take = min(GZIP_BLOCK_MAX - self.pending, len(view))
            self.parts.append(view[:take])
            self.pending += take
            view = view[take:]
            if self.pending == GZIP_BLOCK_MAX:
                self._cut(last=False)

    def mark(self) -> None:
        """A block may end here."""
        if self.pending >= GZIP_BLOCK_MIN:
            self._cut(last=False)

    def _cut(self, *, last: bool) -> None:
        parts, self.parts, self.pending = self.parts, [], 0
        block = memoryview(parts[0] if len(parts) == 1 else b"".join(parts))
        job = self.pool.submit(_block_job, block, self.prev[-32768:], self.level, last, self.old)
        self.inflight.append((job, len(block)))
        self.prev = block
        while len(self.inflight) > self.depth:
            self._drain_one()

    def _drain_one(self) -> None:
        future, length = self.inflight.popleft()
        out, crc, key, ccrc, reused = future.result()
        self.blocks.append([key, self.fh.tell(), len(out), ccrc, length, crc])
        self.reused += reused
        self.fh.write(out)
        self.crc = zlib_ng.crc32_combine(self.crc, crc, length)
        self.size += length

    def close(self) -> None:
        try:
            self._cut(last=True)
            while self.inflight:
                self._drain_one()
            self.fh.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
        finally:
            self.prev = b""
            self.parts = []
            self.pool.shutdown(wait=True, cancel_futures=True)


class _ZstdWriter:
    """One zstd frame with content size and checksum; multi-threaded zstd output does not depend
    on the number of workers, so it stays reproducible."""

    def __init__(self, fh: BinaryIO, level: int, threads: int, size: int) -> None:
        self.fh = fh
        p = zstd.CompressionParameter
        self.comp = zstd.ZstdCompressor(options={
            p.compression_level: level, p.nb_workers: threads, p.checksum_flag: 1, p.content_size_flag: 1,
        })
        self.comp.set_pledged_input_size(size)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.fh.write(self.comp.compress(data))

    def close(self) -> None:
        self.fh.write(self.comp.flush())


def _emit(plan: _Plan, spool: memoryview, write: Callable[[bytes | bytearray | memoryview], None],
          progress: _Progress | None, out: BinaryIO, mark: Callable[[], None] | None = None) -> None:
    """Write the newc stream of plan to write(), in CHUNK-sized pieces (file data as spool views);
    call mark() where a compressed block may end (see GZIP_BLOCK_MIN)."""
    buf = bytearray()
    done = 0
    for entry in plan.order:
        if mark is not None and zlib_ng.crc32(entry.name) % MARK_EVERY == 0:
            if buf:
                write(buf)
                done += len(buf)
                buf = bytearray()
            mark()
        kind = entry.kind
        body: bytes | memoryview = b""
        if kind == stat.S_IFREG and entry.store:
            body = spool[entry.data:entry.data + entry.size]
        elif kind == stat.S_IFLNK:
            body = entry.target
        buf += cpio.newc_entry_header(
            entry.name, ino=entry.ino, mode=entry.mode, uid=entry.uid, gid=entry.gid, nlink=entry.nlink,
            mtime=entry.mtime, filesize=len(body), rdevmajor=entry.rdevmajor, rdevminor=entry.rdevminor,
        )
        if len(body) >= CHUNK // 4:
            write(buf)
            for offset in range(0, len(body), BODY_MARK):
                if offset and mark is not None:
                    mark()
                write(body[offset:offset + BODY_MARK])
            done += len(buf) + len(body)
            buf = bytearray(b"\0" * cpio.pad4(len(body)))
        else:
            buf += body
            buf += b"\0" * cpio.pad4(len(body))
        if len(buf) >= CHUNK:
            write(buf)
            done += len(buf)
            buf = bytearray()
        if progress and progress.due("write"):
            progress.show(f"write {_mib(done)} of {_mib(plan.size)} uncompressed, {_mib(out.tell())} out")
    buf += cpio.trailer()
    buf += b"\0" * (plan.size - done - len(buf))
    write(buf)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepackStats:
    """What repack did."""

    entries: int
    bytes_in: int
    bytes_out: int
    uncompressed: int
    dedup_saved_bytes: int
    dedup_files: int
    duplicates: int
    parents_added: int
    seconds: float
    #: Entries and bytes of the uncompressed early-load archive written first (0 when none).
    early_entries: int = 0
    early_bytes: int = 0
    #: Why an uncompressed first archive was merged into the compressed one ('' when none was).
    early_note: str = ""
    #: gzip: the deflate blocks written, and how many of them were copied from the previous output.
    blocks: int = 0
    reused_blocks: int = 0

    def __str__(self) -> str:
        compressed = self.bytes_out - self.early_bytes
        ratio = self.uncompressed / compressed if compressed > 0 else 0.0
        early = ""
        if self.early_entries:
            early = (f", early-load archive first (uncompressed): {self.early_entries} of the entries, "
                     f"{self.early_bytes} bytes")
        elif self.early_note:
            early = f", uncompressed first archive merged ({self.early_note})"
        reused = f", {self.reused_blocks} of {self.blocks} blocks unchanged (copied)" if self.reused_blocks else ""
        return (
            f"{self.entries} entries, {_mib(self.bytes_in)} in -> {_mib(self.bytes_out)} out "
            f"(cpio {_mib(self.uncompressed)}, ratio {ratio:.2f}), dedup saved "
            f"{_mib(self.dedup_saved_bytes)} in {self.dedup_files} files, {self.duplicates} duplicate "
            f"names, {self.parents_added} parents added{early}{reused}, {self.seconds:.1f}s"
        )


@dataclass(frozen=True)
class VerifyStats:
    """What verify found in a well-formed input."""

    entries: int
    archives: int
    streams: tuple[str, ...]
    uncompressed: int
    duplicates: int
    missing_parents: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"ok: {self.entries} entries in {self.archives} archive(s) ({'+'.join(self.streams)}), "
            f"{_mib(self.uncompressed)} uncompressed, {self.duplicates} duplicate names, "
            f"{self.missing_parents} missing parent directories, {self.seconds:.1f}s"
        )


class _Progress:
    """Bytes in/out on one rewritten stderr line, at most a few times a second."""

    def __init__(self) -> None:
        self.last = 0.0
        self.phase = ""
        self.shown = False

    def due(self, phase: str) -> bool:
        """True when a new phase starts or the line is a quarter of a second old."""
        now = time.monotonic()
        if phase == self.phase and now - self.last < 0.25:
            return False
        self.last = now
        self.phase = phase
        return True

    def show(self, text: str) -> None:
        self.shown = True
        print(f"\rhook: {text}   ", end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)


def check_path(path: Path) -> Path:
    """The small record beside an output that lets quick_check vouch for it cheaply."""
    path = Path(path)
    return path.with_name(f".{path.name}.check.json")


def _check_options(compression: str, level: int) -> None:
    levels = COMPRESSIONS.get(compression)
    if levels is None:
        raise HookError(f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
    if level not in levels:
        raise HookError(f"{compression} level {level} is out of range {levels.start}..{levels.stop - 1}")


def _spool_view(spool: BinaryIO, size: int) -> tuple[mmap.mmap | None, memoryview]:
    if not size:
        return None, memoryview(b"")
    mm = mmap.mmap(spool.fileno(), size, prot=mmap.PROT_READ)
    return mm, memoryview(mm)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _edges(fh: BinaryIO, size: int) -> tuple[bytes, bytes]:
    head = fh.read(EDGE)
    fh.seek(max(0, size - EDGE))
    return head, fh.read(EDGE)


def _write_check(dst: Path, compression: str, entries: int, uncompressed: int, early: int,
                 blocks: list[list[str | int]]) -> None:
    st = dst.stat()
    main_head = b""
    with open(dst, "rb") as fh:
        head, tail = _edges(fh, st.st_size)
        if early:  # where the compressed archive starts: quick_check finds and hashes it there
            fh.seek(early)
            main_head = fh.read(EDGE)
    record: dict[str, object] = {
        "format": "hook-initramfs-check/1",
        "compression": compression,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "head_sha256": hashlib.sha256(head).hexdigest(),
        "tail_sha256": hashlib.sha256(tail).hexdigest(),
        "entries": entries,
        "uncompressed": uncompressed,
        "early": early,
    }
    if early:
        record["main_head_sha256"] = hashlib.sha256(main_head).hexdigest()
    if blocks:  # [key, offset, compressed length, its CRC, length, its CRC]: for the next repack's reuse
        record["blocks"] = blocks
    side = check_path(dst)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, side)


def repack(
    src: Path,
    dst: Path,
    *,
    compression: str = "gzip",
    level: int = 6,
    max_output_bytes: int | None = None,
    dedup: bool = True,
    progress: bool | None = None,
    merge_early: bool = False,
    reuse: bool = True,
) -> RepackStats:
    """Rewrite the initramfs src as one canonical, validated newc archive at dst.

    When src starts with uncompressed early-load archives (kernel/x86/microcode/..., kernel/firmware/
    acpi/...: only what the kernel's early loaders read), their entries are written first as an
    uncompressed newc archive of their own, then the compressed archive of everything else, as the
    kernel expects. merge_early=True merges them into the one compressed archive instead.

    Atomic: writes a temporary file in dst's directory, fsyncs it and renames it over dst; on any
    error neither dst nor a temporary file remains (unless dst is src itself, which is left alone).
    max_output_bytes bounds the uncompressed size read and written (decompression bombs).
    reuse=True (gzip): compressed blocks of the previous output at dst whose input is unchanged are
    copied instead of compressed again; the output is the same bytes either way.
    progress=None shows progress only when stderr is a terminal.
    """
    started = time.monotonic()
    _check_options(compression, level)
    src, dst = Path(src), Path(dst)
    if not dst.parent.is_dir():
        raise HookError(f"output directory {dst.parent} does not exist; create it first")
    same = dst.exists() and src.exists() and os.path.samefile(src, dst)
    show = sys.stderr.isatty() if progress is None else progress
    prog = _Progress() if show else None
    threads = len(os.sched_getaffinity(0))
    log_step(f"repack {src} -> {dst} ({compression} -{level}, {threads} threads{', dedup' if dedup else ''})")
    tmp: str | None = None
    old: _OldBlocks | None = None
    blocks: list[list[str | int]] = []
    reused = 0
    try:
        with tempfile.TemporaryFile(dir=dst.parent, prefix=f".{dst.name}.", suffix=".spool") as spool:
            scanner = _Scanner(src, spool=spool, limit=max_output_bytes, progress=prog)
            entries = list(scanner.entries())
            spool.flush()
            cut, early_note = _early_cut(entries, scanner.plain_archives)
            if cut and merge_early:
                early_note = f"asked by --merge-early; the kernel's early loaders will not see its {cut} entries"
                cut = 0
            early_tree = _resolve(entries[:cut]) if cut else None
            del entries[:cut]
            tree = _resolve(entries)
            del entries
            mm, view = _spool_view(spool, scanner.spooled)
            try:
                early = _plan(early_tree, dedup=False, spool=view, links=False) if early_tree else None
                plan = _plan(tree, dedup=dedup, spool=view)
                early_size = early.size if early else 0
                if max_output_bytes is not None and plan.size + early_size > max_output_bytes:
                    raise HookError(f"output would be {plan.size + early_size} bytes uncompressed, over the "
                                    f"limit of {max_output_bytes}: raise --max-output-bytes if it is genuine")
                fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
                with open(fd, "wb") as fh:
                    os.fchmod(fd, 0o644)
                    if early:  # uncompressed, first: where the kernel's early loaders look
                        _emit(early, view, fh.write, prog, fh)
                    writer: _GzipWriter | _ZstdWriter
                    if compression == "gzip":
                        old = _OldBlocks.open(dst) if reuse else None
                        writer = _GzipWriter(fh, level, threads, old)
                    else:
                        writer = _ZstdWriter(fh, level, threads, plan.size)
                    try:
                        _emit(plan, view, writer.write, prog, fh,
                              writer.mark if isinstance(writer, _GzipWriter) else None)
                    finally:
                        writer.close()
                        if old is not None:
                            old.close()
                    fh.flush()
                    os.fsync(fd)
                    bytes_out = fh.tell()
                    if isinstance(writer, _GzipWriter):
                        blocks, reused = writer.blocks, writer.reused
            finally:
                view.release()
                if mm is not None:
                    mm.close()
        check_path(dst).unlink(missing_ok=True)
        os.replace(tmp, dst)
        tmp = None
        _fsync_dir(dst.parent)
        early_entries = len(early.order) if early else 0
        _write_check(dst, compression, early_entries + len(plan.order), plan.size, early_size, blocks)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not same:
            dst.unlink(missing_ok=True)
            check_path(dst).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise HookError(f"repack {src} -> {dst} failed: {exc}") from None
        raise
    finally:
        if prog:
            prog.end()
    duplicates = (early_tree.duplicates if early_tree else []) + tree.duplicates
    if duplicates:
        names = ", ".join(repr(_show(n)) for n in duplicates[:5])
        log_step(f"warning: {len(duplicates)} duplicate names, the last of each kept (as the kernel "
                 f"does): {names}{', ...' if len(duplicates) > 5 else ''}")
    if early_note:
        log_step(f"note: the uncompressed first archive is merged into the compressed one: {early_note}")
    stats = RepackStats(
        entries=early_entries + len(plan.order), bytes_in=scanner.bytes_in, bytes_out=bytes_out,
        uncompressed=plan.size, dedup_saved_bytes=plan.dedup_saved, dedup_files=plan.dedup_files,
        duplicates=len(duplicates), parents_added=tree.parents_added + (early_tree.parents_added if early_tree else 0),
        seconds=time.monotonic() - started, early_entries=early_entries, early_bytes=early_size,
        early_note=early_note, blocks=len(blocks), reused_blocks=reused,
    )
    log_step(f"repacked {dst.name}: {stats}")
    return stats


def verify(path: Path) -> VerifyStats:
    """Read the whole input as the kernel would and check every header, name, size and checksum;
    raise HookError naming the first problem."""
    started = time.monotonic()
    scanner = _Scanner(Path(path), spool=None, limit=None)
    tree = _resolve(list(scanner.entries()))
    return VerifyStats(
        entries=len(tree.order) - tree.parents_added, archives=scanner.archives,
        streams=tuple(scanner.streams), uncompressed=scanner.budget.total, duplicates=len(tree.duplicates),
        missing_parents=tree.parents_added, seconds=time.monotonic() - started,
    )


def quick_check(path: Path) -> bool:
    """Cheap check (no decompression of the whole file) that path is a complete repack output.

    True only when the check record written by repack matches the file's size, mtime and the
    hashes of its first and last 64 KiB, the compressed archive starts with the recorded
    compression's magic and its first bytes decompress to a newc header, and (gzip) the trailer's
    ISIZE matches. When the output starts with an uncompressed early-load archive, the record
    holds its length: the file must start with a newc header, that archive must end in our
    TRAILER!!! and zero padding, and the first 64 KiB of the compressed archive after it must
    match their hash too. Catches: a missing, truncated, appended-to, replaced or rewritten file
    and half-written temporaries (they have no record). Cannot catch: corruption in the middle of
    the file that keeps its size and mtime (verify() reads everything).
    """
    path = Path(path)
    try:
        record = json.loads(check_path(path).read_text())
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or record.get("format") != "hook-initramfs-check/1":
            return False
        if st.st_size != record["size"] or st.st_mtime_ns != record["mtime_ns"]:
            return False
        early = record.get("early", 0)  # records written before early-load archives have none
        if type(early) is not int or early < 0 or early % 512 or early >= st.st_size:
            return False
        with open(path, "rb") as fh:
            head, tail = _edges(fh, st.st_size)
            main = head
            if early:
                fh.seek(early - min(early, 1024))  # holds all of the trailer entry and its padding
                early_end = fh.read(min(early, 1024))
                main = fh.read(EDGE)
                if hashlib.sha256(main).hexdigest() != record["main_head_sha256"]:
                    return False
                if not head.startswith(cpio.NEWC) or not early_end.rstrip(b"\0").endswith(
                        cpio.trailer().rstrip(b"\0")):
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if hashlib.sha256(head).hexdigest() != record["head_sha256"]:
        return False
    if hashlib.sha256(tail).hexdigest() != record["tail_sha256"]:
        return False
    try:
        if record["compression"] == "gzip":
            if not main.startswith(_GzipWriter.HEADER) or len(tail) < 8:
                return False
            if struct.unpack("<I", tail[-4:])[0] != record["uncompressed"] & 0xFFFFFFFF:
                return False
            first = zlib_ng.decompressobj(31).decompress(main, 6)
        elif record["compression"] == "zstd":
            if not main.startswith(ZSTD_MAGIC):
                return False
            first = zstd.ZstdDecompressor().decompress(main, max_length=6)
        else:
            return False
    except (zlib_ng.error, zstd.ZstdError):
        return False
    return first == cpio.NEWC


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in units else ""
    try:
        value = int(text[: len(text) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 512M, 2G)") from None
    return value * units[unit]


def _list(path: Path) -> int:
    scanner = _Scanner(Path(path), spool=None, limit=None)
    out = sys.stdout
    for e in scanner.entries():
        kind = e.kind
        device = kind in (stat.S_IFCHR, stat.S_IFBLK)
        size = f"{e.rdevmajor:3d}, {e.rdevminor:3d}" if device else str(e.size)
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime))
        link = f" -> {_show(e.target)}" if kind == stat.S_IFLNK else ""
        out.write(f"{cpio.filemode(e.mode)} {e.nlink:3d} {e.uid:<8d} {e.gid:<8d} {size:>8} {when} "
                  f"{_show(e.raw_name)}{link}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.initramfs",
        description="Repack, list or verify an initramfs (cpio newc/crc/odc; gzip, zstd, xz or plain).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("repack", help="rewrite INPUT as one canonical, deduplicated newc archive",
                        description="Rewrite INPUT as one sorted, validated, deduplicated newc archive "
                        "(reproducible: same input, same bytes). Duplicate names: the last one is kept, "
                        "as the kernel does. A leading uncompressed early-load archive (only kernel/...) "
                        "stays a separate uncompressed archive in front, unless --merge-early.")
    rp.add_argument("input", type=Path)
    rp.add_argument("output", type=Path)
    rp.add_argument("-c", "--compression", choices=sorted(COMPRESSIONS), default="gzip")
    rp.add_argument("-l", "--level", type=int, default=6, help="gzip 1-9, zstd 1-19 (default 6)")
    rp.add_argument("--max-output-bytes", type=_size, default=_size("4G"), metavar="SIZE",
                    help="refuse inputs that expand beyond SIZE uncompressed (default 4G; 0 = no limit)")
    rp.add_argument("--no-dedup", dest="dedup", action="store_false",
                    help="do not turn identical files into hardlinks")
    rp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="show bytes in/out while working (default: when stderr is a terminal)")
    rp.add_argument("--merge-early", action="store_true",
                    help="merge a leading uncompressed early-load archive (kernel/x86/microcode/..., "
                    "kernel/firmware/acpi/...) into the compressed one; by default it is written first, "
                    "uncompressed, where the kernel's early microcode loader and ACPI override look")
    rp.add_argument("--no-reuse", dest="reuse", action="store_false",
                    help="compress every block again; by default (gzip) the blocks of a previous OUTPUT "
                    "whose input is unchanged are copied from it (the same bytes either way)")
    ls = sub.add_parser("list", help="list the entries of INPUT, like cpio -tv (numeric ids, UTC)")
    ls.add_argument("input", type=Path)
    vf = sub.add_parser("verify", help="exit 0 only if INPUT is a complete, well-formed initramfs")
    vf.add_argument("input", type=Path)
    vf.add_argument("--quick", action="store_true",
                    help="only the cheap check of a repack output (its check record, edges and trailer)")
    args = parser.parse_args(argv)
    try:
        if args.command == "repack":
            repack(args.input, args.output, compression=args.compression, level=args.level,
                   max_output_bytes=args.max_output_bytes or None, dedup=args.dedup, progress=args.progress,
                   merge_early=args.merge_early, reuse=args.reuse)
        elif args.command == "list":
            return _list(args.input)
        elif args.quick:
            if not quick_check(args.input):
                raise HookError(f"{args.input} fails the quick check (missing, changed, truncated or not "
                                "made by repack); run verify for details or repack it again")
            print(f"ok: {args.input} passes the quick check")
        else:
            print(verify(args.input))
    except HookError as exc:
        print(f"hook: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hook: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
