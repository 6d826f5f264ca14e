"""Planning the output: the last of a name wins, parents first, hardlinks and dedup, the early-load cut."""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from zlib_ng import zlib_ng

from tasks.convert import cpio
from tasks.convert.read import Entry
from tasks.core.errors import HookError


@dataclass
class _Tree:
    order: list[Entry]
    duplicates: list[bytes]
    parents_added: int


def _sort_key(entry: Entry) -> list[bytes]:
    return [] if entry.name == b"." else entry.name.split(b"/")


def resolve_tree(entries: list[Entry]) -> _Tree:
    """Keep the last entry of each name (as the kernel does), add missing parent directories, give
    hardlinked files their group's data, sort parents before children."""
    by_name: dict[bytes, Entry] = {}
    duplicates: list[bytes] = []
    for entry in entries:
        if entry.name in by_name:
            duplicates.append(entry.name)
        by_name[entry.name] = entry
    root = by_name.get(b".")
    if root is not None and root.kind != stat.S_IFDIR:
        raise HookError(f"entry {root.where} names the root but is not a directory; fix the archive")

    links: dict[tuple[int, int, int, int, int], Entry] = {}
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
                by_name[parent_name] = Entry(parent_name, parent_name, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0,
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


def early_cut(entries: list[Entry], plain: set[int]) -> tuple[int, str]:
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
class Plan:
    order: list[Entry]
    size: int
    dedup_saved: int
    dedup_files: int


def _stable_ino(name: bytes, used: set[int]) -> int:
    """An inode number from the name, unique in the archive (the next free one on a clash).

    Not a running count: a file added or removed then changes no other entry's header, so the
    compressed blocks around the rest of the archive stay the same (see GzipWriter's reuse).
    Only hardlinks (nlink >= 2) share a number, as the kernel and cpio read it.
    """
    ino = zlib_ng.crc32(name) & 0x7FFFFFFF or 1
    while ino in used:
        ino = ino % 0x7FFFFFFF + 1
    used.add(ino)
    return ino


def make_plan(tree: _Tree, *, dedup: bool, spool: memoryview, links: bool = True) -> Plan:
    """Group regular files into output hardlinks, number inodes, size the output.

    links=False (the early-load archive): every file is its own inode carrying its own data. The
    early loader reads the data stored under the name it looks for, so a hardlink whose data sits
    on another name would look empty to it.
    """
    groups: dict[tuple, list[Entry]] = {}
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
    final: list[list[Entry]] = []
    for key, members in groups.items():
        if key in split:
            digests: dict[bytes, list[Entry]] = {}
            for m in members:
                digests.setdefault(hashes[m.data], []).append(m)
            final.extend(digests.values())
        else:
            final.append(members)

    saved = files = 0
    group_of: dict[int, list[Entry]] = {}
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
    return Plan(tree.order, size, saved, files)
