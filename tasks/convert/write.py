"""Writing the output: parallel gzip in content-defined blocks (reused from the previous output),
zstd, the newc stream."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from zlib_ng import zlib_ng

from tasks.convert import cpio
from tasks.convert.plan import Plan
from tasks.convert.read import CHUNK, Progress, mib

try:
    from compression import zstd  # Python 3.14+
except ImportError:
    from backports import zstd

#: Parallel deflate blocks end at places chosen by the content, never by the cores: before an
#: entry whose name hashes to 0 mod MARK_EVERY and every BODY_MARK bytes into a large file's data,
#: once the block holds GZIP_BLOCK_MIN bytes; at GZIP_BLOCK_MAX in any case. So a changed, added or
#: removed file changes only the blocks around it, and the next repack copies the others from its
#: previous output instead of compressing them again (OldBlocks).
GZIP_BLOCK_MIN = 64 << 10


GZIP_BLOCK_MAX = 2 << 20


BODY_MARK = 1 << 20


MARK_EVERY = 16


#: What a compressed block's bytes depend on besides its input: the deflate library and its version.
DEFLATE_ID = f"zlib-ng {zlib_ng.ZLIBNG_RUNTIME_VERSION}"


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


class OldBlocks:
    """The compressed blocks of the previous output at the same path, found by their keys.

    Read through a descriptor opened before the new output replaces it. A block is used only when
    its key matches, its length is the recorded one and its compressed bytes still have the
    recorded CRC; anything else is compressed afresh, so the output bytes never depend on it.
    """

    def __init__(self, fd: int, blocks: dict[str, tuple[int, int, int, int, int]]) -> None:
        self.fd = fd
        self.blocks = blocks

    @classmethod
    def open(cls, dst: Path) -> OldBlocks | None:
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
               old: OldBlocks | None) -> tuple[bytes, int, str, int, bool]:
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


class GzipWriter:
    """One standard gzip member made like pigz: blocks deflated in parallel, each primed with the
    previous block's last 32 KiB and ended by a sync flush. Header mtime 0, no name.

    Blocks end at content-defined marks (see GZIP_BLOCK_MIN): the caller calls mark() where one
    may end. Each block's key, place and CRCs are kept in .blocks for the check record, and
    blocks that old (the previous output) holds are copied from it instead of compressed.
    """

    HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"

    def __init__(self, fh: BinaryIO, level: int, threads: int, old: OldBlocks | None = None) -> None:
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


class ZstdWriter:
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


def emit(plan: Plan, spool: memoryview, write: Callable[[bytes | bytearray | memoryview], None],
          progress: Progress | None, out: BinaryIO, mark: Callable[[], None] | None = None) -> None:
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
            progress.show(f"write {mib(done)} of {mib(plan.size)} uncompressed, {mib(out.tell())} out")
    buf += cpio.trailer()
    buf += b"\0" * (plan.size - done - len(buf))
    write(buf)


def check_path(path: Path) -> Path:
    """The small record beside an output that lets quick_check vouch for it cheaply."""
    path = Path(path)
    return path.with_name(f".{path.name}.check.json")
