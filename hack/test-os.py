#!/usr/bin/env python3
"""Make the images that boot the real Hook OS on a test machine with no registry to pull from.

LinuxKit's own package images (init, runc, containerd, getty, sshd, ...), a kernel image and the
base images of our two programs are remade from Debian packages and LinuxKit v1.8.2's Go sources,
into the local docker engine, under the names the project's linuxkit/*.yaml use with
pkg_org=hooktest/linuxkit. What each image holds and how it differs from LinuxKit's real package:
docs/test-os.md.

    python hack/test-os.py [--cache DIR] [--project DIR]

Cached and idempotent: every image carries the label org.hook.test-os.key, a hash of its root
filesystem and Dockerfile; an image whose key did not change is not built again, so a run with
nothing changed builds nothing. The references are written to $CACHE/test-os.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

try:
    import yaml
except ImportError:  # reported when first needed, with the fix
    yaml = None  # type: ignore[assignment]

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "test-os"
DEFAULT_PROJECT = HERE.parent
DEFAULT_CACHE = "/var/cache/hook-test"
DEFAULT_LINUXKIT_SRC_DIR = "/work/shared/linuxkit/src"
DEFAULT_GO = "/usr/lib/go-1.24/bin/go"

LINUXKIT_VERSION = "v1.8.2"
LINUXKIT_TARBALL = f"linuxkit-{LINUXKIT_VERSION}-src.tar.gz"
LINUXKIT_PATCH = "no-aws-gcp.patch"

PKG_ORG = "hooktest/linuxkit"
KERNEL_REPO = "hooktest/kernel"
PYTHON_SLIM = "hooktest/python-slim:{arch}"
DOCKER_BASE = "hooktest/hook-docker-base:{arch}"
TINK_WORKER = "hooktest/tink-worker:test"
ACTION = "hooktest/action:test"
BUILD_IMAGE = "local/python-base:amd64"
KEY_LABEL = "org.hook.test-os.key"
CONFIG_LABEL = "org.mobyproject.config"
#: mtime of every file put into an image (LinuxKit's own defaultModTime).
MTIME = 1492533000
#: Bump to rebuild everything after a change that the content keys cannot see.
RECIPE_VERSION = "1"

#: Debian packages downloaded into $CACHE/debs (the kernel package is added: the one that
#: linux-image-amd64 depends on). Libraries not listed here come from the host, if it has them.
DEBS = [
    "busybox-static", "libc6", "containerd", "runc", "docker.io", "tini", "iptables", "libip4tc2",
    "libip6tc2", "libxtables12", "libnftnl11", "libnetfilter-conntrack3", "libnfnetlink0", "libmnl0",
    "libseccomp2", "libdevmapper1.02.1", "kmod", "libkmod2", "openssh-server", "openssh-client",
    "libwrap0", "dhcpcd-base",
]
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib")
LOADER = "ld-linux-x86-64.so.2"

#: Kernel modules in /kernel.tar (with their modules.dep closure): QEMU's devices, the disks Hook
#: installs to, and what dockerd needs (bridge, veth, overlay, iptables over nf_tables).
MODULE_DIRS = ("kernel/net/netfilter", "kernel/net/ipv4/netfilter", "kernel/net/ipv6/netfilter", "kernel/net/bridge")
MODULE_DIRS_SKIP = ("kernel/net/netfilter/ipvs",)
MODULE_NAMES = (
    "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "virtio_console", "virtio_rng", "virtio_balloon",
    "nvme", "ahci", "ata_piix", "sd_mod", "sr_mod", "e1000", "e1000e", "veth", "bridge", "br_netfilter",
    "overlay", "loop", "tun", "macvlan", "ipvlan", "dummy", "squashfs", "isofs", "ext4", "vfat",
    "nls_cp437", "nls_iso8859_1", "crc32c_generic", "cls_cgroup", "sch_fq_codel", "8021q",
)

#: Stdlib parts python-slim leaves out (relative to /usr/lib/python3.11).
PYTHON_DROP_DIRS = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
    "sqlite3", "curses", "__pycache__", "site-packages", "dist-packages",
}
PYTHON_DROP_FILES = {"turtle.py", "__phello__.foo.py", "_pydecimal.py", "doctest.py"}
PYTHON_DROP_EXT = (
    "_test", "_ctypes_test", "xxlimited", "_xxtestfuzz", "_xxsubinterpreters", "_curses", "_dbm",
    "_sqlite3", "readline", "nis", "ossaudiodev", "_tkinter",
)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/sbin/nologin
bin:x:2:2:bin:/bin:/sbin/nologin
sys:x:3:3:sys:/dev:/sbin/nologin
sshd:x:22:22:sshd privilege separation:/run/sshd:/sbin/nologin
ntp:x:123:123:NTP:/var/empty:/sbin/nologin
dhcpcd:x:101:101:dhcpcd:/var/lib/dhcpcd:/sbin/nologin
nobody:x:65534:65534:nobody:/:/sbin/nologin
"""
GROUP = """\
root:x:0:root
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
kmem:x:9:
sshd:x:22:
ntp:x:123:
dhcpcd:x:101:
docker:x:999:
nogroup:x:65534:
"""
#: root has no password; "*" (not "!") so that sshd's key login is allowed (a "!" locks the account).
SHADOW = "root:*::0:::::\n"
HOSTS = "127.0.0.1\tlocalhost localhost.localdomain\n::1\tlocalhost ip6-localhost ip6-loopback\n"
NSSWITCH = ("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\n"
            "services: files\n")
PROFILE = """\
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PAGER=less
umask 022
for script in /etc/profile.d/*.sh; do
\tif [ -r "$script" ]; then
\t\t. "$script"
\tfi
done
unset script
"""
SHELLS = "/bin/sh\n/bin/ash\n"
#: Added to LinuxKit's dhcpcd.conf. Debian builds dhcpcd with udev support: with no udev plugin it
#: crashes after its first DISCOVER (a NULL dev), with udev's it waits forever for udevd (there is
#: none). Alpine's, in LinuxKit's real image, has no device manager support at all.
DHCPCD_NODEV = """
# hooktest: Debian's dhcpcd has udev support, and there is no udevd here: use no /dev manager.
nodev
"""


class TestOsError(Exception):
    """A failure with a one-line message that names the thing and the fix."""


# --- output -------------------------------------------------------------------------------------

def step(message: str) -> None:
    print(f"test-os: {message}", file=sys.stderr, flush=True)


def human(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def run(argv: Sequence[str | os.PathLike[str]], *, what: str, fix: str, cwd: Path | None = None,
        env: dict[str, str] | None = None, stdin: BinaryIO | None = None, executable: Path | None = None) -> str:
    """Run a command; on failure show the tail of its output and raise one line naming what and the fix."""
    try:
        done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, stdin=stdin if stdin else subprocess.DEVNULL,
                              capture_output=True, text=True, check=False, executable=executable)
    except FileNotFoundError as exc:
        raise TestOsError(f"{what}: {argv[0]} not found: {fix}") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-20:]
        for line in tail:
            print(f"  | {line}", file=sys.stderr)
        raise TestOsError(f"{what} failed (exit {done.returncode}): {fix}")
    return done.stdout


# --- files --------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory tmp at final, atomically (the old one, if any, is removed after)."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Digests:
    """sha256 of files, remembered by (device, inode, size, mtime) between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known: dict[str, list[Any]] = {}
        self.changed = False
        with contextlib.suppress(OSError, ValueError):
            self.known = json.loads(path.read_text())

    def of(self, path: Path) -> str:
        st = path.stat()
        sig = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
        key = str(path)
        hit = self.known.get(key)
        if hit and hit[:4] == sig:
            return str(hit[4])
        value = sha256_file(path)
        self.known[key] = [*sig, value]
        self.changed = True
        return value

    def save(self) -> None:
        if self.changed:
            live = {k: v for k, v in self.known.items() if os.path.exists(k)}
            atomic_write(self.path, json.dumps(live).encode())
            self.changed = False


def jail_resolve(root: Path, rel: str, *, depth: int = 0) -> str:
    """rel with every symlink followed as if root were '/' (never leaves root). Returns a path relative to root."""
    if depth > 40:
        raise TestOsError(f"symlink loop under {root} at {rel}: the extracted tree is broken; delete it and run again")
    parts = [p for p in rel.split("/") if p and p != "."]
    done: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink():
            target = os.readlink(candidate)
            base = [] if target.startswith("/") else done
            rest = "/".join([*base, target.lstrip("/") if target.startswith("/") else target, *parts[i + 1:]])
            return jail_resolve(root, rest, depth=depth + 1)
        done.append(part)
    return "/".join(done)


# --- ELF ----------------------------------------------------------------------------------------

def elf_needs(path: Path) -> tuple[str | None, list[str]] | None:
    """(interpreter, DT_NEEDED names) of an ELF64 little-endian file; None when not ELF."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return None
        if head[4] != 2 or head[5] != 1:
            raise TestOsError(f"{path}: not a 64-bit little-endian ELF file: only x86_64 content is made here")
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        loads: list[tuple[int, int, int]] = []
        interp = None
        dynamic = None
        for i in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack_from(
                "<IIQQQQQQ", table, i * phentsize)
            if p_type == 1:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:
                dynamic = (p_offset, p_filesz)
            elif p_type == 3:
                f.seek(p_offset)
                interp = f.read(p_filesz).rstrip(b"\0").decode()
        if dynamic is None:
            return interp, []
        f.seek(dynamic[0])
        raw = f.read(dynamic[1])
        needed: list[int] = []
        strtab = strsz = 0
        for off in range(0, len(raw) - 15, 16):
            tag, val = struct.unpack_from("<qQ", raw, off)
            if tag == 0:
                break
            if tag == 1:
                needed.append(val)
            elif tag == 5:
                strtab = val
            elif tag == 10:
                strsz = val
        offset = next((o + strtab - v for v, o, sz in loads if v <= strtab < v + sz), None)
        if offset is None:
            raise TestOsError(f"{path}: cannot read its dynamic string table: is the file complete?")
        f.seek(offset)
        strings = f.read(strsz)
        names = [strings[n:strings.index(b"\0", n)].decode() for n in needed]
        return interp, names


class Libraries:
    """Finds shared libraries by soname in some root trees (extracted debs), then on the host."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = list(roots)
        self.cache: dict[str, Path | None] = {}

    def find(self, soname: str) -> Path | None:
        if soname not in self.cache:
            self.cache[soname] = None
            for root in self.roots:
                for libdir in LIB_DIRS:
                    rel = f"{libdir}/{soname}"
                    if (root / rel).exists() or (root / rel).is_symlink():
                        real = root / jail_resolve(root, rel)
                        if real.is_file():
                            self.cache[soname] = real
                            break
                if self.cache[soname] is not None:
                    break
        return self.cache[soname]


# --- root filesystems -----------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    kind: str  # "dir", "file", "symlink"
    mode: int = 0o755
    source: Path | None = None
    data: bytes | None = None
    target: str | None = None


class Rootfs:
    """An image's root filesystem as a list of entries, hashed and streamed without being written out.

    `base` is the image this one is built on (FROM): its symlinked directories (/lib -> usr/lib)
    are followed when placing files, and files it already has are not added again.
    """

    def __init__(self, base: Rootfs | None = None) -> None:
        self.base = base
        self.entries: dict[str, Entry] = {}

    # paths
    def _lookup(self, rel: str) -> Entry | None:
        if rel in self.entries:
            return self.entries[rel]
        return self.base._lookup(rel) if self.base else None

    def canonical(self, path: str) -> str:
        """path with its symlinked parent directories (of this image or its base) followed; the last part is kept."""
        parts = [p for p in path.strip("/").split("/") if p and p != "."]
        out: list[str] = []
        for i, part in enumerate(parts):
            out.append(part)
            hops = 0
            while i < len(parts) - 1:
                entry = self._lookup("/".join(out))
                if entry is None or entry.kind != "symlink":
                    break
                hops += 1
                if hops > 20:
                    raise TestOsError(f"symlink loop at {'/'.join(out)} in an image's root filesystem")
                target = entry.target or ""
                out = [] if target.startswith("/") else out[:-1]
                for t in target.split("/"):
                    if t == "..":
                        if out:
                            out.pop()
                    elif t and t != ".":
                        out.append(t)
        return "/".join(out)

    def has(self, path: str) -> bool:
        return self._lookup(self.canonical(path)) is not None

    def _parents(self, rel: str) -> None:
        parent = rel.rpartition("/")[0]
        if parent and self._lookup(parent) is None:
            self._parents(parent)
            self.entries[parent] = Entry("dir", 0o755)

    # adding
    def dir(self, path: str, mode: int = 0o755) -> None:
        rel = self.canonical(path)
        self._parents(rel)
        self.entries[rel] = Entry("dir", mode)

    def file(self, path: str, source: Path | None = None, *, data: bytes | str | None = None,
             mode: int | None = None) -> None:
        rel = self.canonical(path)
        self._parents(rel)
        if isinstance(data, str):
            data = data.encode()
        if source is not None:
            st = source.stat()
            if not stat.S_ISREG(st.st_mode):
                raise TestOsError(f"{source} is not a regular file (wanted for {path}): its package is incomplete")
            self.entries[rel] = Entry("file", stat.S_IMODE(st.st_mode) if mode is None else mode, source=source)
        else:
            self.entries[rel] = Entry("file", 0o644 if mode is None else mode, data=data or b"")

    def symlink(self, path: str, target: str) -> None:
        rel = self.canonical(path)
        self._parents(rel)
        self.entries[rel] = Entry("symlink", 0o777, target=target)

    def tree(self, src: Path, dest: str, *, skip: Callable[[str], bool] = lambda rel: False) -> None:
        """Copy a directory tree from disk (files, symlinks, dirs with their modes)."""
        for dirpath, dirnames, filenames in os.walk(src):
            reldir = os.path.relpath(dirpath, src)
            reldir = "" if reldir == "." else reldir
            for name in sorted(dirnames):
                rel = f"{reldir}/{name}".lstrip("/")
                path = Path(dirpath, name)
                if skip(rel):
                    dirnames.remove(name)
                elif path.is_symlink():
                    self.symlink(f"{dest}/{rel}", os.readlink(path))
                else:
                    self.dir(f"{dest}/{rel}", stat.S_IMODE(path.stat().st_mode))
            for name in sorted(filenames):
                rel = f"{reldir}/{name}".lstrip("/")
                path = Path(dirpath, name)
                if skip(rel):
                    continue
                if path.is_symlink():
                    self.symlink(f"{dest}/{rel}", os.readlink(path))
                else:
                    self.file(f"{dest}/{rel}", path)

    # content
    def digest(self, digests: Digests) -> str:
        h = hashlib.sha256()
        for rel in sorted(self.entries):
            e = self.entries[rel]
            if e.kind == "file":
                content = digests.of(e.source) if e.source else hashlib.sha256(e.data or b"").hexdigest()
            else:
                content = e.target or ""
            h.update(f"{rel}\0{e.kind}\0{e.mode:o}\0{content}\n".encode())
        return h.hexdigest()

    def size(self) -> int:
        return sum((e.source.stat().st_size if e.source else len(e.data or b"")) for e in self.entries.values()
                   if e.kind == "file")

    def write_tar(self, out: tarfile.TarFile, prefix: str) -> None:
        for rel in sorted(self.entries):
            e = self.entries[rel]
            info = tarfile.TarInfo(f"{prefix}/{rel}")
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = MTIME, e.mode, 0, 0, "root", "root"
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                out.addfile(info)
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target or ""
                out.addfile(info)
            elif e.source is not None:
                info.size = e.source.stat().st_size
                with open(e.source, "rb") as handle:
                    out.addfile(info, handle)
            else:
                info.size = len(e.data or b"")
                out.addfile(info, io.BytesIO(e.data or b""))


def add_libraries(fs: Rootfs, binaries: Iterable[Path], libs: Libraries, *, libdir: str = "lib/x86_64-linux-gnu",
                  what: str) -> None:
    """Add the shared libraries (and the loader) the ELF files need, transitively, unless fs (or its base) has them."""
    todo = list(binaries)
    seen: set[str] = set()
    while todo:
        info = elf_needs(todo.pop())
        if info is None:
            continue
        interp, needed = info
        if interp and interp != f"/lib64/{LOADER}":
            raise TestOsError(f"{what}: unexpected ELF interpreter {interp}: only x86_64 glibc programs are handled")
        if interp and not fs.has(f"lib64/{LOADER}"):
            loader = libs.find(LOADER)
            if loader is None:
                raise TestOsError(f"{what}: {LOADER} not found: add libc6 to DEBS in hack/test-os.py")
            fs.file(f"lib64/{LOADER}", loader, mode=0o755)
        for soname in needed:
            if soname in seen:
                continue
            seen.add(soname)
            if fs.has(f"{libdir}/{soname}") or fs.has(f"usr/lib/x86_64-linux-gnu/{soname}") \
                    or fs.has(f"lib/x86_64-linux-gnu/{soname}"):
                continue
            found = libs.find(soname)
            if found is None:
                raise TestOsError(f"{what}: shared library {soname} not found in the downloaded debs or on this host: "
                                  "add the Debian package that has it to DEBS in hack/test-os.py")
            fs.file(f"{libdir}/{soname}", found)
            todo.append(found)


def busybox_links(fs: Rootfs, busybox: Path, applets: list[str], *, at: str = "bin/busybox") -> None:
    """busybox and a symlink for each applet (at Debian's compiled-in path), where fs has nothing yet."""
    fs.file(at, busybox, mode=0o755)
    target = "/" + fs.canonical(at)
    for applet in applets:
        if "/" not in applet or fs.has(applet):
            continue
        fs.symlink(applet, target)


def baselayout(fs: Rootfs) -> None:
    """What Alpine's alpine-baselayout gives LinuxKit's images: the directories and /etc basics."""
    for d in ("dev", "proc", "sys", "run", "mnt", "media", "srv", "opt", "home", "lib/modules", "lib/firmware",
              "usr/local/bin", "usr/local/sbin", "usr/share", "var/cache", "var/lib", "var/log", "var/spool",
              "var/opt", "var/local", "etc/profile.d", "etc/modprobe.d", "etc/modules-load.d", "etc/sysctl.d",
              "etc/ssl/certs", "etc/network"):
        fs.dir(d)
    fs.dir("tmp", 0o1777)
    fs.dir("var/tmp", 0o1777)
    fs.dir("var/empty", 0o555)
    fs.dir("root", 0o700)
    fs.symlink("var/run", "/run")
    fs.symlink("var/lock", "/run/lock")
    fs.symlink("etc/mtab", "/proc/mounts")
    fs.file("etc/passwd", data=PASSWD)
    fs.file("etc/group", data=GROUP)
    fs.file("etc/shadow", data=SHADOW, mode=0o640)
    fs.file("etc/hosts", data=HOSTS)
    fs.file("etc/nsswitch.conf", data=NSSWITCH)
    fs.file("etc/profile", data=PROFILE)
    fs.file("etc/shells", data=SHELLS)
    fs.file("etc/hostname", data="hook\n")


# --- images -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Image:
    """One image to make: amd64 under `refs`, and an arm64-labelled copy under `arm64_refs` (if any)."""

    name: str
    refs: list[str]
    rootfs: Rootfs
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] | None = None
    base: Image | None = None
    arm64_refs: list[str] = dataclasses.field(default_factory=list)
    key: str = ""

    @property
    def ref(self) -> str:
        return self.refs[0]

    @property
    def arm64_ref(self) -> str | None:
        return self.arm64_refs[0] if self.arm64_refs else None

    def dockerfile(self, arch: str) -> str:
        if self.base is None:
            lines = ["FROM scratch"]
        else:
            base_ref = self.base.ref if arch == "amd64" else self.base.arm64_ref
            lines = [f"FROM {base_ref}"]
        lines.append("COPY rootfs/ /")
        lines.append("WORKDIR /")
        for k, v in sorted(self.env.items()):
            lines.append(f"ENV {k}={json.dumps(v)}")
        if self.entrypoint is not None:
            lines.append(f"ENTRYPOINT {json.dumps(self.entrypoint)}")
        if self.cmd is not None:
            lines.append(f"CMD {json.dumps(self.cmd)}")
        return "\n".join(lines) + "\n"

    def labels(self) -> dict[str, str]:
        labels = {KEY_LABEL: self.key}
        if self.config is not None:
            labels[CONFIG_LABEL] = json.dumps(self.config, separators=(",", ":"))
        return labels

    def compute_key(self, digests: Digests) -> str:
        h = hashlib.sha256()
        h.update(f"recipe {RECIPE_VERSION}\n".encode())
        h.update(self.dockerfile("amd64").encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        h.update(f"base {self.base.key if self.base else ''}\n".encode())
        h.update(self.rootfs.digest(digests).encode())
        self.key = h.hexdigest()[:32]
        return self.key


def need_yaml() -> None:
    if yaml is None:
        raise TestOsError("PyYAML is missing: run this with the project's venv (.venv/bin/python hack/test-os.py)")


def linuxkit_config(build_yml: Path) -> dict[str, Any] | None:
    """The `config:` of a LinuxKit package's build.yml, with integer modes as octal strings."""
    need_yaml()
    try:
        data = yaml.safe_load(build_yml.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TestOsError(f"cannot read {build_yml}: {exc}: unpack the LinuxKit source again (delete it)") from exc
    config = data.get("config")
    if config is None:
        return None

    def fix(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: fix(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v, key) for v in value]
        if key == "mode" and isinstance(value, int) and not isinstance(value, bool):
            return f"{value:04o}"
        return value

    return fix(config)


def package_tags(project: Path) -> dict[str, list[str]]:
    """{package name: [tags]} of every ${pkg_org}/NAME:TAG in the project's linuxkit/hook.yaml and debug.yaml."""
    need_yaml()
    tags: dict[str, list[str]] = {}
    for name in ("hook.yaml", "debug.yaml"):
        path = project / "linuxkit" / name
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise TestOsError(f"cannot read {path}: pass --project DIR, the hook checkout") from exc
        except yaml.YAMLError as exc:
            raise TestOsError(f"{path} is not valid YAML ({exc}): fix the file") from exc

        def walk(value: Any) -> Iterator[str]:
            if isinstance(value, dict):
                for v in value.values():
                    yield from walk(v)
            elif isinstance(value, list):
                for v in value:
                    yield from walk(v)
            elif isinstance(value, str):
                yield value

        for text in walk(data):
            m = re.fullmatch(r"\$\{pkg_org\}/([a-z0-9._-]+):([A-Za-z0-9._-]+)", text)
            if m:
                tags.setdefault(m.group(1), [])
                if m.group(2) not in tags[m.group(1)]:
                    tags[m.group(1)].append(m.group(2))
    if not tags:
        raise TestOsError(f"no ${{pkg_org}}/NAME:TAG image in {project}/linuxkit/*.yaml: "
                          "is --project the hook checkout?")
    return tags


# --- the steps ------------------------------------------------------------------------------------

class TestOs:
    def __init__(self, cache: Path, project: Path, linuxkit_src_dir: Path, go: Path, force: bool) -> None:
        self.cache = cache
        self.project = project
        self.src_dir = linuxkit_src_dir
        self.go = go
        self.force = force
        self.work = cache / "test-os"
        self.digests = Digests(self.work / "digests.json")
        self.built: list[str] = []
        self.kernel_pkg = ""

    # 0. preflight
    def preflight(self) -> None:
        if not (self.project / "linuxkit" / "hook.yaml").is_file():
            raise TestOsError(f"{self.project}/linuxkit/hook.yaml not found: pass --project DIR, the hook checkout")
        for tool, fix in (("docker", "install docker.io (hack/setup-test-machine.sh)"),
                          ("dpkg-deb", "run this on Debian"), ("apt-get", "run this on Debian"),
                          ("patch", "apt-get install patch")):
            if shutil.which(tool) is None:
                raise TestOsError(f"{tool} not found: {fix}")
        run(["docker", "version", "--format", "{{.Server.Version}}"], what="docker engine",
            fix="start dockerd (hack/setup-test-machine.sh does) and check `docker info`")
        run(["docker", "buildx", "version"], what="docker buildx",
            fix="install docker-buildx (hack/setup-test-machine.sh does)")
        if not os.access(self.cache, os.W_OK):
            raise TestOsError(f"cache {self.cache} is not writable: run as root or pass --cache DIR")

    def remove_leftovers(self) -> None:
        """Temporary directories of a run that was killed (this run holds the lock: none is in use)."""
        for parent in (self.work, self.work / "debx", self.work / "kernel", self.cache / "linuxkit-src",
                       self.cache / "debs"):
            with contextlib.suppress(OSError):
                for p in parent.iterdir():
                    if p.name.startswith((".x-", ".py-", ".bin-", ".stage-", ".download-", ".unpack-", ".linuxkit-")) \
                            or re.match(r"\..*\.old-\d+$", p.name):
                        shutil.rmtree(p, ignore_errors=True)

    # 1. LinuxKit source
    def linuxkit_src(self) -> Path:
        tarball, patch = self.src_dir / LINUXKIT_TARBALL, self.src_dir / LINUXKIT_PATCH
        for f in (tarball, patch):
            if not f.is_file():
                raise TestOsError(f"{f} not found: pass --linuxkit-src-dir DIR (holding {LINUXKIT_TARBALL} and "
                                  f"{LINUXKIT_PATCH})")
        key = f"{self.digests.of(tarball)} {self.digests.of(patch)}\n"
        parent = self.cache / "linuxkit-src"
        final = parent / f"linuxkit-{LINUXKIT_VERSION}"
        stamp = final / ".test-os-key"
        if stamp.is_file() and stamp.read_text() == key:
            step(f"linuxkit source: {final} (up to date)")
            return final
        step(f"linuxkit source: unpacking {tarball.name} and applying {patch.name}")
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".unpack-"))
        try:
            run(["tar", "-xzf", tarball, "-C", tmp], what=f"unpacking {tarball}",
                fix="the tarball is damaged: copy it again")
            src = tmp / f"linuxkit-{LINUXKIT_VERSION}"
            if not src.is_dir():
                raise TestOsError(f"{tarball} has no linuxkit-{LINUXKIT_VERSION}/ at its top: is it the right tarball?")
            with open(patch, "rb") as handle:
                run(["patch", "-p1", "-E", "-s"], cwd=src, stdin=handle, what=f"applying {patch.name}",
                    fix=f"the patch does not fit this source: use the {LINUXKIT_PATCH} made for {LINUXKIT_VERSION}")
            (src / ".test-os-key").write_text(key)
            replace_dir(src, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    # 2. Go programs (and usermode-helper)
    def programs(self, src: Path) -> dict[str, Path]:
        if not os.access(self.go, os.X_OK):
            raise TestOsError(f"go not found at {self.go}: apt-get install -t trixie golang-1.24-go "
                              "(see TEST-MACHINE.md), or pass --go PATH")
        pkg = src / "pkg"
        ldflags = "-s -w"
        builds: list[tuple[str, Path, list[str], dict[str, str]]] = [
            ("init", pkg / "init", ["./cmd/init"], {}),
            ("rc.init", pkg / "init", ["./cmd/rc.init"], {}),
            ("service", pkg / "init", ["-ldflags", f"{ldflags} -X main.Version={LINUXKIT_VERSION}", "./cmd/service"],
             {}),
            ("sysctl", pkg / "sysctl", ["."], {}),
            ("sysfs", pkg / "sysfs", ["."], {}),
            ("rngd", pkg / "rngd", ["-ldflags", f"{ldflags} -extldflags -static", "./cmd/rngd"],
             {"CGO_ENABLED": "1", "CGO_CFLAGS_ALLOW": "-mrdrnd|-mrdseed"}),
        ]
        key = hashlib.sha256(json.dumps([
            RECIPE_VERSION, (src / ".test-os-key").read_text(), self.digests.of(self.go.resolve()),
            [(n, str(d.relative_to(src)), a, e) for n, d, a, e in builds],
            self.digests.of(pkg / "init/usermode-helper.c"),
        ]).encode()).hexdigest()
        out = self.work / "bin"
        names = [b[0] for b in builds]
        stamp = out / ".key"
        if stamp.is_file() and stamp.read_text() == key and all((out / n).is_file() for n in names):
            step(f"programs: {', '.join(names)}{', usermode-helper' if (out / 'usermode-helper').exists() else ''} "
                 "(up to date)")
            return {p.name: p for p in out.iterdir() if not p.name.startswith(".")}
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.work, prefix=".bin-"))
        try:
            gocache = self.cache / "tools" / "go-build"
            gopath = self.cache / "tools" / "gopath"
            gocache.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "GOCACHE": str(gocache), "GOPATH": str(gopath), "GOTOOLCHAIN": "local",
                   "GOPROXY": "off", "GOFLAGS": "-buildvcs=false", "GOTELEMETRY": "off", "CGO_ENABLED": "0",
                   "PATH": f"{self.go.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
            for name, moddir, args, extra in builds:
                started = time.monotonic()
                mod = ["-mod=vendor"] if (moddir / "vendor").is_dir() else ["-mod=mod"]
                has_ldflags = "-ldflags" in args
                argv = [str(self.go), "build", "-trimpath", *mod, *([] if has_ldflags else ["-ldflags", ldflags]),
                        "-o", str(tmp / name), *args]
                run(argv, cwd=moddir, env={**env, **extra}, what=f"go build of {name} ({moddir.relative_to(src)})",
                    fix=f"see the compiler output above; GOCACHE is {gocache}")
                step(f"programs: built {name} ({time.monotonic() - started:.1f}s)")
            helper = pkg / "init" / "usermode-helper.c"
            try:
                run(["gcc", "-static", "-O2", "-s", "-Werror", "-o", str(tmp / "usermode-helper"), str(helper)],
                    what="gcc -static usermode-helper.c", fix="apt-get install gcc libc6-dev")
                step("programs: built usermode-helper (gcc -static)")
            except TestOsError as exc:
                step(f"programs: usermode-helper skipped ({exc}); the init image will have none")
            (tmp / ".key").write_text(key)
            os.chmod(tmp, 0o755)
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {p.name: p for p in out.iterdir() if not p.name.startswith(".")}

    # 3. Debian packages
    def apt_candidates(self, names: list[str]) -> dict[str, tuple[str, str, str]]:
        """{package: (version, arch, depends)} of apt's candidates; remembered until apt's lists change."""
        lists = Path("/var/lib/apt/lists")
        sig_parts = [" ".join(names)]
        for d in (lists, Path("/etc/apt/preferences.d"), Path("/etc/apt/sources.list.d")):
            with contextlib.suppress(OSError):
                for p in sorted(d.iterdir()):
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        sig_parts.append(f"{p} {st.st_size} {st.st_mtime_ns}")
        sig = hashlib.sha256("\n".join(sig_parts).encode()).hexdigest()
        memo = self.work / f"apt-candidates-{hashlib.sha256(sig_parts[0].encode()).hexdigest()[:12]}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(memo.read_text())
            if saved["sig"] == sig:
                return {k: tuple(v) for k, v in saved["packages"].items()}  # type: ignore[misc]
        out = run(["apt-cache", "show", "--no-all-versions", *names], what="apt-cache show",
                  fix="run `apt-get update` (a package is unknown to apt)")
        found: dict[str, tuple[str, str, str]] = {}
        for para in out.split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", para, re.M))
            if "Package" in fields and fields["Package"] not in found:
                found[fields["Package"]] = (fields.get("Version", ""), fields.get("Architecture", ""),
                                            fields.get("Depends", ""))
        missing = [n for n in names if n not in found]
        if missing:
            raise TestOsError(f"apt knows no package {', '.join(missing)}: run `apt-get update`")
        atomic_write(memo, json.dumps({"sig": sig, "packages": found}).encode())
        return found

    def debs(self) -> tuple[dict[str, Path], str]:
        """Download what is missing into $CACHE/debs and extract each deb once; {package: extracted dir}."""
        meta = self.apt_candidates(["linux-image-amd64"])
        m = re.search(r"(linux-image-[0-9][^ ,]*-amd64)", meta["linux-image-amd64"][2])
        if not m:
            raise TestOsError("linux-image-amd64 depends on no linux-image-*-amd64: run `apt-get update`")
        kernel_pkg = m.group(1)
        kernel_version = kernel_pkg.removeprefix("linux-image-")
        names = [kernel_pkg, *DEBS]
        cand = self.apt_candidates(names)
        debdir = self.cache / "debs"
        debdir.mkdir(parents=True, exist_ok=True)
        # apt-get download's file names: the epoch's colon is written %3a
        files = {n: debdir / f"{n}_{cand[n][0].replace(':', '%3a')}_{cand[n][1]}.deb" for n in names}
        missing = [n for n in names if not files[n].is_file()]
        if missing:
            step(f"debs: apt-get download {' '.join(missing)}")
            tmp = Path(tempfile.mkdtemp(dir=debdir, prefix=".download-"))
            try:
                os.chmod(tmp, 0o755)
                run(["apt-get", "download", "-q", *[f"{n}={cand[n][0]}" for n in missing]], cwd=tmp,
                    what="apt-get download", fix="check the Debian mirror is reachable and run `apt-get update`")
                for n in missing:
                    got = tmp / files[n].name
                    if not got.is_file():
                        raise TestOsError(f"apt-get download did not write {files[n].name}: run `apt-get update`")
                    os.replace(got, files[n])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            step(f"debs: {len(names)} packages in {debdir} (none missing)")
        extracted: dict[str, Path] = {}
        debx = self.work / "debx"
        debx.mkdir(parents=True, exist_ok=True)
        for n in [*DEBS, kernel_pkg]:  # the kernel last: its modules.dep is made with the extracted kmod
            final = debx / files[n].name.removesuffix(".deb")
            if not final.is_dir():
                tmp = Path(tempfile.mkdtemp(dir=debx, prefix=".x-"))
                try:
                    run(["dpkg-deb", "-x", files[n], tmp], what=f"dpkg-deb -x {files[n].name}",
                        fix=f"the deb is damaged: delete {files[n]} and run again")
                    if n == kernel_pkg:
                        step(f"debs: depmod of the whole {kernel_version} module tree (to choose from)")
                        self.depmod(extracted["kmod"], extracted["libkmod2"], tmp, kernel_version)
                    replace_dir(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            extracted[n] = final
        for old in debx.iterdir():  # versions no longer wanted
            if old not in extracted.values():
                shutil.rmtree(old, ignore_errors=True)
        self.kernel_pkg = kernel_pkg
        return extracted, kernel_version

    # python rootfs (the debootstrap base of python-slim)
    def python_root(self) -> Path:
        tar = self.cache / "python-rootfs.tar"
        if not tar.is_file():
            raise TestOsError(f"{tar} not found: run hack/setup-test-machine.sh (it debootstraps it)")
        key = self.digests.of(tar)[:16]
        final = self.work / f"python-rootfs-{key}"
        if not final.is_dir():
            step(f"python-slim: extracting {tar}")
            for old in self.work.glob("python-rootfs-*"):
                shutil.rmtree(old, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(dir=self.work, prefix=".py-"))
            try:
                run(["tar", "-xf", tar, "-C", tmp, "--no-same-owner", "--exclude=./dev/*"],
                    what=f"extracting {tar}", fix="the tar is damaged: delete it and run hack/setup-test-machine.sh")
                replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    @staticmethod
    def depmod(kmod: Path, libkmod: Path, base: Path, version: str) -> None:
        """Debian's depmod (from the extracted kmod and libkmod2 debs) over base/lib/modules/version."""
        libs = ":".join(str(libkmod / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
        kmod_bin = kmod / jail_resolve(kmod, "bin/kmod")
        run(["depmod", "-b", base, version], executable=kmod_bin, env={**os.environ, "LD_LIBRARY_PATH": libs},
            what="depmod (Debian's kmod)", fix="see its output above; delete $CACHE/test-os/debx to extract again")

    # the kernel's modules
    def kernel_tar(self, kx: Path, kmod: Path, libkmod: Path, version: str) -> Path:
        moddir = kx / "lib" / "modules" / version
        if not (moddir / "modules.dep").is_file():
            raise TestOsError(f"{moddir}/modules.dep not found: delete {kx} and run again")
        key = hashlib.sha256(json.dumps([RECIPE_VERSION, kx.name, kmod.name, libkmod.name, MODULE_DIRS,
                                         MODULE_DIRS_SKIP, MODULE_NAMES]).encode()).hexdigest()[:16]
        out = self.work / "kernel" / f"{version}-{key}.tar"
        if out.is_file():
            return out
        step(f"kernel: choosing modules of {version} and running depmod")
        deps: dict[str, list[str]] = {}
        byname: dict[str, str] = {}
        for line in (moddir / "modules.dep").read_text().splitlines():
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
            byname[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
        builtin = (moddir / "modules.builtin").read_text().split()
        builtin_names = {Path(b).name.split(".ko")[0].replace("-", "_") for b in builtin}
        want = {m for m in deps if m.startswith(tuple(d + "/" for d in MODULE_DIRS))
                and not m.startswith(tuple(d + "/" for d in MODULE_DIRS_SKIP))}
        for name in MODULE_NAMES:
            if name in byname:
                want.add(byname[name])
            elif name not in builtin_names:
                raise TestOsError(f"kernel {version} has no module {name}: "
                                  "remove it from MODULE_NAMES in hack/test-os.py")
        todo = list(want)
        while todo:
            for dep in deps[todo.pop()]:
                if dep not in want:
                    want.add(dep)
                    todo.append(dep)
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=".stage-"))
        try:
            dst = stage / "lib" / "modules" / version
            for mod in sorted(want):
                (dst / mod).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(moddir / mod, dst / mod)
            for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
                shutil.copyfile(moddir / f, dst / f)
            self.depmod(kmod, libkmod, stage, version)
            tmp = out.with_name(f".{out.name}.tmp")
            with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
                for path in sorted(stage.rglob("*")):
                    rel = path.relative_to(stage).as_posix()
                    info = tar.gettarinfo(str(path), rel)
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    info.mtime = MTIME
                    if info.isfile():
                        with open(path, "rb") as handle:
                            tar.addfile(info, handle)
                    else:
                        tar.addfile(info)
            for old in out.parent.glob("*.tar"):
                old.unlink()
            os.replace(tmp, out)
            step(f"kernel: {len(want)} modules, kernel.tar {human(out.stat().st_size)}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return out

    # 4. the images
    def images(self, src: Path, bins: dict[str, Path], x: dict[str, Path], kernel_version: str,
               kernel_tar: Path, pyroot: Path) -> list[Image]:
        pkg = src / "pkg"
        tags = package_tags(self.project)
        libs = Libraries([x["libc6"], *[x[n] for n in DEBS if n != "libc6"], Path("/")])
        busybox = x["busybox-static"] / "bin" / "busybox"
        applets = self.busybox_applets(busybox)
        tini = x["tini"] / "usr/bin/tini-static"
        images: list[Image] = []

        def scratch_bb() -> Rootfs:
            fs = Rootfs()
            busybox_links(fs, busybox, applets)
            return fs

        def package(name: str, fs: Rootfs, **kw: Any) -> None:
            if name not in tags:
                return
            build_yml = pkg / name / "build.yml"
            plain = [f"{PKG_ORG}/{name}:{t}" for t in tags[name]]
            images.append(Image(name=name, refs=plain + [f"{r}-amd64" for r in plain], rootfs=fs,
                                config=linuxkit_config(build_yml), arm64_refs=[f"{r}-arm64" for r in plain], **kw))

        known = {"init", "runc", "containerd", "ca-certificates", "firmware", "sysctl", "sysfs", "modprobe",
                 "dhcpcd", "getty", "rngd", "openntpd", "sshd"}
        unknown = sorted(set(tags) - known)
        if unknown:
            raise TestOsError(f"linuxkit/*.yaml names ${{pkg_org}}/{', '.join(unknown)}, which hack/test-os.py cannot "
                              "make: add a builder for it there")

        # init: LinuxKit's init, rc.init, service; busybox instead of Alpine's; a baselayout
        fs = Rootfs()
        baselayout(fs)
        busybox_links(fs, busybox, applets)
        fs.file("init", bins["init"], mode=0o755)
        fs.file("bin/rc.init", bins["rc.init"], mode=0o755)
        fs.symlink("bin/rc.shutdown", "rc.init")
        fs.file("usr/bin/service", bins["service"], mode=0o755)
        if "usermode-helper" in bins:
            fs.file("sbin/usermode-helper", bins["usermode-helper"], mode=0o755)
        fs.symlink("etc/init.d/005-volumes", "/usr/bin/service")
        fs.tree(pkg / "init" / "etc", "etc")
        package("init", fs)

        # runc: Debian's runc (1.1.5, dynamic) with glibc and libseccomp
        fs = Rootfs()
        runc = x["runc"] / "usr/sbin/runc"
        fs.file("usr/bin/runc", runc, mode=0o755)
        add_libraries(fs, [runc], libs, what="runc")
        fs.symlink("etc/init.d/010-onboot", "/usr/bin/service")
        fs.symlink("etc/shutdown.d/010-onshutdown", "/usr/bin/service")
        package("runc", fs)

        # containerd: Debian's containerd 1.6.20 (containerd, ctr, shim v2) with glibc
        fs = Rootfs()
        for b in ("containerd", "ctr", "containerd-shim-runc-v2"):
            fs.file(f"usr/bin/{b}", x["containerd"] / "usr/bin" / b, mode=0o755)
        add_libraries(fs, [x["containerd"] / "usr/bin" / b for b in ("containerd", "ctr", "containerd-shim-runc-v2")],
                      libs, what="containerd")
        fs.file("etc/localtime", pyroot / jail_resolve(pyroot, "usr/share/zoneinfo/UTC"))
        fs.symlink("etc/init.d/020-containerd", "/usr/bin/service")
        fs.tree(pkg / "containerd" / "etc", "etc")
        package("containerd", fs)

        # ca-certificates: Debian's bundle (from the python base, as update-ca-certificates made it)
        fs = Rootfs()
        fs.file("etc/ssl/certs/ca-certificates.crt",
                pyroot / jail_resolve(pyroot, "etc/ssl/certs/ca-certificates.crt"), mode=0o644)
        package("ca-certificates", fs)

        # firmware: none (QEMU's virtio devices need none)
        fs = Rootfs()
        fs.file("lib/firmware/README.hooktest",
                data="hooktest firmware: empty on purpose; QEMU's virtio devices need no firmware.\n")
        package("firmware", fs)

        # sysctl, sysfs: LinuxKit's Go programs and config
        for name in ("sysctl", "sysfs"):
            fs = Rootfs()
            fs.file(f"usr/bin/{name}", bins[name], mode=0o755)
            fs.tree(pkg / name / "etc", "etc")
            package(name, fs, entrypoint=[], cmd=[f"/usr/bin/{name}"])

        # modprobe: busybox's
        package("modprobe", scratch_bb(), entrypoint=[], cmd=[])

        # dhcpcd: Debian's dhcpcd 9.4.1 with its hooks (+ LinuxKit's MTU hook and config)
        fs = Rootfs()
        baselayout(fs)
        busybox_links(fs, busybox, applets)
        d = x["dhcpcd-base"]
        fs.file("usr/sbin/dhcpcd", d / "usr/sbin/dhcpcd", mode=0o755)
        fs.symlink("sbin/dhcpcd", "/usr/sbin/dhcpcd")
        fs.tree(d / "usr/lib/dhcpcd", "usr/lib/dhcpcd")
        fs.tree(pkg / "dhcpcd" / "usr", "usr")
        fs.file("dhcpcd.conf", data=(pkg / "dhcpcd" / "dhcpcd.conf").read_text() + DHCPCD_NODEV, mode=0o644)
        fs.dir("var/lib/dhcpcd")
        fs.dir("run/dhcpcd")
        add_libraries(fs, [d / "usr/sbin/dhcpcd"], libs, what="dhcpcd")
        package("dhcpcd", fs, entrypoint=[], cmd=["/sbin/dhcpcd", "--nobackground", "-f", "/dhcpcd.conf"])

        # getty: busybox shell (INSECURE=true) or getty+login per console; glibc for the bound-in ctr
        fs = Rootfs()
        baselayout(fs)
        busybox_links(fs, busybox, applets)
        add_libraries(fs, [x["containerd"] / "usr/bin/ctr", x["runc"] / "usr/sbin/runc"], libs, what="getty")
        fs.file("sbin/tini", tini, mode=0o755)
        fs.tree(pkg / "getty" / "etc", "etc")
        fs.file("usr/bin/rungetty.sh", ASSETS / "rungetty.sh", mode=0o755)
        package("getty", fs, entrypoint=["/sbin/tini", "-s", "-v", "--"], cmd=["/usr/bin/rungetty.sh"])

        # rngd: LinuxKit's (RDRAND only)
        fs = Rootfs()
        fs.file("sbin/rngd", bins["rngd"], mode=0o755)
        package("rngd", fs, entrypoint=[], cmd=["/sbin/rngd"])

        # openntpd: a stand-in that stays up
        fs = Rootfs()
        baselayout(fs)
        busybox_links(fs, busybox, applets)
        fs.tree(pkg / "openntpd" / "etc", "etc")
        fs.file("usr/sbin/ntpd", ASSETS / "ntpd.sh", mode=0o755)
        package("openntpd", fs, entrypoint=[], cmd=["/usr/sbin/ntpd", "-d"])

        # sshd: Debian's OpenSSH server (+ ssh-keygen), LinuxKit's sshd_config and ssh.sh
        fs = Rootfs()
        baselayout(fs)
        busybox_links(fs, busybox, applets)
        sshd, keygen = x["openssh-server"] / "usr/sbin/sshd", x["openssh-client"] / "usr/bin/ssh-keygen"
        fs.file("usr/sbin/sshd", sshd, mode=0o755)
        fs.file("usr/bin/ssh-keygen", keygen, mode=0o755)
        fs.file("etc/ssh/moduli", x["openssh-server"] / "etc/ssh/moduli", mode=0o644)
        add_libraries(fs, [sshd, keygen], libs, what="sshd")
        fs.file("sbin/tini", tini, mode=0o755)
        fs.tree(pkg / "sshd" / "etc", "etc")
        fs.file("usr/bin/ssh.sh", ASSETS / "ssh.sh", mode=0o755)
        fs.dir("root/.ssh", 0o700)
        package("sshd", fs, entrypoint=[], cmd=["/sbin/tini", "-s", "/usr/bin/ssh.sh"])

        # the kernel: Debian's vmlinuz + the module subset
        fs = Rootfs()
        fs.file("kernel", x[self.kernel_pkg] / f"boot/vmlinuz-{kernel_version}", mode=0o644)
        fs.file("kernel.tar", kernel_tar, mode=0o644)
        kref = f"{KERNEL_REPO}:{kernel_version}"
        images.append(Image(name="kernel", refs=[kref, f"{kref}-amd64"], rootfs=fs, entrypoint=[], cmd=[],
                            arm64_refs=[f"{kref}-arm64"]))

        # python-slim, hook-docker-base
        slim = Image(name="python-slim", refs=[PYTHON_SLIM.format(arch="amd64")], rootfs=python_slim(pyroot),
                     cmd=["/usr/bin/python3"], arm64_refs=[PYTHON_SLIM.format(arch="arm64")])
        images.append(slim)
        images.append(Image(name="hook-docker-base", refs=[DOCKER_BASE.format(arch="amd64")],
                            rootfs=docker_base(slim.rootfs, x, libs, busybox, applets), base=slim,
                            arm64_refs=[DOCKER_BASE.format(arch="arm64")]))

        # tink-worker, action: busybox and a script
        for ref, script in ((TINK_WORKER, "tink-worker.sh"), (ACTION, "action.sh")):
            fs = scratch_bb()
            fs.dir("tmp", 0o1777)
            fs.file(f"usr/bin/{script}", ASSETS / script, mode=0o755)
            images.append(Image(name=ref.split("/")[-1].split(":")[0], refs=[ref], rootfs=fs,
                                cmd=[f"/usr/bin/{script}"]))
        return images

    def busybox_applets(self, busybox: Path) -> list[str]:
        memo = self.work / "busybox-applets.json"
        digest = self.digests.of(busybox)
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(memo.read_text())
            if saved["digest"] == digest:
                return list(saved["applets"])
        out = run([busybox, "--list-full"], what="busybox --list-full", fix="the busybox-static deb is damaged")
        applets = [a.strip() for a in out.splitlines() if a.strip() and a.strip() != "linuxrc"]
        atomic_write(memo, json.dumps({"digest": digest, "applets": applets}).encode())
        return applets

    def inspect(self, refs: list[str]) -> dict[str, dict[str, Any]]:
        """{ref: {id, arch, key, size}} of those refs the engine has."""
        if not refs:
            return {}
        done = subprocess.run(["docker", "image", "inspect", "--format",
                               "{{json .RepoTags}}\t{{.Id}}\t{{.Architecture}}\t{{json .Config.Labels}}\t{{.Size}}",
                               *refs], capture_output=True, text=True, check=False)
        found: dict[str, dict[str, Any]] = {}
        for line in done.stdout.splitlines():
            tags_json, image_id, arch, labels_json, size = line.split("\t")
            labels = json.loads(labels_json) or {}
            for tag in json.loads(tags_json) or []:
                found[tag] = {"id": image_id, "arch": arch, "key": labels.get(KEY_LABEL), "size": int(size)}
        return found

    def build(self, image: Image, arch: str, tags: list[str]) -> None:
        started = time.monotonic()
        argv = ["docker", "buildx", "build", "--builder", "default", "--platform", f"linux/{arch}", "--load",
                "--progress", "plain"]
        for tag in tags:
            argv += ["-t", tag]
        for k, v in image.labels().items():
            argv += ["--label", f"{k}={v}"]
        argv.append("-")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdin is not None and proc.stdout is not None
        output: list[bytes] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
        reader.start()
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                data = image.dockerfile(arch).encode()
                info = tarfile.TarInfo("Dockerfile")
                info.size, info.mtime, info.mode = len(data), MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
                root = tarfile.TarInfo("rootfs")
                root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, MTIME
                tar.addfile(root)
                image.rootfs.write_tar(tar, "rootfs")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        code = proc.wait()
        reader.join()
        if code != 0:
            for line in b"".join(output).decode(errors="replace").strip().splitlines()[-20:]:
                print(f"  | {line}", file=sys.stderr)
            raise TestOsError(f"docker buildx build of {tags[0]} ({arch}) failed (exit {code}): see its output above")
        self.built.append(f"{tags[0]} ({arch})")
        step(f"image: built {tags[0]}{' (arm64 label)' if arch == 'arm64' else ''} "
             f"in {time.monotonic() - started:.1f}s")

    def make_images(self, images: list[Image]) -> dict[str, dict[str, Any]]:
        for image in images:
            image.compute_key(self.digests)
        every = [r for i in images for r in [*i.refs, *i.arm64_refs]]
        have = self.inspect(every + [BUILD_IMAGE])
        if BUILD_IMAGE not in have:
            raise TestOsError(f"{BUILD_IMAGE} not in the docker engine: run hack/setup-test-machine.sh (it makes it)")
        old_ids: set[str] = set()
        for image in images:
            main = have.get(image.ref)
            fresh = (not self.force and main is not None and main["key"] == image.key and main["arch"] == "amd64")
            if not fresh:
                old_ids.update(have[r]["id"] for r in image.refs if r in have)
                self.build(image, "amd64", image.refs)
            else:
                for r in image.refs[1:]:
                    if have.get(r, {}).get("id") != main["id"]:
                        run(["docker", "tag", image.ref, r], what=f"docker tag {r}", fix="check the docker engine")
            if image.arm64_refs:
                others = [have.get(r) for r in image.arm64_refs]
                if self.force or any(o is None or o["key"] != image.key or o["arch"] != "arm64" for o in others):
                    old_ids.update(o["id"] for o in others if o is not None)
                    self.build(image, "arm64", image.arm64_refs)
        if not self.built:
            step(f"images: all {len(images)} up to date (and their arm64-labelled copies)")
        now = self.inspect(every)
        live = {v["id"] for v in now.values()}
        for stale in sorted(old_ids - live):
            subprocess.run(["docker", "image", "rm", stale], capture_output=True, check=False)
        missing = [r for r in every if r not in now]
        if missing:
            raise TestOsError(f"{missing[0]} is not in the docker engine after its build: check `docker images`")
        return now

    # 5. the manifest
    def manifest(self, src: Path, images: list[Image], now: dict[str, dict[str, Any]],
                 kernel_version: str) -> dict[str, Any]:
        by = {i.name: i for i in images}
        packages = {i.name: [r for r in i.refs if not r.endswith("-amd64")]
                    for i in images if i.ref.startswith(PKG_ORG)}
        sizes: dict[str, int] = {}
        for image in images:
            sizes[image.ref] = now[image.ref]["size"]
        manifest = {
            "pkg_org": PKG_ORG,
            "kernel": by["kernel"].ref,
            "kernel_version": kernel_version,
            "python_slim": PYTHON_SLIM,
            "docker_base": DOCKER_BASE,
            "build_image": BUILD_IMAGE,
            "tink_worker": TINK_WORKER,
            "action": ACTION,
            "linuxkit_src": str(src),
            "packages": {k: v[0] if len(v) == 1 else v for k, v in sorted(packages.items())},
            "arm64": {
                "scheme": "LinuxKit packages and the kernel: <ref>-arm64 (the amd64 content with the arm64 label; "
                          "<ref>-amd64 is the same image as <ref>), as `linuxkit pkg` tags per-arch images; "
                          "python-slim and hook-docker-base: {arch} in the tag",
                "per_arch": "{ref}-{arch}",
                "images": {r: a for i in images for r, a in zip(i.refs, i.arm64_refs, strict=False)},
            },
            "sizes": sizes,
            "keys": {i.ref: i.key for i in images},
        }
        atomic_write(self.cache / "test-os.json", (json.dumps(manifest, indent=2) + "\n").encode())
        return manifest

    def main(self) -> int:
        started = time.monotonic()
        self.preflight()
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                step(f"waiting for another run of test-os.py on {self.cache}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.remove_leftovers()
                src = self.linuxkit_src()
                bins = self.programs(src)
                x, kernel_version = self.debs()
                pyroot = self.python_root()
                ktar = self.kernel_tar(x[self.kernel_pkg], x["kmod"], x["libkmod2"], kernel_version)
                step("images: computing content keys")
                images = self.images(src, bins, x, kernel_version, ktar, pyroot)
                now = self.make_images(images)
                manifest = self.manifest(src, images, now, kernel_version)
            finally:
                self.digests.save()
        for image in images:
            own = f", {human(image.rootfs.size())} of its own" if image.base else ""
            step(f"  {image.ref}: {human(manifest['sizes'][image.ref])}{own}")
        step(f"manifest: {self.cache / 'test-os.json'} ({len(self.built)} builds, "
             f"{time.monotonic() - started:.1f}s)")
        return 0


def python_slim(pyroot: Path) -> Rootfs:
    """The smallest python3 we make: the interpreter, the stdlib minus tests/tk/idle/..., its libraries, CA certs."""
    fs = Rootfs()
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        fs.symlink(link, target)
    for d in ("dev", "proc", "sys", "run", "etc", "usr/local/bin", "var/lib", "var/log", "var/cache"):
        fs.dir(d)
    fs.dir("tmp", 0o1777)
    fs.dir("var/tmp", 0o1777)
    fs.dir("root", 0o700)
    version = "python3.11"
    exe = pyroot / "usr/bin" / version
    if not exe.is_file():
        raise TestOsError(f"{exe} not found: python-rootfs.tar is not a bookworm python3 debootstrap; "
                          "delete it and run hack/setup-test-machine.sh")
    fs.file(f"usr/bin/{version}", exe)
    fs.symlink("usr/bin/python3", version)
    stdlib = pyroot / "usr/lib" / version
    dynload: list[Path] = []

    def skip(rel: str) -> bool:
        first = rel.split("/")[0]
        name = rel.rsplit("/", 1)[-1]
        if first in PYTHON_DROP_DIRS or name == "__pycache__" or name.endswith((".pyc", ".exe")):
            return True
        if first.startswith("config-3"):
            return True
        if rel in PYTHON_DROP_FILES:
            return True
        if first == "lib-dynload" and "/" in rel:
            if name.startswith(PYTHON_DROP_EXT):
                return True
            dynload.append(stdlib / rel)
        return False

    fs.tree(stdlib, f"usr/lib/{version}", skip=skip)
    fs.dir("usr/lib/python3/dist-packages")
    # Debian's sitecustomize (a symlink into /etc)
    site = pyroot / "etc" / version
    if site.is_dir():
        fs.tree(site, f"etc/{version}")
    libs = Libraries([pyroot])
    loader = libs.find(LOADER)
    if loader is None:
        raise TestOsError(f"{LOADER} not in {pyroot}: python-rootfs.tar is incomplete; delete it and run "
                          "hack/setup-test-machine.sh")
    fs.file(f"usr/lib/x86_64-linux-gnu/{LOADER}", loader, mode=0o755)
    fs.symlink(f"usr/lib64/{LOADER}", f"/lib/x86_64-linux-gnu/{LOADER}")
    add_libraries(fs, [exe, *dynload], libs, libdir="usr/lib/x86_64-linux-gnu", what="python-slim")
    # TLS: Debian's CA bundle and OpenSSL's configuration
    fs.file("etc/ssl/certs/ca-certificates.crt", pyroot / jail_resolve(pyroot, "etc/ssl/certs/ca-certificates.crt"))
    fs.file("etc/ssl/openssl.cnf", pyroot / "etc/ssl/openssl.cnf")
    fs.symlink("usr/lib/ssl/certs", "/etc/ssl/certs")
    fs.symlink("usr/lib/ssl/openssl.cnf", "/etc/ssl/openssl.cnf")
    fs.symlink("usr/lib/ssl/cert.pem", "/etc/ssl/certs/ca-certificates.crt")
    fs.file("etc/passwd", data="root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    fs.file("etc/group", data="root:x:0:\nnogroup:x:65534:\n")
    fs.file("etc/nsswitch.conf", data=NSSWITCH)
    fs.file("etc/hosts", data=HOSTS)
    for name in ("protocols", "services"):
        if (pyroot / "etc" / name).is_file():
            fs.file(f"etc/{name}", pyroot / "etc" / name)
    fs.file("etc/os-release", pyroot / jail_resolve(pyroot, "etc/os-release"))
    return fs


def docker_base(slim: Rootfs, x: dict[str, Path], libs: Libraries, busybox: Path, applets: list[str]) -> Rootfs:
    """python-slim + Debian's docker.io 20.10, containerd, runc, tini, iptables (nft) and busybox."""
    fs = Rootfs(base=slim)
    dio, ctd, runc, ipt = x["docker.io"], x["containerd"], x["runc"], x["iptables"]
    elves = [dio / "usr/sbin/dockerd", dio / "usr/bin/docker", dio / "usr/sbin/docker-proxy",
             ctd / "usr/bin/containerd", ctd / "usr/bin/containerd-shim-runc-v2", runc / "usr/sbin/runc",
             ipt / "usr/sbin/xtables-nft-multi", x["tini"] / "usr/bin/tini-static"]
    fs.file("usr/sbin/dockerd", elves[0], mode=0o755)
    fs.file("usr/bin/docker", elves[1], mode=0o755)
    fs.file("usr/sbin/docker-proxy", elves[2], mode=0o755)
    fs.file("usr/bin/containerd", elves[3], mode=0o755)
    fs.file("usr/bin/containerd-shim-runc-v2", elves[4], mode=0o755)
    fs.file("usr/sbin/runc", elves[5], mode=0o755)
    fs.symlink("usr/bin/runc", "../sbin/runc")
    fs.file("usr/bin/tini-static", elves[7], mode=0o755)
    fs.symlink("usr/bin/docker-init", "tini-static")
    fs.symlink("usr/local/bin/dockerd", "/usr/sbin/dockerd")
    fs.file("usr/sbin/xtables-nft-multi", elves[6], mode=0o755)
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save",
                 "ip6tables-restore", "iptables-nft", "ip6tables-nft"):
        fs.symlink(f"usr/sbin/{tool}", "xtables-nft-multi")
    xt = ipt / "usr/lib/x86_64-linux-gnu/xtables"
    extensions = sorted(xt.glob("*.so"))
    for so in extensions:
        fs.file(f"usr/lib/x86_64-linux-gnu/xtables/{so.name}", so)
    etc_eth = ipt / "etc/ethertypes"
    if etc_eth.is_file():
        fs.file("etc/ethertypes", etc_eth)
    add_libraries(fs, [*elves, *extensions], libs, libdir="usr/lib/x86_64-linux-gnu", what="hook-docker-base")
    busybox_links(fs, busybox, applets, at="usr/bin/busybox")
    fs.file("etc/group", data="root:x:0:\nnogroup:x:65534:\ndocker:x:999:\n")
    fs.dir("etc/docker")
    fs.dir("var/lib/docker", 0o710)
    return fs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/test-os.py",
        description="Make, in the local docker engine, LinuxKit's package images (org hooktest/linuxkit), the "
                    "kernel image, python-slim, hook-docker-base, tink-worker and action test images from Debian "
                    "packages and LinuxKit's sources, so that `doit dev_dist` with the real LinuxKit builds a Hook "
                    "OS that boots here. Cached: a run with nothing changed builds nothing. Writes "
                    "$CACHE/test-os.json. See docs/test-os.md.")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("HOOK_TEST_CACHE") or DEFAULT_CACHE),
                        help="cache directory (default: $HOOK_TEST_CACHE or %(default)s)")
    parser.add_argument("--project", type=Path, default=DEFAULT_PROJECT,
                        help="the hook checkout whose linuxkit/*.yaml name the package tags (default: %(default)s)")
    parser.add_argument("--linuxkit-src-dir", type=Path,
                        default=Path(os.environ.get("HOOK_LINUXKIT_SRC_DIR") or DEFAULT_LINUXKIT_SRC_DIR),
                        help=f"directory with {LINUXKIT_TARBALL} and {LINUXKIT_PATCH} "
                             "(default: $HOOK_LINUXKIT_SRC_DIR or %(default)s)")
    parser.add_argument("--go", type=Path, default=Path(DEFAULT_GO), help="the go binary (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="build every image again, whatever its key")
    args = parser.parse_args(argv)
    try:
        try:
            args.cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TestOsError(f"cannot create the cache directory {args.cache} ({exc.strerror}): "
                              "pass --cache DIR or set HOOK_TEST_CACHE") from exc
        return TestOs(args.cache.resolve(), args.project.resolve(), args.linuxkit_src_dir, args.go,
                      args.force).main()
    except TestOsError as exc:
        print(f"test-os: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"test-os: error: {exc.filename or ''}: {exc.strerror or exc}: check the path and its permissions",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("test-os: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
