"""Debian packages: apt's candidates, `apt-get download` into $CACHE/debs, each deb extracted once
into $CACHE/test-os/debx, and the Libraries that look in them (then on the host).

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

from .common import Libraries, TestOsError, atomic_write, replace_dir, run, step

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


def apt_candidates(names: list[str], work: Path) -> dict[str, tuple[str, str, str]]:
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
    memo = work / f"apt-candidates-{hashlib.sha256(sig_parts[0].encode()).hexdigest()[:12]}.json"
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


def debs(cache: Path, work: Path) -> dict[str, Path]:
    """Download what is missing into $CACHE/debs and extract each deb once: {package: extracted dir}."""
    names = list(DEBS)
    cand = apt_candidates(names, work)
    debdir = cache / "debs"
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
    debx = work / "debx"
    debx.mkdir(parents=True, exist_ok=True)
    for n in DEBS:
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


def libraries(x: dict[str, Path]) -> Libraries:
    """Libraries found in the extracted debs (libc6 first), then on the host."""
    return Libraries([x["libc6"], *[x[n] for n in DEBS if n != "libc6"], Path("/")])
