"""The initramfs convert engine against GNU cpio (Debian's `cpio`): archives made by `cpio -o`,
repacked, then listed and extracted by `cpio -i` and compared with the tree they came from.

Also holds the helpers the other test_initramfs_* files use (tree making, GNU cpio, snapshots).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tasks.convert import engine as initramfs
from tasks.core.errors import HookError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TZ": "UTC", "LC_ALL": "C"}
MTIME = 1492533000  # LinuxKit's default mtime


# ----------------------------------------------------------------------------- helpers


def sh(cmd: str, *, cwd: Path | None = None, data: bytes | None = None) -> bytes:
    """Run a shell pipeline, return stdout; fail the test with its stderr when it fails."""
    done = subprocess.run(cmd, shell=True, cwd=cwd, input=data, capture_output=True, env=ENV)
    if done.returncode:
        pytest.fail(f"{cmd!r} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return done.stdout


def write(path: Path, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
          mtime: int = MTIME) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def make_tree(root: Path) -> None:
    """Every kind of entry the issue lists: files (empty, > 1 MiB), dirs, symlinks, hardlinks,
    char/block devices, FIFOs, a long name, setuid/setgid/sticky modes, non-zero uid/gid."""
    big = hashlib.sha256(b"seed").digest() * (1 << 16) + bytes(range(256)) * 4096  # 3 MiB
    write(root / "bin/busybox-ish", big, mode=0o4755)
    write(root / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    write(root / "etc/empty", b"", mode=0o600, uid=1000, gid=100)
    write(root / "usr/share/doc/readme.txt", b"hello initramfs\n" * 100, mode=0o444, uid=65534, gid=65534)
    write(root / "sbin/setgid-tool", b"#!/bin/sh\necho sg\n", mode=0o2711, gid=42)
    long_dir = root / ("d" * 200) / ("e" * 200)
    write(long_dir / ("f" * 250), b"long name\n")
    write(root / "lib/fw/blob.bin", os.urandom(0) + bytes(range(256)) * 1000, mode=0o640, uid=7, gid=8)
    os.link(root / "lib/fw/blob.bin", root / "lib/fw/blob-link.bin")
    os.link(root / "lib/fw/blob.bin", root / "usr/blob-third-link")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.symlink("../bin/busybox-ish", root / "sbin/init")
    os.symlink("/proc/mounts", root / "etc/mtab")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/vda", 0o660 | stat.S_IFBLK, os.makedev(254, 0))
    os.mknod(root / "dev/big", 0o600 | stat.S_IFCHR, os.makedev(511, 70000))
    os.chown(root / "dev/vda", 0, 6)
    os.mkfifo(root / "dev/initctl", 0o600)
    for node in ("null", "vda", "big", "initctl"):
        os.utime(root / "dev" / node, (MTIME, MTIME))
    for sub in ("etc", "usr", "lib/fw", "lib", "dev", "sbin", "bin"):
        os.utime(root / sub, (MTIME + 1, MTIME + 1))


def gnu_archive(tree: Path, fmt: str = "newc") -> bytes:
    """`find . | cpio -o -H fmt` of a tree, in find's (unsorted) order."""
    return sh(f"find . | cpio -o -H {fmt} --quiet", cwd=tree)


def gnu_list(archive: bytes) -> list[str]:
    """`cpio -itvn` lines, sorted; for hardlinked files the size column is masked (GNU cpio
    shows the data size only on the link that carries the data, which depends on the order)."""
    lines = []
    for line in sh("cpio -itvn --quiet", data=archive).decode().splitlines():
        fields = line.split(None, 5)
        if fields[0].startswith("-") and int(fields[1]) > 1:
            fields[4] = "*"
        lines.append(" ".join(fields))
    return sorted(lines)


def decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return sh("gzip -dc", data=data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return sh("zstd -dc", data=data)
    return data


def gnu_extract(archive: bytes, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    sh("cpio -idmu --quiet --no-absolute-filenames", cwd=dest, data=archive)
    return dest


def snapshot(root: Path, *, dir_mtimes: bool = False) -> dict[str, tuple]:
    """Everything an extraction yields, per relative name: type+mode, uid, gid, size, mtime,
    rdev, symlink target, content hash, and which names share an inode."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            target = os.readlink(path) if kind == stat.S_IFLNK else None
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if kind == stat.S_IFREG else None
            mtime = st.st_mtime if kind not in (stat.S_IFDIR, stat.S_IFLNK) or dir_mtimes else None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size if kind == stat.S_IFREG else None,
                        mtime, st.st_rdev, target, digest)
            if kind == stat.S_IFREG:
                inodes.setdefault(st.st_ino, []).append(rel)
    out["<links>"] = tuple(sorted(tuple(sorted(g)) for g in inodes.values() if len(g) > 1))
    return out


def newc_fields(archive: bytes) -> list[dict[str, int | str]]:
    """A deliberately naive newc reader for the tests (independent of tasks.convert.cpio)."""
    entries = []
    pos = 0
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
             "rdevmajor", "rdevminor", "namesize", "check")
    while True:
        assert archive[pos:pos + 6] == b"070701", f"no newc header at {pos}"
        fields: dict[str, int | str] = {n: int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16)
                                        for i, n in enumerate(names)}
        name_end = pos + 110 + int(fields["namesize"]) - 1
        fields["name"] = archive[pos + 110:name_end].decode()
        pos = (name_end + 1 + 3) & ~3
        pos = (pos + int(fields["filesize"]) + 3) & ~3
        if fields["name"] == "TRAILER!!!":
            assert not archive[pos:].strip(b"\0"), "data after the trailer"
            return entries
        entries.append(fields)


def split_early(data: bytes) -> tuple[bytes, bytes]:
    """(the uncompressed newc archive at the start of data with its zero padding, the rest): a
    naive walk of the headers, independent of tasks.convert.cpio."""
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"no newc header at {pos}"
        namesize, filesize = int(data[pos + 94:pos + 102], 16), int(data[pos + 54:pos + 62], 16)
        name = data[pos + 110:pos + 110 + namesize - 1]
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
        if name == b"TRAILER!!!":
            rest = data[pos:]
            pos += len(rest) - len(rest.lstrip(b"\0"))
            return data[:pos], data[pos:]


def early_loader_find(data: bytes, path: str) -> bytes | None:
    """The data of regular file `path` as the kernel's early loaders find it (lib/earlycpio.c,
    find_cpio_data): newc/crc headers from byte 0 of the initrd, NUL words skipped, across
    trailers, until something that is not a newc header (a compressed stream). None if absent."""
    want = path.encode()
    pos = 0
    while len(data) - pos > 110:
        if data[pos] == 0:
            pos += 4
            continue
        if data[pos:pos + 6] not in (b"070701", b"070702"):
            return None
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1]
        start = (pos + 110 + namesize + 3) & ~3
        if stat.S_ISREG(mode) and name == want:
            return data[start:start + filesize]
        pos = (start + filesize + 3) & ~3
    return None


def repack_bytes(tmp: Path, data: bytes, **options: object) -> tuple[bytes, initramfs.RepackStats]:
    src = tmp / "in.img"
    dst = tmp / "out.img"
    src.write_bytes(data)
    stats = initramfs.repack(src, dst, **options)  # type: ignore[arg-type]
    return dst.read_bytes(), stats


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.initramfs", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=ENV)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "root"
    root.mkdir()
    make_tree(root)
    return root


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", ["newc", "crc", "odc"])
def test_gnu_cpio_archive_roundtrips(tree: Path, tmp_path: Path, fmt: str) -> None:
    original = gnu_archive(tree, fmt)
    out, stats = repack_bytes(tmp_path, gzip.compress(original), dedup=False)
    repacked = decompress(out)
    assert gnu_list(repacked) == gnu_list(original)
    extracted, expected = snapshot(gnu_extract(repacked, tmp_path / "x")), snapshot(tree)
    if fmt == "odc":  # odc holds an 18-bit rdev: GNU cpio already truncated 511:70000 when writing it
        assert extracted.pop("dev/big") != expected.pop("dev/big")
    assert extracted == expected
    assert stats.entries == len(gnu_list(original)) and stats.dedup_saved_bytes == 0
    assert stats.uncompressed == len(repacked) and stats.bytes_out == len(out)


def test_output_is_canonical_newc(tree: Path, tmp_path: Path) -> None:
    out, _ = repack_bytes(tmp_path, gnu_archive(tree, "odc"), dedup=False)
    assert out[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"  # gzip, header mtime 0, no name
    repacked = decompress(out)
    assert len(repacked) % 512 == 0
    entries = newc_fields(repacked)
    names = [str(e["name"]) for e in entries]
    assert names[0] == "."
    assert names == sorted(names, key=lambda n: [] if n == "." else n.split("/"))
    assert not any(n.startswith(("/", "./")) for n in names)
    seen: set[str] = set()
    for name in names[1:]:  # parents before children
        parent = name.rpartition("/")[0]
        assert not parent or parent in seen, name
        seen.add(name)
    inos = {}
    for e in entries:
        assert e["devmajor"] == e["devminor"] == e["check"] == 0
        inos.setdefault(e["ino"], []).append(e)
    links = [group for group in inos.values() if len(group) > 1]
    assert [sorted(str(e["name"]) for e in g) for g in links] == [
        ["lib/fw/blob-link.bin", "lib/fw/blob.bin", "usr/blob-third-link"]]
    # GNU cpio's convention, which the kernel also follows: data on the last link only.
    assert [e["filesize"] for e in links[0]] == [0, 0, 256000]
    assert all(e["nlink"] == 3 for e in links[0])
    # Renumbered from the names, not counted: every entry but the three links has a number of its own.
    assert 0 not in inos and len(inos) == len(entries) - 2


def test_dedup_makes_hardlinks_of_identical_files(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    blob = os.urandom(300_000)
    write(tree / "lib/firmware/a/fw.bin", blob)
    write(tree / "lib/firmware/b/fw.bin", blob)
    write(tree / "lib/firmware/c/fw.bin", blob)
    write(tree / "opt/fw-other-mode.bin", blob, mode=0o600)  # same bytes, other metadata: kept apart
    write(tree / "opt/fw-other-mtime.bin", blob, mtime=MTIME + 5)
    write(tree / "etc/x", b"same\n")
    write(tree / "etc/y", b"same\n")
    write(tree / "etc/empty1", b"")
    write(tree / "etc/empty2", b"")
    original = gnu_archive(tree)
    out, stats = repack_bytes(tmp_path, original)
    (tmp_path / "plain").mkdir()
    plain, plain_stats = repack_bytes(tmp_path / "plain", original, dedup=False)
    assert stats.dedup_saved_bytes == 2 * len(blob) + 5 and stats.dedup_files == 3
    assert plain_stats.dedup_saved_bytes == 0
    assert len(out) < len(plain) - len(blob)  # the blob copies are gone (gzip alone cannot see them)
    extracted = snapshot(gnu_extract(decompress(out), tmp_path / "x"))
    expected = snapshot(tree)
    assert extracted.pop("<links>") == (
        ("etc/x", "etc/y"), ("lib/firmware/a/fw.bin", "lib/firmware/b/fw.bin", "lib/firmware/c/fw.bin"))
    expected.pop("<links>")
    assert extracted == expected
    assert snapshot(gnu_extract(decompress(plain), tmp_path / "y")) == snapshot(tree)


def test_reproducible_whatever_the_input_order_format_and_cores(tree: Path, tmp_path: Path) -> None:
    newc = gnu_archive(tree, "newc")
    reversed_crc = sh("find . | sort -r | cpio -o -H crc --quiet", cwd=tree)
    outputs = set()
    for i, data in enumerate([gzip.compress(newc), newc, lzma.compress(reversed_crc), newc]):
        src = tmp_path / f"in{i}"
        src.write_bytes(data)
        dst = tmp_path / f"out{i}"
        if i == 3:  # one core: the parallel gzip must not depend on the number of threads
            done = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "tasks.initramfs", "repack",
                                   str(src), str(dst)], cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert "1 threads" in done.stderr
        else:
            initramfs.repack(src, dst)
        outputs.add(dst.read_bytes())
    assert len(outputs) == 1


def _many_files(root: Path, *, changed: bytes = b"") -> None:
    """300 files of 20-90 KiB (text-like, so they compress) and one of 3 MiB: many deflate blocks."""
    for i in range(300):
        body = b"".join(b"line %d of file %d: %s\n" % (j, i, hashlib.sha256(b"%d/%d" % (i, j)).hexdigest().encode())
                        for j in range(250 + 100 * (i % 12)))
        write(root / f"usr/lib/pkg{i % 7}/mod{i:03}.py", body)
    write(root / "usr/bin/big", hashlib.sha256(b"big").hexdigest().encode() * (3 << 15))
    if changed:
        write(root / "usr/lib/pkg3/mod150.py", changed)  # one file in the middle, other size
        write(root / "usr/lib/pkg3/new.py", b"an added file\n")
    for folder in (root, *[p for p in root.rglob("*") if p.is_dir()]):
        os.utime(folder, (MTIME, MTIME))


def test_unchanged_blocks_are_copied_from_the_previous_output(tmp_path: Path) -> None:
    before, after = tmp_path / "before", tmp_path / "after"
    _many_files(before)
    _many_files(after, changed=b"print('changed')\n" * 500)
    src, dst = tmp_path / "in.img", tmp_path / "out.img"
    src.write_bytes(gnu_archive(before))
    first = initramfs.repack(src, dst)
    assert first.blocks > 20 and first.reused_blocks == 0
    out1 = dst.read_bytes()
    again = initramfs.repack(src, dst)
    assert again.reused_blocks == again.blocks and dst.read_bytes() == out1
    assert "blocks unchanged (copied)" in str(again)

    src.write_bytes(gnu_archive(after))
    changed = initramfs.repack(src, dst)
    fresh = initramfs.repack(src, tmp_path / "fresh.img", reuse=False)
    assert dst.read_bytes() == (tmp_path / "fresh.img").read_bytes()  # the same bytes either way
    assert fresh.reused_blocks == 0
    assert changed.blocks - changed.reused_blocks <= 4, changed  # only the blocks around the change
    assert initramfs.quick_check(dst)
    assert snapshot(gnu_extract(decompress(dst.read_bytes()), tmp_path / "x")) == snapshot(after)


def test_a_damaged_previous_output_is_not_copied(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _many_files(root)
    src, dst = tmp_path / "in.img", tmp_path / "out.img"
    src.write_bytes(gnu_archive(root))
    initramfs.repack(src, dst)
    good = dst.read_bytes()
    st = dst.stat()
    with open(dst, "r+b") as fh:  # flip a byte in the middle, keep size and mtime
        fh.seek(len(good) // 2)
        byte = fh.read(1)
        fh.seek(len(good) // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    stats = initramfs.repack(src, dst)
    assert dst.read_bytes() == good
    assert stats.reused_blocks == stats.blocks - 1


@pytest.mark.parametrize("wrap", ["zstd", "xz", "gzip-members", "plain"])
def test_compressed_and_concatenated_inputs(tree: Path, tmp_path: Path, wrap: str) -> None:
    original = gnu_archive(tree)
    if wrap == "zstd":
        data = sh("zstd -q -c", data=original)
    elif wrap == "xz":
        data = sh("xz -c", data=original)
    elif wrap == "gzip-members":  # one archive split over three gzip members, as `cat a.gz b.gz` makes
        third = len(original) // 3
        data = b"".join(gzip.compress(original[i:j]) for i, j in
                        ((0, third), (third, 2 * third), (2 * third, len(original))))
    else:
        data = original
    out, _ = repack_bytes(tmp_path, data, dedup=False)
    assert gnu_list(decompress(out)) == gnu_list(original)


def test_microcode_cpio_before_compressed_archive_merged_on_request(tree: Path, tmp_path: Path) -> None:
    """What LinuxKit writes with kernel.ucode set: an uncompressed cpio, then the gzip initrd
    (itself holding two archives here, with zero padding between them). --merge-early reads all
    three into the one compressed archive."""
    ucode_tree = tmp_path / "ucode"
    write(ucode_tree / "kernel/x86/microcode/AuthenticAMD.bin", b"\x01" * 1000)
    ucode = gnu_archive(ucode_tree)
    second_tree = tmp_path / "second"
    write(second_tree / "etc/extra.conf", b"extra\n")
    main = gnu_archive(tree) + b"\0" * 512 + gnu_archive(second_tree)
    out, stats = repack_bytes(tmp_path, ucode + gzip.compress(main), dedup=False, merge_early=True)
    assert out[:2] == b"\x1f\x8b" and stats.early_entries == stats.early_bytes == 0
    assert "--merge-early" in stats.early_note and "merged" in str(stats)
    listing = gnu_list(decompress(out))
    assert any(line.endswith(" kernel/x86/microcode/AuthenticAMD.bin") for line in listing)
    assert any(line.endswith(" etc/extra.conf") for line in listing)
    assert any(line.endswith(" sbin/init -> ../bin/busybox-ish") for line in listing)
    assert stats.duplicates == 3  # "." is in all three archives, "etc" in two: last wins, no error
    verified = initramfs.verify(tmp_path / "in.img")
    assert verified.archives == 3 and verified.streams == ("cpio", "gzip")


INTEL = "kernel/x86/microcode/GenuineIntel.bin"
AMD = "kernel/x86/microcode/AuthenticAMD.bin"


def early_tree(root: Path, *extra: str) -> dict[str, bytes]:
    """A microcode tree as Debian's initramfs-tools and dracut make it (dummy blobs); returns the blobs."""
    blobs = {INTEL: hashlib.sha256(b"intel").digest() * 200, AMD: hashlib.sha256(b"amd").digest() * 50}
    for name in (INTEL, AMD, *extra):
        write(root / name, blobs.get(name, b"1\n"))
    return blobs


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_early_microcode_archive_stays_first_and_uncompressed(tree: Path, tmp_path: Path, compression: str) -> None:
    """An uncompressed microcode cpio (GNU cpio) before a gzip rootfs: the output starts with an
    uncompressed newc archive of exactly the kernel/ files, the early loader finds them there, and
    the compressed archive after it holds the rest."""
    blobs = early_tree(tmp_path / "early")
    early_in = gnu_archive(tmp_path / "early")
    data = early_in + gzip.compress(gnu_archive(tree))
    assert early_loader_find(data, INTEL) == blobs[INTEL]  # the helper reads the input as the kernel does
    out, stats = repack_bytes(tmp_path, data, compression=compression)
    assert out[:6] == b"070701"
    early, main = split_early(out)
    assert len(early) % 512 == 0 and main[:4] == (b"\x1f\x8b\x08\x00" if compression == "gzip" else
                                                  b"\x28\xb5\x2f\xfd")
    assert [e["name"] for e in newc_fields(early)] == [
        ".", "kernel", "kernel/x86", "kernel/x86/microcode", AMD, INTEL]
    assert gnu_list(early) == gnu_list(early_in)
    assert snapshot(gnu_extract(early, tmp_path / "x-early")) == snapshot(tmp_path / "early")
    assert snapshot(gnu_extract(decompress(main), tmp_path / "x-main")) == snapshot(tree)
    for name, blob in blobs.items():
        assert early_loader_find(out, name) == blob
    assert (stats.early_entries, stats.early_bytes, stats.early_note) == (6, len(early), "")
    assert stats.entries == 6 + len(gnu_list(gnu_archive(tree))) and stats.bytes_out == len(out)
    assert "early-load archive first (uncompressed): 6 of the entries" in str(stats)

    dst = tmp_path / "out.img"
    done = run_cli("verify", dst)
    assert done.returncode == 0 and f"in 2 archive(s) (cpio+{compression})" in done.stdout, done.stderr
    assert initramfs.quick_check(dst)
    listing = run_cli("list", dst)
    assert listing.returncode == 0 and listing.stdout.count(" kernel/x86/microcode/") == 2
    again = tmp_path / "again.img"
    initramfs.repack(dst, again, compression=compression)
    assert again.read_bytes() == out  # idempotent

    merged = tmp_path / "merged.img"
    done = run_cli("repack", tmp_path / "in.img", merged, "--merge-early", "-c", compression)
    assert done.returncode == 0, done.stderr
    assert "note: the uncompressed first archive is merged" in done.stderr
    one = merged.read_bytes()
    if compression == "gzip":  # a single gzip stream: one member, nothing after it
        d = zlib.decompressobj(31)
        d.decompress(one)
        assert one[:2] == b"\x1f\x8b" and d.eof and d.unused_data == b""
    else:
        assert one[:4] == b"\x28\xb5\x2f\xfd" and run_cli("verify", merged).stdout.startswith(
            "ok: ") and "(zstd)" in run_cli("verify", merged).stdout
    assert early_loader_find(one, INTEL) is None
    assert sum(line.endswith(("GenuineIntel.bin", "AuthenticAMD.bin")) for line in gnu_list(decompress(one))) == 2


def test_early_archives_of_ubuntu_and_dracut(tree: Path, tmp_path: Path) -> None:
    """Ubuntu puts AMD and Intel microcode in two uncompressed archives in a row; dracut adds its
    early_cpio marker. Both are early-load content: one uncompressed archive holds them all."""
    amd_blobs = early_tree(tmp_path / "amd")
    (tmp_path / "amd" / INTEL).unlink()
    early_tree(tmp_path / "intel", "early_cpio")
    (tmp_path / "intel" / AMD).unlink()
    write(tmp_path / "acpi/kernel/firmware/acpi/ssdt1.aml", b"SSDT" + bytes(60))
    data = (gnu_archive(tmp_path / "amd") + gnu_archive(tmp_path / "intel") + b"\0" * 512
            + gnu_archive(tmp_path / "acpi") + sh("zstd -q -c", data=gnu_archive(tree)))
    out, stats = repack_bytes(tmp_path, data)
    early, main = split_early(out)
    names = [e["name"] for e in newc_fields(early)]
    assert names == [".", "early_cpio", "kernel", "kernel/firmware", "kernel/firmware/acpi",
                     "kernel/firmware/acpi/ssdt1.aml", "kernel/x86", "kernel/x86/microcode", AMD, INTEL]
    # ".", "kernel", "kernel/x86", "kernel/x86/microcode" twice, ".", "kernel" thrice: last wins, as in the kernel
    assert stats.early_entries == len(names) and stats.duplicates == 6
    assert early_loader_find(out, AMD) == amd_blobs[AMD]
    assert early_loader_find(out, "kernel/firmware/acpi/ssdt1.aml") == b"SSDT" + bytes(60)
    assert main[:2] == b"\x1f\x8b"
    assert snapshot(gnu_extract(decompress(main), tmp_path / "x")) == snapshot(tree)


def test_early_archive_keeps_each_files_data(tmp_path: Path) -> None:
    """No hardlinks in the early archive: the early loader reads the data stored under the name it
    wants, so identical blobs (dedup) and the input's own hardlinks each keep their data there."""
    root = tmp_path / "early"
    blob = os.urandom(4000)
    write(root / INTEL, blob)
    write(root / AMD, blob)  # same content and metadata: dedup would link them
    os.link(root / INTEL, root / "kernel/x86/microcode/GenuineIntel.bin.link")
    main = tmp_path / "main"
    write(main / "a", blob)
    write(main / "b", blob)
    out, stats = repack_bytes(tmp_path, gnu_archive(root) + gzip.compress(gnu_archive(main)))
    early, rest = split_early(out)
    files = [e for e in newc_fields(early) if stat.S_ISREG(int(e["mode"]))]
    assert [(e["filesize"], e["nlink"]) for e in files] == [(4000, 1)] * 3
    assert len({e["ino"] for e in files}) == 3
    assert early_loader_find(out, INTEL) == early_loader_find(out, AMD) == blob
    assert stats.dedup_files == 1  # the rest is deduplicated as usual
    assert [e["nlink"] for e in newc_fields(decompress(rest)) if e["name"] in ("a", "b")] == [2, 2]


def test_uncompressed_first_archive_with_other_content_is_merged(tree: Path, tmp_path: Path) -> None:
    """An uncompressed first archive that holds anything outside kernel/ is ordinary content: merged,
    and the summary says why."""
    early_tree(tmp_path / "first", "etc/stray.conf")
    data = gnu_archive(tmp_path / "first") + gzip.compress(gnu_archive(tree))
    src = tmp_path / "in.img"
    src.write_bytes(data)
    done = run_cli("repack", src, tmp_path / "out.img")
    assert done.returncode == 0, done.stderr
    out = (tmp_path / "out.img").read_bytes()
    d = zlib.decompressobj(31)
    d.decompress(out)
    assert out[:2] == b"\x1f\x8b" and d.eof and d.unused_data == b""
    assert "note: the uncompressed first archive is merged into the compressed one: its entry 'etc' " in done.stderr
    assert "is not under kernel/" in done.stderr.splitlines()[-1]  # the summary says so too
    names = {e["name"] for e in newc_fields(decompress(out))}
    assert {INTEL, AMD, "etc/stray.conf", "etc/passwd"} <= names
    assert initramfs.quick_check(tmp_path / "out.img")
    # a plain first archive that holds no file under kernel/ is no early archive either
    (tmp_path / "root-only").mkdir()
    out, stats = repack_bytes(tmp_path, sh("echo . | cpio -o -H newc --quiet", cwd=tmp_path / "root-only")
                              + gzip.compress(gnu_archive(tree)))
    assert out[:2] == b"\x1f\x8b" and stats.early_entries == 0 and "nothing under kernel/" in stats.early_note


def test_only_early_content_still_gets_its_early_archive(tmp_path: Path) -> None:
    """A microcode-only initrd (Arch's intel-ucode.img, given to the boot loader as a separate
    initrd): the early archive, then an empty compressed archive, so that the early loader still
    finds it and every output has the same shape."""
    blobs = early_tree(tmp_path / "early")
    out, stats = repack_bytes(tmp_path, gnu_archive(tmp_path / "early"))
    early, main = split_early(out)
    assert early_loader_find(out, INTEL) == blobs[INTEL] and stats.early_entries == stats.entries == 6
    assert newc_fields(decompress(main)) == []
    assert initramfs.quick_check(tmp_path / "out.img")
    initramfs.repack(tmp_path / "out.img", tmp_path / "again.img")
    assert (tmp_path / "again.img").read_bytes() == out


def test_duplicate_names_keep_the_last_like_the_kernel(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write(first / "etc/motd", b"old\n", mode=0o600)
    write(second / "etc/motd", b"new contents\n", mode=0o644, uid=3)
    out, stats = repack_bytes(tmp_path, gnu_archive(first) + gnu_archive(second))
    assert stats.duplicates == 3  # ".", "etc", "etc/motd"
    dest = gnu_extract(decompress(out), tmp_path / "x")
    assert (dest / "etc/motd").read_bytes() == b"new contents\n"
    st = (dest / "etc/motd").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o644, 3)


def test_missing_parents_are_added_and_names_normalised(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    write(tree / "a/b/c/file", b"deep\n")
    listing = sh("printf '%s\\n' ./a/b/c/file | cpio -o -H newc --quiet", cwd=tree)
    out, stats = repack_bytes(tmp_path, listing)
    assert stats.parents_added == 3
    names = [e["name"] for e in newc_fields(decompress(out))]
    assert names == ["a", "a/b", "a/b/c", "a/b/c/file"]
    assert initramfs.verify(tmp_path / "in.img").missing_parents == 3


def test_zstd_output(tree: Path, tmp_path: Path) -> None:
    original = gnu_archive(tree)
    out, stats = repack_bytes(tmp_path, original, compression="zstd", level=19, dedup=False)
    assert out[:4] == b"\x28\xb5\x2f\xfd"
    assert gnu_list(sh("zstd -dc", data=out)) == gnu_list(original)
    assert initramfs.quick_check(tmp_path / "out.img")
    assert initramfs.verify(tmp_path / "out.img").entries == stats.entries


def test_gzip_output_is_one_standard_member(tree: Path, tmp_path: Path) -> None:
    out, _ = repack_bytes(tmp_path, gnu_archive(tree), level=9)
    sh("gzip -t", data=out)
    sh("pigz -t", data=out)
    assert gzip.decompress(out) == sh("gzip -dc", data=out)
    # one member: after it nothing is left (python's gzip would read a second member)
    d = zlib.decompressobj(31)
    d.decompress(out)
    assert d.eof and d.unused_data == b""


def test_verify_and_quick_check_accept_repack_output(tree: Path, tmp_path: Path) -> None:
    out, stats = repack_bytes(tmp_path, gnu_archive(tree))
    dst = tmp_path / "out.img"
    assert initramfs.quick_check(dst)
    v = initramfs.verify(dst)
    assert (v.entries, v.archives, v.streams, v.duplicates, v.missing_parents) == (stats.entries, 1, ("gzip",), 0, 0)
    assert v.uncompressed == stats.uncompressed
    assert "ok:" in str(v) and "entries" in str(stats)


def test_list_is_like_cpio_tv(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(gnu_archive(tree))
    done = run_cli("list", archive)
    assert done.returncode == 0, done.stderr
    def fields(text: str, date_words: int) -> list[tuple[str, ...]]:
        rows = []
        for line in text.splitlines():
            line = re.sub(r"(\d+),\s+(\d+)", r"\1,\2", line)  # a device's "maj, min"
            words = line.split(None, 5 + date_words)
            rows.append((*words[:5], words[-1]))
        return sorted(rows)

    # ours prints "2017-04-18 16:30" (UTC), cpio "Apr 18  2017": all else is the same
    assert fields(done.stdout, 2) == fields(sh(f"cpio -itvn --quiet < {archive}").decode(), 3)


def test_cli_repack_verify_help(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(gnu_archive(tree))
    for cmd in ([], ["repack"], ["list"], ["verify"]):
        done = run_cli(*cmd, "--help")
        assert done.returncode == 0 and "usage:" in done.stdout
    done = run_cli("repack", archive, tmp_path / "out", "--compression", "zstd", "--level", "3", "--no-dedup")
    assert done.returncode == 0, done.stderr
    assert "repacked out:" in done.stderr and "entries" in done.stderr
    assert "\r" not in done.stderr  # no progress when stderr is not a terminal
    assert run_cli("verify", tmp_path / "out").stdout.startswith("ok:")
    assert run_cli("verify", "--quick", tmp_path / "out").returncode == 0
    bad = run_cli("repack", archive, tmp_path / "o2", "--level", "12")
    assert bad.returncode == 1 and bad.stderr.strip() == "hook: gzip level 12 is out of range 1..9"
    assert not (tmp_path / "o2").exists()


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="unknown compression 'lz4'"):
        initramfs.repack(tmp_path / "x", tmp_path / "y", compression="lz4")
    with pytest.raises(HookError, match="output directory .* does not exist"):
        initramfs.repack(tmp_path / "x", tmp_path / "no" / "y")
    with pytest.raises(HookError, match="cannot read input"):
        initramfs.repack(tmp_path / "missing", tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_progress_only_on_a_terminal(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(gnu_archive(tree))
    cmd = f"{sys.executable} -m tasks.initramfs repack {archive} {tmp_path / 'out'}"
    done = subprocess.run(["script", "-qec", cmd, "/dev/null"], cwd=ROOT, capture_output=True, env=ENV)
    assert done.returncode == 0, done.stdout
    assert b"\rhook: read " in done.stdout and b"\rhook: write " in done.stdout  # stderr is the pty here
    assert b" out" in done.stdout.split(b"\rhook: write ")[-1]
