"""The plumbing of hack/test-os.py: errors and output, files, the digest memo, the target arches
(Arch: AMD64, ARM64), ELF needs, machine checks and libraries, root filesystems as lists of entries,
busybox, the alpine-baselayout stand-in, the lock.

Everything else in the package builds on this module; it imports none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

#: hack/, where the command is; the shell scripts that go into images are in hack/test-os/.
HACK = Path(__file__).resolve().parent.parent
ASSETS = HACK / "test-os"

#: mtime of every file put into an image (LinuxKit's own defaultModTime).
MTIME = 1492533000
#: Bump to rebuild everything after a change that the content keys cannot see.
RECIPE_VERSION = "1"



@dataclasses.dataclass(frozen=True)
class Arch:
    """A target architecture: Debian's and docker's name, the GNU triplet, the glibc loader, the ELF machine."""

    name: str
    triplet: str
    #: the loader's path, as each dynamic program's PT_INTERP names it
    interp: str
    #: ELF e_machine of every program and library of this arch
    machine: int
    #: where Libraries looks for a soname, in this order
    lib_dirs: tuple[str, ...]
    #: the C compiler for the static programs (rngd's cgo, usermode-helper)
    cc: str
    #: the Debian packages that hold `cc` and its static libc (the fix when it is missing)
    cc_debs: str

    @property
    def loader(self) -> str:
        return self.interp.rsplit("/", 1)[1]

    @property
    def uname(self) -> str:
        return self.triplet.split("-")[0]


AMD64 = Arch("amd64", "x86_64-linux-gnu", "/lib64/ld-linux-x86-64.so.2", 0x3E,
             ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib"),
             "gcc", "gcc libc6-dev")
ARM64 = Arch("arm64", "aarch64-linux-gnu", "/lib/ld-linux-aarch64.so.1", 0xB7,
             ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib"),
             "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu libc6-dev-arm64-cross")
ARCHES = (AMD64, ARM64)

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

def elf_machine(path: Path) -> int | None:
    """ELF e_machine of a file (0x3E x86_64, 0xB7 aarch64); None when not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int(struct.unpack_from("<H", head, 18)[0])


def check_machine(path: Path, arch: Arch, what: str) -> None:
    """Refuse an ELF file of another arch (an amd64 library in an arm64 image, say)."""
    machine = elf_machine(path)
    if machine is not None and machine != arch.machine:
        raise TestOsError(f"{what}: {path} is not {arch.uname} (ELF machine {machine:#x}, want {arch.machine:#x}): "
                          "a damaged cache or a bug in hack/testos/; delete the file and run again")


def elf_needs(path: Path) -> tuple[str | None, list[str]] | None:
    """(interpreter, DT_NEEDED names) of an ELF64 little-endian file; None when not ELF."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return None
        if head[4] != 2 or head[5] != 1:
            raise TestOsError(f"{path}: not a 64-bit little-endian ELF file: only x86_64 and aarch64 content is "
                              "made here")
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
    """Finds shared libraries of one arch by soname in some root trees (extracted debs, and for amd64 the host)."""

    def __init__(self, roots: Sequence[Path], arch: Arch = AMD64, *, fix: str = "") -> None:
        self.roots = list(roots)
        self.arch = arch
        #: what to do when a soname is found nowhere
        self.fix = fix or "add the Debian package that has it to DEBS in hack/testos/debs.py"
        self.cache: dict[str, Path | None] = {}

    def find(self, soname: str) -> Path | None:
        if soname not in self.cache:
            self.cache[soname] = None
            for root in self.roots:
                for libdir in self.arch.lib_dirs:
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


def add_libraries(fs: Rootfs, binaries: Iterable[Path], libs: Libraries, *, libdir: str | None = None,
                  what: str) -> None:
    """Add the shared libraries (and the loader) the ELF files need, transitively, unless fs (or its base) has
    them; every file must be of libs' arch (its ELF machine), and so must every library found."""
    arch = libs.arch
    libdir = libdir or f"lib/{arch.triplet}"
    todo = list(binaries)
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        check_machine(path, arch, what)
        info = elf_needs(path)
        if info is None:
            continue
        interp, needed = info
        if interp and interp != arch.interp:
            raise TestOsError(f"{what}: unexpected ELF interpreter {interp} in {path}: only {arch.uname} glibc "
                              f"programs ({arch.interp}) are handled")
        if interp and not fs.has(arch.interp.lstrip("/")):
            loader = libs.find(arch.loader)
            if loader is None:
                raise TestOsError(f"{what}: {arch.loader} not found: add libc6 to DEBS in hack/testos/debs.py")
            check_machine(loader, arch, what)
            fs.file(arch.interp.lstrip("/"), loader, mode=0o755)
        for soname in needed:
            if soname in seen:
                continue
            seen.add(soname)
            if fs.has(f"{libdir}/{soname}") or fs.has(f"usr/lib/{arch.triplet}/{soname}") \
                    or fs.has(f"lib/{arch.triplet}/{soname}"):
                continue
            found = libs.find(soname)
            if found is None:
                raise TestOsError(f"{what}: shared library {soname} ({arch.name}) not found in the downloaded debs"
                                  f"{' or on this host' if Path('/') in libs.roots else ''}: {libs.fix}")
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


def scratch_busybox(busybox: Path, applets: list[str]) -> Rootfs:
    """A root filesystem of busybox and its applet links only."""
    fs = Rootfs()
    busybox_links(fs, busybox, applets)
    return fs


def busybox_applets(busybox: Path, work: Path, digests: Digests) -> list[str]:
    """busybox --list-full (without linuxrc), remembered in work/busybox-applets.json per busybox digest."""
    memo = work / "busybox-applets.json"
    digest = digests.of(busybox)
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(memo.read_text())
        if saved["digest"] == digest:
            return list(saved["applets"])
    out = run([busybox, "--list-full"], what="busybox --list-full", fix="the busybox-static deb is damaged")
    applets = [a.strip() for a in out.splitlines() if a.strip() and a.strip() != "linuxrc"]
    atomic_write(memo, json.dumps({"digest": digest, "applets": applets}).encode())
    return applets


# --- the lock -------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive flock on path; when another process holds it, say `waiting` and wait."""
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step(waiting)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
