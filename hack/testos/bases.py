"""The base images of our two programs, per arch: python-slim (amd64 from $CACHE/python-rootfs.tar, the
debootstrap base; arm64 from $CACHE/python-rootfs-arm64.tar, Debian's arm64 packages unpacked by
hack/setup-test-machine.sh; each extracted once) and hook-docker-base (python-slim + Debian's
docker.io, containerd, runc, tini, iptables, kexec-tools and busybox of the same arch).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .common import (
    AMD64,
    HOSTS,
    NSSWITCH,
    Arch,
    Digests,
    Libraries,
    Rootfs,
    TestOsError,
    add_libraries,
    busybox_links,
    jail_resolve,
    replace_dir,
    run,
    step,
)
from .engine import Image

PYTHON_SLIM = "hooktest/python-slim:{arch}"
DOCKER_BASE = "hooktest/hook-docker-base:{arch}"

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


def python_root(cache: Path, work: Path, digests: Digests, arch: Arch = AMD64) -> Path:
    """$CACHE/python-rootfs.tar extracted to $CACHE/test-os/python-rootfs-<hash>/ (once per tar); arm64:
    $CACHE/python-rootfs-arm64.tar to $CACHE/test-os/python-arm64-rootfs-<hash>/."""
    tar = cache / ("python-rootfs.tar" if arch == AMD64 else f"python-rootfs-{arch.name}.tar")
    if not tar.is_file():
        raise TestOsError(f"{tar} not found: run hack/setup-test-machine.sh (it makes it)")
    key = digests.of(tar)[:16]
    prefix = "python-rootfs-" if arch == AMD64 else f"python-{arch.name}-rootfs-"
    final = work / f"{prefix}{key}"
    if not final.is_dir():
        step(f"python-slim ({arch.name}): extracting {tar}")
        for old in work.glob(f"{prefix}*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=work, prefix=".py-"))
        try:
            run(["tar", "-xf", tar, "-C", tmp, "--no-same-owner", "--exclude=./dev/*"],
                what=f"extracting {tar}", fix="the tar is damaged: delete it and run hack/setup-test-machine.sh")
            replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def python_slim(pyroot: Path, arch: Arch = AMD64) -> Rootfs:
    """The smallest python3 we make: the interpreter, the stdlib minus tests/tk/idle/..., its libraries, CA certs."""
    fs = Rootfs()
    links = (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"))
    for link, target in (*links, ("lib64", "usr/lib64")) if arch == AMD64 else links:
        fs.symlink(link, target)
    for d in ("dev", "proc", "sys", "run", "etc", "usr/local/bin", "var/lib", "var/log", "var/cache"):
        fs.dir(d)
    fs.dir("tmp", 0o1777)
    fs.dir("var/tmp", 0o1777)
    fs.dir("root", 0o700)
    version = "python3.11"
    exe = pyroot / "usr/bin" / version
    if not exe.is_file():
        raise TestOsError(f"{exe} not found: {pyroot.name} is not a bookworm python3 root; "
                          "delete its tar in the cache and run hack/setup-test-machine.sh")
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
    libs = Libraries([pyroot], arch, fix=f"{pyroot.name} is incomplete: delete its tar in the cache and run "
                                        "hack/setup-test-machine.sh")
    loader = libs.find(arch.loader)
    if loader is None:
        raise TestOsError(f"{arch.loader} not in {pyroot}: its tar is incomplete; delete it and run "
                          "hack/setup-test-machine.sh")
    fs.file(f"usr/lib/{arch.triplet}/{arch.loader}", loader, mode=0o755)
    if arch == AMD64:
        fs.symlink(f"usr/lib64/{arch.loader}", f"/lib/{arch.triplet}/{arch.loader}")
    else:  # /lib/ld-linux-aarch64.so.1, as Debian's libc6
        fs.symlink(f"usr/{arch.interp.lstrip('/')}", f"{arch.triplet}/{arch.loader}")
    add_libraries(fs, [exe, *dynload], libs, libdir=f"usr/lib/{arch.triplet}", what=f"python-slim ({arch.name})")
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
    """python-slim + Debian's docker.io 20.10, containerd, runc, tini, iptables (nft), kexec-tools
    (kexec actions; the shipped hook-docker adds Alpine's kexec-tools) and busybox."""
    fs = Rootfs(base=slim)
    dio, ctd, runc, ipt = x["docker.io"], x["containerd"], x["runc"], x["iptables"]
    elves = [dio / "usr/sbin/dockerd", dio / "usr/bin/docker", dio / "usr/sbin/docker-proxy",
             ctd / "usr/bin/containerd", ctd / "usr/bin/containerd-shim-runc-v2", runc / "usr/sbin/runc",
             ipt / "usr/sbin/xtables-nft-multi", x["tini"] / "usr/bin/tini-static", x["kexec-tools"] / "sbin/kexec"]
    fs.file("sbin/kexec", elves[8], mode=0o755)
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
    triplet = libs.arch.triplet
    xt = ipt / f"usr/lib/{triplet}/xtables"
    extensions = sorted(xt.glob("*.so"))
    if not extensions:
        raise TestOsError(f"no xtables extensions in {xt}: the iptables deb is damaged; delete it and run again")
    for so in extensions:
        fs.file(f"usr/lib/{triplet}/xtables/{so.name}", so)
    etc_eth = ipt / "etc/ethertypes"
    if etc_eth.is_file():
        fs.file("etc/ethertypes", etc_eth)
    add_libraries(fs, [*elves, *extensions], libs, libdir=f"usr/lib/{triplet}",
                  what=f"hook-docker-base ({libs.arch.name})")
    busybox_links(fs, busybox, applets, at="usr/bin/busybox")
    fs.file("etc/group", data="root:x:0:\nnogroup:x:65534:\ndocker:x:999:\n")
    fs.dir("etc/docker")
    fs.dir("var/lib/docker", 0o710)
    return fs


def base_images(pyroot: Path, x: dict[str, Path], libs: Libraries, busybox: Path, applets: list[str]) -> list[Image]:
    """python-slim and hook-docker-base (FROM python-slim) of libs' arch (pyroot, x and busybox are of it too)."""
    arch = libs.arch
    slim = Image(name="python-slim", refs=[PYTHON_SLIM.format(arch=arch.name)], rootfs=python_slim(pyroot, arch),
                 cmd=["/usr/bin/python3"], arch=arch.name)
    docker = Image(name="hook-docker-base", refs=[DOCKER_BASE.format(arch=arch.name)],
                   rootfs=docker_base(slim.rootfs, x, libs, busybox, applets), base=slim, arch=arch.name)
    return [slim, docker]
