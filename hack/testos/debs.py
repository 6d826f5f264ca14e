"""Debian packages: apt's candidates, `apt-get download` into $CACHE/debs, each deb extracted once
into $CACHE/test-os/debx, and the Libraries that look in them (then on the host).

arm64: the same DEBS plus ARM64_DEBS, from a private apt of our own ($CACHE/apt-arm64: its
apt.conf, lists and status; the host's sources, keyrings and pins), so the host's dpkg architecture
list is never changed; into $CACHE/debs-arm64, extracted to $CACHE/test-os/debx-arm64 with dpkg-deb
(nothing of them is run); their Libraries never look on the host.

No kernel: the OS boots the project's own kernel image (containers/hook-kernel), as users get it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .common import AMD64, Arch, Libraries, TestOsError, atomic_write, replace_dir, run, step

#: Debian packages downloaded into $CACHE/debs. Libraries not listed here come from the host, if it has them.
DEBS = [
    "busybox-static", "libc6", "containerd", "runc", "docker.io", "tini", "iptables", "libip4tc2",
    "libip6tc2", "libxtables12", "libnftnl11", "libnetfilter-conntrack3", "libnfnetlink0", "libmnl0",
    "libseccomp2", "libdevmapper1.02.1", "kmod", "libkmod2", "openssh-server", "openssh-client",
    "libwrap0", "dhcpcd-base", "kexec-tools",
    # kexec-tools links libxenctrl (libxenmisc4.17) and what that links
    "libxenmisc4.17", "libxencall1", "libxendevicemodel1", "libxenevtchn1", "libxenforeignmemory1",
    "libxengnttab1", "libxenhypfs1", "libxenstore4", "libxentoollog1", "libxentoolcore1", "libyajl2",
]

HOST_LISTS = Path("/var/lib/apt/lists")

#: arm64 only: the packages of the libraries the amd64 images take from the host (an arm64 build has
#: no host to fall back on): sshd's (PAM, Kerberos, OpenSSL, ...), dockerd's and kmod's.
ARM64_DEBS = [
    "libaudit1", "libcap-ng0", "libcap2", "libcom-err2", "libcrypt1", "libssl3", "libgcrypt20",
    "libgpg-error0", "libgssapi-krb5-2", "libk5crypto3", "libkeyutils1", "libkrb5-3", "libkrb5support0",
    "liblz4-1", "liblzma5", "libnsl2", "libpam0g", "libpcre2-8-0", "libselinux1", "libsystemd0", "libtirpc3",
    "libudev1", "zlib1g", "libzstd1",
]

#: The private apt of a foreign arch's debs, in $CACHE/apt-<arch> (hack/setup-test-machine.sh writes the same
#: one for its arm64 busybox). The host's /etc/apt (sources, keyrings, pins, apt.conf.d) is read, not changed.
APT_CONF = """\
APT::Architecture "{arch}";
APT::Architectures {{ "{arch}"; }};
Dir::State "{root}/state";
Dir::State::status "{root}/state/status";
Dir::Cache "{root}/cache";
"""


def deb_names(arch: Arch) -> list[str]:
    return list(DEBS) if arch == AMD64 else [*DEBS, *ARM64_DEBS]


def apt_state(lists: Path = HOST_LISTS) -> list[str]:
    """What apt's candidates depend on: its lists, the host's pins and sources (name, size, mtime of each)."""
    parts: list[str] = []
    for d in (lists, Path("/etc/apt/preferences.d"), Path("/etc/apt/sources.list.d")):
        with contextlib.suppress(OSError):
            for p in sorted(d.iterdir()):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    parts.append(f"{p} {st.st_size} {st.st_mtime_ns}")
    return parts


def foreign_apt(cache: Path, arch: Arch) -> dict[str, str]:
    """The environment (APT_CONFIG) of the private apt of arch, its lists fetched when they are missing or
    older than the host's (so both arches' candidates come from the same state of the mirror)."""
    root = cache / f"apt-{arch.name}"
    conf = root / "apt.conf"
    text = APT_CONF.format(arch=arch.name, root=root)
    for d in ("state/lists/partial", "cache/archives/partial"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if not (root / "state/status").exists():
        (root / "state/status").write_text("")
    if not conf.is_file() or conf.read_text() != text:
        atomic_write(conf, text.encode())
    env = {**os.environ, "APT_CONFIG": str(conf)}
    stamp = root / "updated-for"
    sig = hashlib.sha256("\n".join(apt_state()).encode()).hexdigest()
    if not stamp.is_file() or stamp.read_text() != sig:
        step(f"debs: apt-get update of the {arch.name} lists ({root}; the host's apt is not changed)")
        try:
            run(["apt-get", "update", "-q"], env=env, what=f"apt-get update ({arch.name}, APT_CONFIG={conf})",
                fix="check the Debian mirror is reachable (the host's sources in /etc/apt/sources.list.d are used)")
        except TestOsError:
            if not any((root / "state/lists").glob("*_Packages*")):
                raise
            step(f"debs: the {arch.name} lists could not be fetched again: using those of before")
        else:
            atomic_write(stamp, sig.encode())
    return env


def apt_candidates(names: list[str], work: Path, env: dict[str, str] | None = None,
                   lists: Path = HOST_LISTS, fix: str = "run `apt-get update`") -> dict[str, tuple[str, str, str]]:
    """{package: (version, arch, depends)} of apt's candidates (of the apt that env's APT_CONFIG names, else
    the host's); remembered until apt's lists change."""
    sig_parts = [" ".join(names), *apt_state(lists)]
    sig = hashlib.sha256("\n".join(sig_parts).encode()).hexdigest()
    memo = work / f"apt-candidates-{hashlib.sha256(sig_parts[0].encode()).hexdigest()[:12]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        saved = json.loads(memo.read_text())
        if saved["sig"] == sig:
            return {k: tuple(v) for k, v in saved["packages"].items()}  # type: ignore[misc]
    out = run(["apt-cache", "show", "--no-all-versions", *names], what="apt-cache show", env=env,
              fix=f"{fix} (a package is unknown to apt)")
    found: dict[str, tuple[str, str, str]] = {}
    for para in out.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", para, re.M))
        if "Package" in fields and fields["Package"] not in found:
            found[fields["Package"]] = (fields.get("Version", ""), fields.get("Architecture", ""),
                                        fields.get("Depends", ""))
    missing = [n for n in names if n not in found]
    if missing:
        raise TestOsError(f"apt knows no package {', '.join(missing)}: {fix}")
    atomic_write(memo, json.dumps({"sig": sig, "packages": found}).encode())
    return found


def debs(cache: Path, work: Path, arch: Arch = AMD64) -> dict[str, Path]:
    """Download what is missing into $CACHE/debs (-arm64) and extract each deb once: {package: extracted dir}."""
    names = deb_names(arch)
    if arch == AMD64:
        env, suffix = None, ""
        cand = apt_candidates(names, work)
    else:
        env, suffix = foreign_apt(cache, arch), f"-{arch.name}"
        cand = apt_candidates(names, work, env, cache / f"apt-{arch.name}" / "state" / "lists",
                              fix=f"delete {cache / f'apt-{arch.name}'} (its lists are fetched again) or drop the "
                                  "package from ARM64_DEBS in hack/testos/debs.py")
        wrong = [n for n in names if cand[n][1] not in (arch.name, "all")]
        if wrong:
            raise TestOsError(f"apt's candidate of {', '.join(wrong)} is not {arch.name}: "
                              f"delete {cache / f'apt-{arch.name}'} and run again")
    debdir = cache / f"debs{suffix}"
    debdir.mkdir(parents=True, exist_ok=True)
    # apt-get download's file names: the epoch's colon is written %3a
    files = {n: debdir / f"{n}_{cand[n][0].replace(':', '%3a')}_{cand[n][1]}.deb" for n in names}
    missing = [n for n in names if not files[n].is_file()]
    if missing:
        step(f"debs: apt-get download {' '.join(missing)}")
        tmp = Path(tempfile.mkdtemp(dir=debdir, prefix=".download-"))
        try:
            os.chmod(tmp, 0o755)
            run(["apt-get", "download", "-q", *[f"{n}={cand[n][0]}" for n in missing]], cwd=tmp, env=env,
                what=f"apt-get download ({arch.name})",
                fix="check the Debian mirror is reachable and run `apt-get update`")
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
    debx = work / f"debx{suffix}"
    debx.mkdir(parents=True, exist_ok=True)
    for n in names:
        final = debx / files[n].name.removesuffix(".deb")
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=debx, prefix=".x-"))
            try:
                run(["dpkg-deb", "-x", files[n], tmp], what=f"dpkg-deb -x {files[n].name}",
                    fix=f"the deb is damaged: delete {files[n]} and run again")
                replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        extracted[n] = final
    for old in debx.iterdir():  # versions no longer wanted
        if old not in extracted.values():
            shutil.rmtree(old, ignore_errors=True)
    return extracted


def libraries(x: dict[str, Path], arch: Arch = AMD64) -> Libraries:
    """Libraries found in the extracted debs (libc6 first), then (amd64 only) on the host."""
    names = deb_names(arch)
    roots = [x["libc6"], *[x[n] for n in names if n != "libc6"]]
    if arch == AMD64:
        return Libraries([*roots, Path("/")])
    return Libraries(roots, arch, fix="add the Debian package that has it to ARM64_DEBS in hack/testos/debs.py")
