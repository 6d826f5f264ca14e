#!/usr/bin/env python3
"""unpack.py --arch ARCH --packages packages.list --out ROOT: the Debian packages the list names,
for ARCH, with what they depend on, unpacked into ROOT (nothing of them runs).

The dependency closure is apt's own (`apt-get install --simulate` against an empty package
database, as for a new ARCH system); the list's `-name` lines take out packages only maintainer
scripts need. Then every ELF file's libraries (DT_NEEDED) must be in ROOT: a missing one is one
line `hook: error: ...`. udev's hardware database (hwdb.bin) is compiled with the builder's udevadm.
Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

DROP = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
        "usr/share/bash-completion", "usr/share/bug", "usr/share/zsh", "etc/init.d", "etc/rc0.d", "etc/rcS.d",
        "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/aarch64-linux-gnu/gconv")
LIBS = ("lib/{triplet}", "usr/lib/{triplet}", "lib", "usr/lib", "lib/{triplet}/systemd", "lib/systemd")
TRIPLET = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}


def die(message: str) -> None:
    print(f"hook: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def closure(arch: str, wanted: list[str], excluded: set[str]) -> list[str]:
    """`name:arch` of every package to unpack."""
    with tempfile.NamedTemporaryFile() as status:
        done = subprocess.run(["apt-get", "install", "--simulate", "-qq", "--no-install-recommends",
                               "-o", f"Dir::State::status={status.name}", "-o", f"APT::Architecture={arch}",
                               "-o", f"APT::Architectures::={arch}", *wanted], capture_output=True, text=True)
    if done.returncode != 0:
        die(f"apt cannot resolve {' '.join(wanted)} for {arch}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    found = []
    for line in done.stdout.splitlines():
        m = re.match(r"Inst (\S+) \(\S+ .*\[(\w+)\]\)", line)
        if m and m.group(1) not in excluded:
            found.append(f"{m.group(1)}:{m.group(2)}")
    return found


def needed(path: Path) -> list[str] | None:
    """The DT_NEEDED libraries of an ELF file, or None when it is not a dynamic ELF."""
    with path.open("rb") as handle:
        data = handle.read()
    if data[:4] != b"\x7fELF":
        return None
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:
        shoff, = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
    else:
        shoff, = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", data, 0x2E)
    sections = []
    for i in range(shnum):
        at = shoff + i * shentsize
        if wide:
            _, kind, _, _, offset, size, link = struct.unpack_from(order + "IIQQQQI", data, at)
        else:
            _, kind, _, _, offset, size, link = struct.unpack_from(order + "IIIIIII", data, at)
        sections.append((kind, offset, size, link))
    for kind, offset, size, link in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        _, str_off, _, _ = sections[link]
        entry = 16 if wide else 8
        names = []
        for at in range(offset, offset + size, entry):
            tag, value = struct.unpack_from(order + ("qQ" if wide else "iI"), data, at)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", str_off + value)
                names.append(data[str_off + value:end].decode())
        return names
    return None


def check_libraries(root: Path, arch: str) -> int:
    dirs = [root / d.format(triplet=TRIPLET[arch]) for d in LIBS]
    checked = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.stat().st_size < 64:
            continue
        libs = needed(path)
        if libs is None:
            continue
        checked += 1
        for lib in libs:
            if not any((d / lib).exists() or (d / lib).is_symlink() for d in dirs):
                die(f"{path.relative_to(root)} needs {lib}, which no unpacked package has: take its package's "
                    "`-` line out of containers/hook-events/packages.list")
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--arch", required=True, choices=sorted(TRIPLET))
    parser.add_argument("--packages", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines = [line.split("#", 1)[0].strip() for line in args.packages.read_text().splitlines()]
    wanted = [f"{line}:{args.arch}" for line in lines if line and not line.startswith("-")]
    excluded = {line[1:] for line in lines if line.startswith("-")}
    packages = closure(args.arch, wanted, excluded)
    debs = Path(tempfile.mkdtemp(prefix="debs-"))
    os.chmod(debs, 0o777)  # apt downloads as _apt
    done = subprocess.run(["apt-get", "download", "-q", *packages], cwd=debs, capture_output=True, text=True)
    if done.returncode != 0:
        die(f"apt-get download failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    args.out.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(args.out)], check=True)
    shutil.rmtree(debs)
    for rel in DROP:
        shutil.rmtree(args.out / rel, ignore_errors=True)
    if not (args.out / "bin" / "sh").exists():
        (args.out / "bin").mkdir(exist_ok=True)
        os.symlink("dash", args.out / "bin" / "sh")
    hwdb = subprocess.run(["udevadm", "hwdb", "--update", f"--root={args.out}"], capture_output=True, text=True)
    if hwdb.returncode != 0:
        die(f"udevadm hwdb --update failed: {hwdb.stderr.strip()[-200:]}")
    checked = check_libraries(args.out, args.arch)
    print(f"hook-events: {len(packages)} packages for {args.arch}, {checked} ELF files with every library they need",
          flush=True)


if __name__ == "__main__":
    main()
