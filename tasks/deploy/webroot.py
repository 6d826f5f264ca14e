"""The webroot's layout, and the only changes a deploy makes to it: a version folder renamed in, the
`current` link swapped, old folders renamed away and removed.

    DIR/
      <version>/                   one build: its tarballs and ISOs, the vmlinuz-<arch> and initramfs-<arch>
                                   unpacked from them, and checksum.txt covering every file there
      current -> <version>         the version served; switched by one rename
      vmlinuz-<arch> -> current/vmlinuz-<arch>       the names Smee's iPXE script and the chart ask for,
      initramfs-<arch> -> current/initramfs-<arch>   each a link through `current`: one rename of
      hook_<arch>.tar.gz -> current/...              `current` switches them all at once
      hook-<arch>.iso -> current/...                 (when the build has ISOs)
      .hook-deploy.json            the versions in the order they were made current, and those hook made
      .hook-deploy.lock            flock: one deploy at a time (a killed one lets go of it)
      .hook-deploy-*               temporaries of a deploy that runs, or was stopped (the next one removes them)

The `current` link is the truth. The state file is written after the swap of a deploy and before the
swap of a rollback, so that one killed between the two reads back as done (deploy) or as not done
(rollback), never as anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text, fsync_dir
from tasks.core.run import log_step
from tasks.media.checksums import read_checksums, verify_checksums

CURRENT = "current"
CHECKSUMS = "checksum.txt"
STATE = ".hook-deploy.json"
LOCK = ".hook-deploy.lock"
TEMP = ".hook-deploy-"
_ARCHES = "|".join(a.value for a in Arch)
#: The names served at the top, each a link through `current`.
SERVED = re.compile(rf"^((vmlinuz|initramfs)-({_ARCHES})|[a-z][a-z0-9-]*_({_ARCHES})\.tar\.gz"
                    rf"|[a-z][a-z0-9-]*-({_ARCHES})\.iso)$")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class State:
    """What the webroot holds: the version served, the versions in the order they were made current
    (the current one last) and every version folder hook made there (only those are ever removed)."""

    current: str | None
    history: list[str] = field(default_factory=list)
    installed: list[str] = field(default_factory=list)


def check_version(version: str, where: str) -> str:
    if not VERSION.match(version) or version == CURRENT or SERVED.match(version):
        raise HookError(f"{where}: version {version!r} cannot name a webroot folder (letters, digits and . _ + -; "
                        f"not {CURRENT!r} or a served name)")
    return version


def _temp_name(root: Path, kind: str) -> Path:
    return root / f"{TEMP}{kind}.{secrets.token_hex(4)}"


def _link(root: Path, name: str, target: str) -> bool:
    """root/name becomes a symlink to target in one rename; False when it is that link already."""
    path = root / name
    if path.is_symlink() and os.readlink(path) == target:
        return False
    tmp = _temp_name(root, "link")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _ours(path: Path) -> bool:
    """A top-level link hook made: <name> -> current/<name>."""
    return path.is_symlink() and os.readlink(path) == f"{CURRENT}/{path.name}"


def new_folder(root: Path, version: str) -> Path:
    """A temporary folder in the webroot (same file system: it is renamed into place)."""
    path = _temp_name(root, version)
    path.mkdir(mode=0o755)
    return path


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One deploy at a time in a webroot; the lock goes with the process, so a killed one does not hold it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log_step(f"deploy: another deploy into {root} runs: waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def clean_temporaries(root: Path) -> list[str]:
    """Remove what a stopped deploy left (under the lock: no deploy is running)."""
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(TEMP) or (entry.name.startswith(f"{STATE}.") and entry.name.endswith(".tmp")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
    return removed


def read_current(root: Path) -> str | None:
    path = root / CURRENT
    if not path.is_symlink():
        if path.exists():
            raise HookError(f"{path} is not a symlink: hook switches versions by renaming that link; move it away")
        return None
    target = os.readlink(path)
    if not VERSION.match(target) or not (root / target).is_dir():
        raise HookError(f"{path} points at {target!r}, not a version folder beside it: point it at one, or remove it")
    return target


def load(root: Path) -> State:
    """The state, made to agree with what is there: folders that are gone are dropped, and the
    current version is the last of the history (after a deploy stopped between swap and state write)."""
    current = read_current(root)
    try:
        data = json.loads((root / STATE).read_text())
        if not isinstance(data, dict):
            raise ValueError
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError):
        raise HookError(f"{root / STATE} is not hook's state file: remove it (hook then knows only the current "
                        "version, and removes no other)") from None

    def present(names: object) -> list[str]:
        found = names if isinstance(names, list) else []
        return [v for v in dict.fromkeys(found) if isinstance(v, str) and VERSION.match(v)
                and (root / v).is_dir() and not (root / v).is_symlink()]

    installed = present(data.get("installed"))
    history = [v for v in present(data.get("history")) if v in installed]
    if current:
        if current not in installed:
            installed.append(current)
        history = [v for v in history if v != current] + [current]
    return State(current, history, installed)


def save(root: Path, state: State) -> None:
    atomic_write_text(root / STATE, json.dumps({"current": state.current, "history": state.history,
                                                "installed": sorted(state.installed)}, indent=2) + "\n")
    fsync_dir(root)


def served_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if SERVED.match(p.name) and p.is_file() and not p.is_symlink())


def verify_version(folder: Path) -> None:
    """A version folder as a deploy made it: checksum.txt lists every file there, and each matches."""
    lines = read_checksums(folder / CHECKSUMS)
    files = {p.name for p in folder.iterdir()} - {CHECKSUMS}
    if files != set(lines):
        odd = sorted(files ^ set(lines))
        raise HookError(f"{folder}: checksum.txt and the files there differ ({', '.join(odd)}): "
                        "the folder was changed by hand")
    verify_checksums(folder, lines, where=str(folder / CHECKSUMS))


def check_target(root: Path, state: State, version: str, names: list[str]) -> None:
    """Refuse, before anything changes, a version folder hook did not make and a served name that is a folder."""
    target = root / version
    if (target.exists() or target.is_symlink()) and version not in state.installed:
        raise HookError(f"{target} is there and hook did not make it: move it away, or give this build another "
                        "version (version=...)")
    for name in names:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            raise HookError(f"{path} is a folder: hook serves that name as a link to current/{name}; move it away")


def install(root: Path, state: State, folder: Path, version: str) -> None:
    """Rename a complete, checked temporary folder to root/<version>; an older folder of that version
    (not current) is renamed away first and removed after."""
    target = root / version
    if version == state.current:
        raise HookError(f"{version} is the current version: it is never replaced while it serves")
    check_target(root, state, version, [])
    trash = None
    if target.exists() or target.is_symlink():
        trash = _temp_name(root, "trash")
        os.rename(target, trash)
    if version not in state.installed:
        state.installed.append(version)
        save(root, state)  # before the rename: a folder hook made is always in the state file
    os.rename(folder, target)
    fsync_dir(root)
    if trash:
        shutil.rmtree(trash)


def switch(root: Path, state: State, version: str) -> list[str]:
    """Make version current: its served names get their links, then one rename of `current` switches
    them all; names that were something else become links, and links to what it lacks go.

    Returns what changed (empty: version was current and every link was in place)."""
    folder = root / version
    names = served_names(folder)
    check_target(root, state, version, names)
    changed = []
    for name in names:  # new names: until the swap they serve the old version's file (or nothing, as before)
        path = root / name
        if not path.is_symlink() and not path.exists():
            _link(root, name, f"{CURRENT}/{name}")
            changed.append(name)
    if _link(root, CURRENT, version):
        changed.append(f"{CURRENT} -> {version}")
    fsync_dir(root)
    history = [v for v in state.history if v != version] + [version]
    if (state.current, state.history) != (version, history):
        state.current, state.history = version, history
        save(root, state)  # after the swap: a deploy stopped before this reads back as done (load())
    for name in names:  # a file or a link of another tool at a served name: ours now, after the swap
        if _link(root, name, f"{CURRENT}/{name}"):
            changed.append(name)
    for entry in sorted(root.iterdir()):
        if _ours(entry) and entry.name not in names:
            entry.unlink()
            changed.append(f"-{entry.name}")
    fsync_dir(root)
    return changed


def prune(root: Path, state: State, keep: int) -> list[str]:
    """After the swap: keep the last `keep` versions of the history (the current one among them) and
    remove the other folders hook made (renamed away first, so none is ever left half-removed)."""
    kept = state.history[-keep:]
    drop = [v for v in state.installed if v not in kept and v != state.current]
    trash = []
    for version in drop:
        trash.append(_temp_name(root, "trash"))
        os.rename(root / version, trash[-1])
    if drop or kept != state.history:
        state.history = kept
        state.installed = [v for v in state.installed if v not in drop]
        save(root, state)
    for path in trash:
        shutil.rmtree(path)
    return drop


def rollback_target(root: Path, state: State) -> str:
    if not state.current:
        raise HookError(f"nothing is deployed in {root}: nothing to roll back")
    if len(state.history) < 2:
        raise HookError(f"{state.current} is the only version {root} keeps: nothing to roll back to")
    return state.history[-2]
