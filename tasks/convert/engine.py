"""The initramfs convert engine: stream any initramfs the kernel accepts into one canonical,
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

import hashlib
import json
import mmap
import os
import stat
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from zlib_ng import zlib_ng

from tasks.convert import cpio
from tasks.convert.plan import early_cut, make_plan, resolve_tree
from tasks.convert.read import ZSTD_MAGIC, Progress, Scanner, mib, printable
from tasks.convert.write import GzipWriter, OldBlocks, ZstdWriter, check_path, emit
from tasks.core.errors import HookError
from tasks.core.files import fsync_dir
from tasks.core.run import log_step

try:
    from compression import zstd  # Python 3.14+
except ImportError:
    from backports import zstd

#: How much of a file's start and end quick_check hashes.
EDGE = 64 << 10


COMPRESSIONS = {"gzip": range(1, 10), "zstd": range(1, 20)}


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
            f"{self.entries} entries, {mib(self.bytes_in)} in -> {mib(self.bytes_out)} out "
            f"(cpio {mib(self.uncompressed)}, ratio {ratio:.2f}), dedup saved "
            f"{mib(self.dedup_saved_bytes)} in {self.dedup_files} files, {self.duplicates} duplicate "
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
            f"{mib(self.uncompressed)} uncompressed, {self.duplicates} duplicate names, "
            f"{self.missing_parents} missing parent directories, {self.seconds:.1f}s"
        )


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
    prog = Progress() if show else None
    threads = len(os.sched_getaffinity(0))
    log_step(f"repack {src} -> {dst} ({compression} -{level}, {threads} threads{', dedup' if dedup else ''})")
    tmp: str | None = None
    old: OldBlocks | None = None
    blocks: list[list[str | int]] = []
    reused = 0
    try:
        with tempfile.TemporaryFile(dir=dst.parent, prefix=f".{dst.name}.", suffix=".spool") as spool:
            scanner = Scanner(src, spool=spool, limit=max_output_bytes, progress=prog)
            entries = list(scanner.entries())
            spool.flush()
            cut, early_note = early_cut(entries, scanner.plain_archives)
            if cut and merge_early:
                early_note = f"asked by --merge-early; the kernel's early loaders will not see its {cut} entries"
                cut = 0
            early_tree = resolve_tree(entries[:cut]) if cut else None
            del entries[:cut]
            tree = resolve_tree(entries)
            del entries
            mm, view = _spool_view(spool, scanner.spooled)
            try:
                early = make_plan(early_tree, dedup=False, spool=view, links=False) if early_tree else None
                plan = make_plan(tree, dedup=dedup, spool=view)
                early_size = early.size if early else 0
                if max_output_bytes is not None and plan.size + early_size > max_output_bytes:
                    raise HookError(f"output would be {plan.size + early_size} bytes uncompressed, over the "
                                    f"limit of {max_output_bytes}: raise --max-output-bytes if it is genuine")
                fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
                with open(fd, "wb") as fh:
                    os.fchmod(fd, 0o644)
                    if early:  # uncompressed, first: where the kernel's early loaders look
                        emit(early, view, fh.write, prog, fh)
                    writer: GzipWriter | ZstdWriter
                    if compression == "gzip":
                        old = OldBlocks.open(dst) if reuse else None
                        writer = GzipWriter(fh, level, threads, old)
                    else:
                        writer = ZstdWriter(fh, level, threads, plan.size)
                    try:
                        emit(plan, view, writer.write, prog, fh,
                              writer.mark if isinstance(writer, GzipWriter) else None)
                    finally:
                        writer.close()
                        if old is not None:
                            old.close()
                    fh.flush()
                    os.fsync(fd)
                    bytes_out = fh.tell()
                    if isinstance(writer, GzipWriter):
                        blocks, reused = writer.blocks, writer.reused
            finally:
                view.release()
                if mm is not None:
                    mm.close()
        check_path(dst).unlink(missing_ok=True)
        os.replace(tmp, dst)
        tmp = None
        fsync_dir(dst.parent)
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
        names = ", ".join(repr(printable(n)) for n in duplicates[:5])
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
    scanner = Scanner(Path(path), spool=None, limit=None)
    tree = resolve_tree(list(scanner.entries()))
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
            if not main.startswith(GzipWriter.HEADER) or len(tail) < 8:
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
