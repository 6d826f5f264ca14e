"""Reading an initramfs: byte sources, decompressors (gzip, zstd, xz), the cpio scanner, progress."""

from __future__ import annotations

import lzma
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from zlib_ng import zlib_ng

from tasks.convert import cpio
from tasks.core.errors import HookError

try:
    from compression import zstd  # Python 3.14+
except ImportError:
    from backports import zstd




CHUNK = 1 << 20


GZIP_MAGIC = b"\x1f\x8b"


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


XZ_MAGIC = b"\xfd7zXZ\x00"


#: Formats the kernel knows but this engine does not read: name them in the error.
UNSUPPORTED = {b"BZh": "bzip2", b"\x02\x21\x4c\x18": "lz4", b"\x89LZO": "lzo", b"\x5d\x00\x00": "lzma"}


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def printable(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


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
class Entry:
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


class Scanner:
    """Pass 1: read every archive of an input file, validate each entry, spool regular-file data."""

    def __init__(self, src: Path, *, spool: BinaryIO | None, limit: int | None,
                 progress: Progress | None = None) -> None:
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

    def entries(self) -> Iterator[Entry]:
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

    def _archive(self, src: _Source, label: str, *, base: int, size: int | None) -> Iterator[Entry]:
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
            shown = f"{printable(raw_name)!r} ({where})"
            entry = self._entry(src, h, raw_name, shown, archive, None if size is None else size - src.pos)
            if h.aligned:
                src.read_exact(cpio.pad4(src.pos - base))
            prev = f"entry {shown}"
            if self.progress and self.progress.due("read"):
                self.progress.show(f"read {mib(self.raw.pos)} of {mib(self.bytes_in)} in, "
                                   f"{mib(self.spooled)} of file data")
            yield entry

    def _entry(self, src: _Source, h: cpio.Header, raw_name: bytes, shown: str, archive: int,
               left: int | None) -> Entry:
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
        return Entry(raw_name, name, h.mode, h.uid, h.gid, h.nlink, h.mtime, size, h.rdevmajor,
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


class Progress:
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
