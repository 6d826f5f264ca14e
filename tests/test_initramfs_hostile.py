"""Hostile and broken inputs: each is refused with one line naming the entry and offset, through
the CLI (exit 1, no traceback), and leaves no output and no temporary file. Plus quick_check."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.convert import cpio
from tasks.convert import engine as initramfs
from tasks.core.errors import HookError
from tests.test_initramfs import ENV, ROOT, gnu_archive, write


def entry(name: bytes, data: bytes = b"", *, mode: int = 0o100644, namesize: int | None = None,
          filesize: int | None = None, magic: bytes = cpio.NEWC) -> bytes:
    """One newc entry, with fields that may lie."""
    ns = len(name) + 1 if namesize is None else namesize
    fs = len(data) if filesize is None else filesize
    head = magic + b"".join(b"%08X" % v for v in (1, mode, 0, 0, 1, 0, fs, 0, 0, 0, 0, ns, 0))
    body = head + name + b"\0"
    body += b"\0" * cpio.pad4(len(body))
    return body + data + b"\0" * cpio.pad4(len(data))


def odc_entry(name: bytes, *, mtime: int) -> bytes:
    """One odc entry of an empty file (all fields octal, no padding)."""
    head = b"%06o%06o%06o%06o%06o%06o%06o%011o%06o%011o" % (0, 1, 0o100644, 0, 0, 1, 0, mtime, len(name) + 1, 0)
    return cpio.ODC + head + name + b"\0"


TRAILER = entry(b"TRAILER!!!")
GOOD = entry(b"etc", mode=0o40755) + entry(b"etc/passwd", b"root:x:0:0::/:/bin/sh\n") + TRAILER


def hostile(tmp: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (input bytes, a regex the one-line error must match)."""
    tree = tmp / "tree"
    write(tree / "etc/a", b"A" * 5000)
    write(tree / "etc/b", b"B" * 100)
    good = gnu_archive(tree)
    second = good.index(b"070701", 6)
    gz = bytearray(gzip.compress(good))
    gz[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    flipped = bytearray(gzip.compress(good))
    flipped[len(flipped) // 2] ^= 0x55
    bomb = gzip.compress(entry(b"zeros", bytes(64 << 20)) + TRAILER, 1)
    return {
        "bad magic": (good[:second] + b"070799" + good[second + 6:], r"bad magic b'070799' at input byte \d+"),
        "truncated header": (good[:second + 50], rf"truncated cpio header at input byte {second}"),
        "truncated data": (good[:good.index(b"AAAA") + 100], r"declares 5000 bytes of data but the input has only"),
        "truncated gzip data": (gzip.compress(good[:good.index(b"AAAA") + 100]),
                                r"data of entry 'etc/a' .* is truncated: 5000 bytes declared, 100 present"),
        "truncated gzip stream": (bytes(gz[: len(gz) // 2]), r"gzip stream at input byte 0 is truncated"),
        "namesize beyond input": (entry(b"x", namesize=3000), r"name of the entry at input byte 0 is truncated"),
        "filesize beyond input": (entry(b"x", b"1", filesize=0xFFFFFFFF), r"'x' \(input byte 0\) declares "
                                  r"4294967295 bytes of data but the input has only"),
        "4 GiB on a 1 KiB gzip input": (gzip.compress(entry(b"big", b"x" * 900, filesize=0xFFFFFFFF)),
                                        r"entry 'big' .*(is truncated: 4294967295 bytes declared|declares "
                                        r"4294967295 bytes of data, over the limit)"),
        "missing trailer": (GOOD[: -len(TRAILER)], r"archive ends without TRAILER!!! at input byte \d+, after entry "
                            r"'etc/passwd'"),
        "dotdot name": (entry(b"etc/../../x", b"pwn") + TRAILER, r"'etc/../../x' \(input byte 0\) has a '\.\.' "
                        "component"),
        "empty name": (entry(b"") + TRAILER, r"entry '' \(input byte 0\) has an empty name"),
        "name of 1 MiB": (entry(b"n" * (1 << 20)) + TRAILER, r"name of 1048577 bytes, over PATH_MAX"),
        "name without NUL": (entry(b"abc", namesize=3) + TRAILER, r"malformed name b'ab"),
        "gzip CRC": (bytes(gz), r"gzip stream at input byte 0: CRC or data error"),
        "gzip corrupt": (bytes(flipped), r"gzip stream at input byte 0: (CRC or data error|corrupt data)"),
        "not hex": (b"070701" + b"zz" * 52 + b"\0" * 64,
                    r"bad cpio header at input byte 0, after the start of the archive: header fields are not hex"),
        "not octal": (b"070707" + b"9" * 70 + b"\0" * 64, r"not 6 octal digits"),
        "odc mtime over 32 bits": (odc_entry(b"x", mtime=2**33 - 1), r"'x' .* size or mtime over 32 bits"),
        "unknown type": (entry(b"x", mode=0o170644) + TRAILER, r"unknown file type"),
        "device with data": (entry(b"null", b"data", mode=0o20644) + TRAILER, r"only files and symlinks carry"),
        "empty symlink": (entry(b"l", mode=0o120777) + TRAILER, r"symlink 'l' .* target of 0 bytes"),
        "parent not a dir": (entry(b"etc", b"file") + entry(b"etc/passwd", b"x") + TRAILER,
                             r"entry 'etc/passwd' \(input byte 120\): its parent 'etc' \(input byte 0\) is a regular "
                             "file, not a directory"),
        "root not a dir": (entry(b"./", b"x") + TRAILER, r"names the root but is not a directory"),
        "crc checksum": (GOOD.replace(cpio.NEWC, cpio.CRC), r"'etc/passwd' .* fails its crc-format checksum"),
        "junk after gzip": (gzip.compress(GOOD) + b"junk!!", r"unknown data b'junk!!' at input byte \d+"),
        "junk in gzip": (gzip.compress(GOOD + b"junk!!"), r"bad magic b'junk!!' at byte \d+ of the gzip stream"),
        "bzip2": (b"BZh91AY&SY" + b"\0" * 10, r"bzip2 data at input byte 0 is not supported"),
        "empty file": (b"", r"holds no cpio archive"),
        "zeros only": (b"\0" * 4096, r"holds no cpio archive"),
        "gzip bomb": (bomb, r"(expands beyond|over) the limit of 16777216"),
    }


def _case_names() -> list[str]:
    return [
        "bad magic", "truncated header", "truncated data", "truncated gzip data", "truncated gzip stream",
        "namesize beyond input", "filesize beyond input", "4 GiB on a 1 KiB gzip input", "missing trailer",
        "dotdot name", "empty name", "name of 1 MiB", "name without NUL", "gzip CRC", "gzip corrupt", "not hex",
        "not octal", "odc mtime over 32 bits", "unknown type", "device with data", "empty symlink",
        "parent not a dir", "root not a dir",
        "crc checksum", "junk after gzip", "junk in gzip", "bzip2", "empty file", "zeros only", "gzip bomb",
    ]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, str]]:
    made = hostile(tmp_path_factory.mktemp("hostile"))
    assert sorted(made) == sorted(_case_names())
    return made


@pytest.mark.parametrize("name", _case_names())
def test_refused_cleanly_by_the_cli(cases: dict[str, tuple[bytes, str]], tmp_path: Path, name: str) -> None:
    data, pattern = cases[name]
    src = tmp_path / "in.img"
    src.write_bytes(data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "initramfs"
    done = subprocess.run(
        [sys.executable, "-m", "tasks.initramfs", "repack", str(src), str(dst), "--max-output-bytes", "16M"],
        cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith("hook: repack ")]
    assert len(errors) == 1 and errors[0].startswith("hook: "), done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert list(out_dir.iterdir()) == []  # no output, no temporary, no check record
    if name != "gzip bomb":  # verify reads everything (it has no limit), and refuses the same way
        with pytest.raises(HookError):
            initramfs.verify(src)
        assert subprocess.run([sys.executable, "-m", "tasks.initramfs", "verify", str(src)], cwd=ROOT,
                              capture_output=True, env=ENV).returncode == 1


def test_a_failed_repack_removes_the_previous_output(cases: dict[str, tuple[bytes, str]], tmp_path: Path) -> None:
    good, bad, dst = tmp_path / "good", tmp_path / "bad", tmp_path / "initramfs"
    good.write_bytes(GOOD)
    bad.write_bytes(cases["gzip CRC"][0])
    initramfs.repack(good, dst)
    assert initramfs.quick_check(dst)
    with pytest.raises(HookError, match="CRC"):
        initramfs.repack(bad, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good"]


def test_in_place_repack_and_a_failure_in_place_keep_the_input(tmp_path: Path) -> None:
    path = tmp_path / "initrd"
    path.write_bytes(GOOD)
    initramfs.repack(path, path)
    assert initramfs.quick_check(path)
    once = path.read_bytes()
    initramfs.repack(path, path)
    assert path.read_bytes() == once
    with pytest.raises(HookError, match="gzip level 0"):
        initramfs.repack(path, path, level=0)
    assert path.read_bytes() == once


def test_bomb_guard_also_bounds_an_uncompressed_claim(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(entry(b"f", b"x" * 4096) + TRAILER)
    with pytest.raises(HookError, match="declares 4096 bytes of data, over the limit of 1000"):
        initramfs.repack(src, tmp_path / "out", max_output_bytes=1000)
    initramfs.repack(src, tmp_path / "out", max_output_bytes=8192)


def test_names_are_normalised_not_refused(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(entry(b"/abs", b"1") + entry(b"./dot/./x//y/", mode=0o40755) + entry(b"bin/", mode=0o40755)
                    + TRAILER)
    initramfs.repack(src, tmp_path / "out")
    listing = subprocess.run(f"zcat {tmp_path / 'out'} | cpio -it --quiet", shell=True, capture_output=True,
                             text=True).stdout.split()
    assert listing == ["abs", "bin", "dot", "dot/x", "dot/x/y"]


# ----------------------------------------------------------------------------- quick_check


@pytest.fixture
def made(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    tree = tmp_path / "tree"
    write(tree / "data.bin", os.urandom(300_000))  # incompressible: the output is > 2 x 64 KiB
    src.write_bytes(gnu_archive(tree))
    dst = tmp_path / "initramfs"
    initramfs.repack(src, dst)
    assert initramfs.quick_check(dst)
    return dst


def test_quick_check_catches_what_it_promises(made: Path, tmp_path: Path) -> None:
    good = made.read_bytes()
    stat_before = made.stat()
    assert not initramfs.quick_check(tmp_path / "missing")

    made.write_bytes(good[: len(good) // 2])  # truncated
    assert not initramfs.quick_check(made)
    made.write_bytes(good + b"\0")  # appended to
    assert not initramfs.quick_check(made)
    made.write_bytes(good)  # same bytes, but rewritten: a new mtime
    assert not initramfs.quick_check(made)
    os.utime(made, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert initramfs.quick_check(made)  # the very same file again

    corrupt = bytearray(good)
    corrupt[-5] ^= 1  # the gzip trailer, size and mtime kept
    made.write_bytes(corrupt)
    os.utime(made, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert not initramfs.quick_check(made)

    made.write_bytes(good)
    os.utime(made, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    half = tmp_path / ".initramfs.half.tmp"  # a half-written temporary has no check record
    half.write_bytes(good[:1000])
    assert not initramfs.quick_check(half)
    initramfs.check_path(made).unlink()
    assert not initramfs.quick_check(made)


def test_quick_check_vouches_for_an_early_archive_first(tmp_path: Path) -> None:
    """An output that starts with an uncompressed early-load archive: quick_check finds the
    compressed archive where the record says, and catches changes at the seam that the edge hashes
    alone would miss (the early archive here is bigger than the 64 KiB they cover)."""
    early_root, main_root = tmp_path / "early", tmp_path / "main"
    write(early_root / "kernel/x86/microcode/GenuineIntel.bin", os.urandom(300_000))
    write(main_root / "data.bin", os.urandom(300_000))
    src = tmp_path / "in"
    src.write_bytes(gnu_archive(early_root) + gzip.compress(gnu_archive(main_root)))
    dst = tmp_path / "initramfs"
    stats = initramfs.repack(src, dst)
    assert initramfs.quick_check(dst)
    record_path = initramfs.check_path(dst)
    record = json.loads(record_path.read_text())
    assert record["early"] == stats.early_bytes > 2 * initramfs.EDGE
    good = dst.read_bytes()
    before = dst.stat()

    def tampered(at: int) -> bool:
        bad = bytearray(good)
        bad[at] ^= 1
        dst.write_bytes(bad)
        os.utime(dst, ns=(before.st_atime_ns, before.st_mtime_ns))
        return initramfs.quick_check(dst)

    assert not tampered(record["early"] + 12)  # the start of the deflate stream
    assert not tampered(record["early"] - 200)  # the early archive's trailer
    assert not tampered(record["early"] - 1)  # its zero padding
    assert tampered(record["early"] + 100_000)  # the middle: only verify reads that (documented)
    dst.write_bytes(good)
    os.utime(dst, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert initramfs.quick_check(dst)
    for early in (record["early"] - 512, record["early"] + 512, 0, 7, "x"):
        record_path.write_text(json.dumps({**record, "early": early}))
        assert not initramfs.quick_check(dst), early
    started = time.perf_counter()
    record_path.write_text(json.dumps(record))
    for _ in range(10):
        assert initramfs.quick_check(dst)
    assert (time.perf_counter() - started) / 10 < 0.02


def test_quick_check_accepts_records_from_before_early_archives(made: Path) -> None:
    """Records written before the early-load archive existed have no "early" key: still fine."""
    record = json.loads(initramfs.check_path(made).read_text())
    assert record.pop("early") == 0 and "main_head_sha256" not in record
    initramfs.check_path(made).write_text(json.dumps(record))
    assert initramfs.quick_check(made)


def test_quick_check_is_cheap(tmp_path: Path) -> None:
    """A few ms even for a large file: it reads 128 KiB and a small record, whatever the size."""
    src = tmp_path / "in"
    tree = tmp_path / "tree"
    write(tree / "big.bin", os.urandom(24 << 20))
    src.write_bytes(gnu_archive(tree))
    dst = tmp_path / "initramfs"
    initramfs.repack(src, dst, level=1)
    started = time.perf_counter()
    for _ in range(10):
        assert initramfs.quick_check(dst)
    assert (time.perf_counter() - started) / 10 < 0.02


# ----------------------------------------------------------------------------- fuzzing


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_archives_never_crash(tmp_path: Path, data: st.DataObject) -> None:
    """Any byte flips, cuts or insertions: repack either works or raises HookError, and never
    leaves a temporary file behind."""
    base = GOOD + entry(b"bin", mode=0o40755) + entry(b"bin/sh", b"#!" * 40, mode=0o100755) + entry(
        b"bin/ash", b"sh", mode=0o120777) + TRAILER
    base = data.draw(st.sampled_from([base, gzip.compress(base), zlib.compress(base)]))
    blob = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if op == "flip" and blob:
            blob[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del blob[at:at + data.draw(st.integers(1, 64))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    src = work / "in"
    src.write_bytes(bytes(blob))
    try:
        initramfs.repack(src, work / "out", max_output_bytes=1 << 20, progress=False)
    except HookError as exc:
        assert "\n" not in str(exc)
        assert sorted(p.name for p in work.iterdir()) == ["in"]
    else:
        assert initramfs.quick_check(work / "out")
        initramfs.verify(work / "out")
