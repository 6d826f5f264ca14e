"""Property: repack of a random tree equals the tree. The tree is made on disk, archived by GNU
cpio (newc or crc, sometimes split in two archives, compressed or not), repacked, extracted by
GNU cpio, and compared: every name, type, mode, owner, size, mtime, device number, symlink
target and content; hardlinks stay hardlinks, and with dedup identical files become one."""

from __future__ import annotations

import gzip
import os
import stat
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.convert import engine as initramfs
from tests.test_initramfs import decompress, gnu_extract, sh, snapshot

NAME = st.text(alphabet="abcdefgh.-_0123456789", min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))
CONTENTS = st.one_of(st.sampled_from([b"", b"same", b"same\n" * 1000]), st.binary(max_size=3000))
PERMS = st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2755, 0o1777, 0o444, 0o700])


@st.composite
def trees(draw: st.DrawFn) -> list[tuple]:
    """A list of (kind, parent index, name, payload, perms, uid, gid, mtime); index 0 is the root."""
    items: list[tuple] = []
    dirs = [0]
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo", "chr", "blk"]))
        parent = draw(st.sampled_from(dirs))
        payload: object = None
        if kind == "file":
            payload = draw(CONTENTS)
        elif kind == "symlink":
            # GNU cpio's extraction strips a leading "/" or "./" from targets: keep to what it leaves alone
            payload = draw(st.text(alphabet="abc/.", min_size=1, max_size=20).filter(
                lambda t: not t.startswith(("/", "./"))))
        elif kind == "hardlink":
            files = [i for i, item in enumerate(items, 1) if item[0] == "file"]
            if not files:
                continue
            payload = draw(st.sampled_from(files))
        elif kind in ("chr", "blk"):
            payload = (draw(st.integers(0, 300)), draw(st.integers(0, 300)))
        meta = (draw(PERMS), draw(st.integers(0, 70000)), draw(st.integers(0, 70000)),
                draw(st.integers(0, 2**31 - 1)))
        items.append((kind, parent, draw(NAME), payload, *meta))
        if kind == "dir":
            dirs.append(len(items))
    return items


def materialise(root: Path, items: list[tuple]) -> None:
    paths: list[Path | None] = [root]
    for kind, parent, name, payload, perms, uid, gid, mtime in items:
        base = paths[parent]
        if base is None or os.path.lexists(base / name):
            paths.append(None)  # a name drawn twice in one directory: the first one stays
            continue
        path = base / name
        paths.append(path)
        if kind == "file":
            path.write_bytes(payload)
        elif kind == "dir":
            path.mkdir()
        elif kind == "symlink":
            os.symlink(payload, path)
            continue
        elif kind == "hardlink":
            source = paths[payload]
            if source is None or not source.is_file() or source.is_symlink():
                continue
            os.link(source, path)
            continue
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            node = stat.S_IFCHR if kind == "chr" else stat.S_IFBLK
            os.mknod(path, node | 0o600, os.makedev(*payload))
        os.chown(path, uid, gid)
        os.chmod(path, perms)
        os.utime(path, (mtime, mtime))


def split_links(links: tuple, part: dict[str, int]) -> tuple:
    """Inode numbers are per archive (the kernel forgets them at each trailer): a hardlink whose
    names are in different archives becomes separate files."""
    groups: dict[tuple, list[str]] = {}
    for group in links:
        for name in group:
            groups.setdefault((group, part[name]), []).append(name)
    return tuple(sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1))


def expected_links(snap: dict[str, tuple]) -> tuple:
    """With dedup: files of equal content and metadata share an inode; empty ones keep their links."""
    groups: dict[tuple, list[str]] = {}
    for name, fields in snap.items():
        if name == "<links>":
            continue
        mode, uid, gid, size, mtime, _rdev, _target, digest = fields
        if stat.S_ISREG(mode) and size:
            groups.setdefault((digest, mode, uid, gid, mtime), []).append(name)
    merged = [tuple(sorted(g)) for g in groups.values() if len(g) > 1]
    empty = [g for g in snap["<links>"] if not snap[g[0]][3]]
    return tuple(sorted(merged + empty))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=trees(), fmt=st.sampled_from(["newc", "crc"]), split=st.booleans(),
       wrap=st.sampled_from(["gzip", "plain"]), dedup=st.booleans(),
       compression=st.sampled_from(["gzip", "zstd"]))
def test_repack_of_a_random_tree_equals_the_tree(tmp_path: Path, items: list[tuple], fmt: str, split: bool,
                                                wrap: str, dedup: bool, compression: str) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    root = work / "root"
    root.mkdir()
    materialise(root, items)
    names = sh("find . -mindepth 1", cwd=root).decode().splitlines()
    half = len(names) // 2 if split else len(names)
    part = {name.removeprefix("./"): int(i >= half) for i, name in enumerate(names)}
    archive = b""
    for chunk in (names[:half], names[half:]):
        if chunk:
            archive += sh(f"cpio -o -H {fmt} --quiet", cwd=root, data="\n".join(chunk).encode() + b"\n")
    if wrap == "gzip":
        archive = gzip.compress(archive)
    src = work / "in"
    src.write_bytes(archive)
    if not names:
        return
    stats = initramfs.repack(src, work / "out", dedup=dedup, compression=compression, progress=False)
    extracted = snapshot(gnu_extract(decompress((work / "out").read_bytes()), work / "x"))
    original = snapshot(root)
    original["<links>"] = split_links(original["<links>"], part)
    assert stats.entries == len(original) - 1
    if dedup:
        assert extracted.pop("<links>") == expected_links(original)
        original.pop("<links>")
    assert extracted == original
