"""The base images of our two programs: python-slim (from $CACHE/python-rootfs.tar, the debootstrap
base, extracted once) and hook-docker-base (python-slim + Debian's docker.io, containerd, runc,
tini, iptables and busybox).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .common import (
    HOSTS,
    LOADER,
    NSSWITCH,
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


def python_root(cache: Path, work: Path, digests: Digests) -> Path:
    """$CACHE/python-rootfs.tar extracted to $CACHE/test-os/python-rootfs-<hash>/ (once per tar)."""
    tar = cache / "python-rootfs.tar"
    if not tar.is_file():
        raise TestOsError(f"{tar} not found: run hack/setup-test-machine.sh (it debootstraps it)")
    key = digests.of(tar)[:16]
    final = work / f"python-rootfs-{key}"
    if not final.is_dir():
        step(f"python-slim: extracting {tar}")
        for old in work.glob("python-rootfs-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=work, prefix=".py-"))
        try:
            run(["tar", "-xf", tar, "-C", tmp, "--no-same-owner", "--exclude=./dev/*"],
                what=f"extracting {tar}", fix="the tar is damaged: delete it and run hack/setup-test-machine.sh")
            replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def base_images(pyroot: Path, x: dict[str, Path], libs: Libraries, busybox: Path, applets: list[str]) -> list[Image]:
    """python-slim and hook-docker-base (FROM python-slim), amd64 and arm64-labelled."""
    slim = Image(name="python-slim", refs=[PYTHON_SLIM.format(arch="amd64")], rootfs=python_slim(pyroot),
                 cmd=["/usr/bin/python3"], arm64_refs=[PYTHON_SLIM.format(arch="arm64")])
    docker = Image(name="hook-docker-base", refs=[DOCKER_BASE.format(arch="amd64")],
                   rootfs=docker_base(slim.rootfs, x, libs, busybox, applets), base=slim,
                   arm64_refs=[DOCKER_BASE.format(arch="arm64")])
    return [slim, docker]
