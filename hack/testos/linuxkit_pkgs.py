"""LinuxKit's packages: its v1.8.2 source (unpacked and patched once), its Go programs (and
usermode-helper) per arch (arm64: cross-built, GOARCH=arm64, cgo with aarch64-linux-gnu-gcc), the
package tags the project's configs name, and the package images (init, runc, containerd,
ca-certificates, sysctl, sysfs, modprobe, dhcpcd, getty, rngd, openntpd, sshd) under
hooktest/linuxkit, each per arch from that arch's programs and debs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import (
    AMD64,
    ASSETS,
    RECIPE_VERSION,
    Arch,
    Digests,
    Libraries,
    Rootfs,
    TestOsError,
    add_libraries,
    baselayout,
    busybox_links,
    check_machine,
    jail_resolve,
    replace_dir,
    run,
    scratch_busybox,
    step,
)
from .engine import Image

try:
    import yaml
except ImportError:  # reported when first needed, with the fix
    yaml = None  # type: ignore[assignment]

LINUXKIT_VERSION = "v1.8.2"
LINUXKIT_TARBALL = f"linuxkit-{LINUXKIT_VERSION}-src.tar.gz"
LINUXKIT_PATCH = "no-aws-gcp.patch"

PKG_ORG = "hooktest/linuxkit"

#: Added to LinuxKit's dhcpcd.conf. Debian builds dhcpcd with udev support: with no udev plugin it
#: crashes after its first DISCOVER (a NULL dev), with udev's it waits forever for udevd (there is
#: none). Alpine's, in LinuxKit's real image, has no device manager support at all.
DHCPCD_NODEV = """
# hooktest: Debian's dhcpcd has udev support, and there is no udevd here: use no /dev manager.
nodev
"""


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


def linuxkit_src(cache: Path, src_dir: Path, digests: Digests) -> Path:
    """$CACHE/linuxkit-src/linuxkit-v1.8.2: the tarball unpacked and patched (again when either changes)."""
    tarball, patch = src_dir / LINUXKIT_TARBALL, src_dir / LINUXKIT_PATCH
    for f in (tarball, patch):
        if not f.is_file():
            raise TestOsError(f"{f} not found: pass --linuxkit-src-dir DIR (holding {LINUXKIT_TARBALL} and "
                              f"{LINUXKIT_PATCH})")
    key = f"{digests.of(tarball)} {digests.of(patch)}\n"
    parent = cache / "linuxkit-src"
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


def programs(src: Path, go: Path, cache: Path, work: Path, digests: Digests, arch: Arch = AMD64) -> dict[str, Path]:
    """LinuxKit's Go programs (and usermode-helper) of arch in $CACHE/test-os/bin (bin-arm64): {name: path}.
    arm64 is cross-built: GOARCH=arm64, CGO_ENABLED=0 as for amd64, and rngd's cgo (as LinuxKit,
    which needs cgo for it on arm64 too) and usermode-helper with aarch64-linux-gnu-gcc -static."""
    if not os.access(go, os.X_OK):
        raise TestOsError(f"go not found at {go}: apt-get install -t trixie golang-1.24-go "
                          "(see TEST-MACHINE.md), or pass --go PATH")
    cross = arch != AMD64
    cc = shutil.which(arch.cc)
    if cross and cc is None:
        raise TestOsError(f"{arch.cc} not found (rngd for {arch.name} needs cgo): apt-get install "
                          f"{arch.cc_debs} (hack/setup-test-machine.sh does)")
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
    cross_env = {"GOOS": "linux", "GOARCH": arch.name, "CC": arch.cc} if cross else {}
    recipe: list[Any] = [
        RECIPE_VERSION, (src / ".test-os-key").read_text(), digests.of(go.resolve()),
        [(n, str(d.relative_to(src)), a, e) for n, d, a, e in builds],
        digests.of(pkg / "init/usermode-helper.c"),
    ]
    if cross:  # (amd64's key stays what it was)
        recipe += [cross_env, digests.of(Path(cc).resolve()) if cc else ""]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()
    out = work / ("bin" if not cross else f"bin-{arch.name}")
    names = [b[0] for b in builds]
    stamp = out / ".key"
    if stamp.is_file() and stamp.read_text() == key and all((out / n).is_file() for n in names):
        step(f"programs ({arch.name}): {', '.join(names)}"
             f"{', usermode-helper' if (out / 'usermode-helper').exists() else ''} (up to date)")
        return {p.name: p for p in out.iterdir() if not p.name.startswith(".")}
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work, prefix=".bin-"))
    try:
        gocache = cache / "tools" / "go-build"
        gopath = cache / "tools" / "gopath"
        gocache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOCACHE": str(gocache), "GOPATH": str(gopath), "GOTOOLCHAIN": "local",
               "GOPROXY": "off", "GOFLAGS": "-buildvcs=false", "GOTELEMETRY": "off", "CGO_ENABLED": "0",
               "PATH": f"{go.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}", **cross_env}
        for name, moddir, args, extra in builds:
            started = time.monotonic()
            mod = ["-mod=vendor"] if (moddir / "vendor").is_dir() else ["-mod=mod"]
            has_ldflags = "-ldflags" in args
            argv = [str(go), "build", "-trimpath", *mod, *([] if has_ldflags else ["-ldflags", ldflags]),
                    "-o", str(tmp / name), *args]
            run(argv, cwd=moddir, env={**env, **extra},
                what=f"go build of {name} ({moddir.relative_to(src)}, {arch.name})",
                fix=f"see the compiler output above; GOCACHE is {gocache}")
            check_machine(tmp / name, arch, f"go build of {name}")
            step(f"programs: built {name} ({arch.name}, {time.monotonic() - started:.1f}s)")
        helper = pkg / "init" / "usermode-helper.c"
        try:
            run([arch.cc, "-static", "-O2", "-s", "-Werror", "-o", str(tmp / "usermode-helper"), str(helper)],
                what=f"{arch.cc} -static usermode-helper.c", fix=f"apt-get install {arch.cc_debs}")
            check_machine(tmp / "usermode-helper", arch, "usermode-helper")
            step(f"programs: built usermode-helper ({arch.cc} -static)")
        except TestOsError as exc:
            step(f"programs: usermode-helper ({arch.name}) skipped ({exc}); the init image will have none")
        (tmp / ".key").write_text(key)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {p.name: p for p in out.iterdir() if not p.name.startswith(".")}


def package_images(src: Path, tags: dict[str, list[str]], bins: dict[str, Path], x: dict[str, Path],
                   libs: Libraries, busybox: Path, applets: list[str], pyroot: Path) -> list[Image]:
    """The package images of libs' arch the configs name (tags), each under every tag: amd64 as TAG and
    TAG-amd64, arm64 as TAG-arm64 (`linuxkit pkg`'s per-arch tags)."""
    arch = libs.arch
    pkg = src / "pkg"
    tini = x["tini"] / "usr/bin/tini-static"
    for static in (tini, busybox, *bins.values()):
        check_machine(static, arch, f"the {arch.name} package images")
    images: list[Image] = []

    def package(name: str, fs: Rootfs, **kw: Any) -> None:
        if name not in tags:
            return
        build_yml = pkg / name / "build.yml"
        plain = [f"{PKG_ORG}/{name}:{t}" for t in tags[name]]
        refs = plain + [f"{r}-amd64" for r in plain] if arch == AMD64 else [f"{r}-{arch.name}" for r in plain]
        images.append(Image(name=name, refs=refs, rootfs=fs, config=linuxkit_config(build_yml), arch=arch.name,
                            **kw))

    known = {"init", "runc", "containerd", "ca-certificates", "sysctl", "sysfs", "modprobe",
             "dhcpcd", "getty", "rngd", "openntpd", "sshd"}
    unknown = sorted(set(tags) - known)
    if unknown:
        raise TestOsError(f"linuxkit/*.yaml names ${{pkg_org}}/{', '.join(unknown)}, which hack/test-os.py cannot "
                          "make: add a builder for it to package_images() in hack/testos/linuxkit_pkgs.py")

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

    # sysctl, sysfs: LinuxKit's Go programs and config
    for name in ("sysctl", "sysfs"):
        fs = Rootfs()
        fs.file(f"usr/bin/{name}", bins[name], mode=0o755)
        fs.tree(pkg / name / "etc", "etc")
        package(name, fs, entrypoint=[], cmd=[f"/usr/bin/{name}"])

    # modprobe: busybox's
    package("modprobe", scratch_busybox(busybox, applets), entrypoint=[], cmd=[])

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
    return images
