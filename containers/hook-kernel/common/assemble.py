#!/usr/bin/env python3
"""assemble.py: a kernel tree into a LinuxKit kernel image's files: OUT/kernel, OUT/kernel.tar
(lib/modules/<version>/ and lib/firmware/), OUT/kernel.json (what is in them), OUT/kernel.config.

    assemble.py --arch amd64|arm64 --root TREE --kernel VMLINUZ --config CONFIG --out OUT
                [--modules modules.list | --all-modules] [--firmware-debs DIR] [--package NAME] [--flavour F]
    assemble.py --arch amd64|arm64 --check-config CONFIG

TREE holds lib/modules/<version>/ (or usr/lib/modules/): an unpacked Debian kernel package, or a
`make modules_install` tree. The modules that --modules names (folders and names, see the file)
are taken with everything modules.dep says they need; --all-modules takes every module of TREE.
Firmware: the files those modules name (`firmware=` in their .modinfo, and in modules.builtin.modinfo
for built-in drivers), taken from the unpacked firmware packages in --firmware-debs.

The kernel must be one the Hook OS can boot; a config without one of REQUIRED is refused. Every
refusal is one line `hook: error: ...` and exit 1. Standard library only (it runs in the builder),
plus kmod's depmod. Outputs are reproducible: sorted tar entries, mtime 0, owner 0:0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: Options the Hook OS cannot boot without: what each is for, by arch ("" = every arch).
REQUIRED = (
    ("EFI_STUB", "", "UEFI firmware and iPXE's EFI build start the kernel through its EFI stub"),
    ("DEVTMPFS", "", "LinuxKit's init mounts /dev as devtmpfs"),
    ("BLK_DEV_INITRD", "", "the OS is an initramfs"),
    ("RD_GZIP", "", "LinuxKit and the convert engine write a gzip initramfs"),
    ("SERIAL_8250_CONSOLE", "amd64", "the serial console (ttyS0, ttyS1: a BMC's serial-over-LAN)"),
    ("SERIAL_AMBA_PL011_CONSOLE", "arm64", "the serial console (ttyAMA0)"),
)


def die(message: str) -> None:
    print(f"hook: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def note(message: str) -> None:
    print(f"hook-kernel: {message}", flush=True)


def norm(name: str) -> str:
    return name.replace("-", "_")


def module_name(path: str) -> str:
    return norm(re.sub(r"\.ko(\.(xz|zst|gz))?$", "", os.path.basename(path)))


def read_config(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            values[key.removeprefix("CONFIG_")] = value
    return values


def check_config(config: dict[str, str], arch: str, source: str) -> None:
    for option, only, why in REQUIRED:
        if only and only != arch:
            continue
        if config.get(option) != "y":
            have = config.get(option)
            state = f"={have}" if have else " unset"
            die(f"the kernel config {source} has CONFIG_{option}{state}, the Hook OS needs CONFIG_{option}=y "
                f"({why}): set it (doit kernel_config) or use another kernel")


def pe_facts(path: Path) -> dict[str, bool]:
    """Whether a kernel image is a PE file (an EFI stub) and carries an Authenticode signature."""
    data = path.read_bytes()[:4096]
    if data[:2] != b"MZ" or len(data) < 0x40:
        return {"efi_stub": False, "signed": False}
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe:pe + 4] != b"PE\0\0":
        return {"efi_stub": False, "signed": False}
    optional = pe + 24
    magic = struct.unpack_from("<H", data, optional)[0]
    directories = optional + (112 if magic == 0x20B else 96)
    _, size = struct.unpack_from("<II", data, directories + 4 * 8)  # entry 4: the certificate table
    return {"efi_stub": True, "signed": size > 0}


# --- modules -------------------------------------------------------------------------------------


def modules_dir(root: Path) -> tuple[Path, str]:
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            versions = sorted(p.name for p in base.iterdir()
                              if (p / "kernel").is_dir() or (p / "modules.order").is_file())
            if len(versions) == 1:
                return base / versions[0], versions[0]
            if versions:
                die(f"{base} holds {len(versions)} kernels ({', '.join(versions)}): give a tree with one")
    die(f"{root} has no lib/modules/<version>/: not a kernel package or modules_install tree")
    raise AssertionError


def depmod(root: Path, version: str) -> None:
    done = subprocess.run(["depmod", "-b", str(root), version], capture_output=True, text=True)
    if done.returncode != 0:
        die(f"depmod -b {root} {version} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")


def read_deps(base: Path) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    softdep = base / "modules.softdep"
    if softdep.is_file():  # "softdep NAME pre: A B post: C": load A and B before NAME
        by_name = {module_name(p): p for p in deps}
        for line in softdep.read_text().splitlines():
            words = line.split()
            if len(words) < 3 or words[0] != "softdep" or norm(words[1]) not in by_name:
                continue
            pre = words[words.index("pre:") + 1:] if "pre:" in words else []
            pre = [w for w in pre if not w.endswith(":")]
            for name in pre[:pre.index("post:")] if "post:" in pre else pre:
                if norm(name) in by_name:
                    deps[by_name[norm(words[1])]].append(by_name[norm(name)])
    return deps


def select(deps: dict[str, list[str]], patterns: list[str], builtin: set[str]) -> tuple[list[str], list[str]]:
    """(the modules the patterns take, with their dependencies; the patterns that matched nothing)."""
    by_name = {module_name(p): p for p in deps}
    wanted: set[str] = set()
    excluded = [p[1:] for p in patterns if p.startswith("!")]
    unmatched = []
    for pattern in (p for p in patterns if not p.startswith("!")):
        if pattern.endswith("/"):
            found = [p for p in deps if p.startswith(pattern)]
        else:
            found = [by_name[norm(pattern)]] if norm(pattern) in by_name else []
            if not found and norm(pattern) in builtin:
                continue  # built in: nothing to take
        found = [p for p in found if not any(p.startswith(e) for e in excluded)]
        if not found:
            unmatched.append(pattern)
        wanted.update(found)
    todo = list(wanted)
    while todo:
        for dep in deps[todo.pop()]:
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return sorted(wanted), unmatched


def read_patterns(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def module_bytes(path: Path) -> bytes:
    """A module's bytes, uncompressed: busybox modprobe loads plain .ko only (the signature stays)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        done = subprocess.run(["zstd", "-dc"], input=data, capture_output=True)
        if done.returncode != 0:
            die(f"cannot decompress {path.name}: install zstd in the kernel builder")
        return done.stdout
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


def modinfo(data: bytes, key: str) -> list[str]:
    """The values of `key=` in a module's .modinfo section (ELF64 or ELF32, either byte order)."""
    if data[:4] != b"\x7fELF":
        return []
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    if wide:
        shoff, = struct.unpack_from(order + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)
    else:
        shoff, = struct.unpack_from(order + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x2E)

    def section(index: int) -> tuple[int, int, int]:
        at = shoff + index * shentsize
        if wide:
            name, _, _, _, offset, size = struct.unpack_from(order + "IIQQQQ", data, at)
        else:
            name, _, _, _, offset, size = struct.unpack_from(order + "IIIIII", data, at)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name:end] == b".modinfo":
            fields = data[offset:offset + size].split(b"\0")
            prefix = key.encode() + b"="
            return [f[len(prefix):].decode(errors="replace") for f in fields if f.startswith(prefix)]
    return []


# --- firmware ------------------------------------------------------------------------------------


def unpack_firmware(debs: Path, into: Path) -> list[str]:
    packages = []
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
        packages.append(deb.name.split("_", 1)[0])
    return packages


def firmware_root(tree: Path) -> Path:
    for candidate in (tree / "lib" / "firmware", tree / "usr" / "lib" / "firmware"):
        if candidate.is_dir():
            return candidate
    return tree / "lib" / "firmware"


def copy_firmware(names: set[str], source: Path, out: Path) -> tuple[dict[str, int], list[str]]:
    """Copy each named file (or its .xz/.zst: the kernel tries those too), and the target of a symlink."""
    copied: dict[str, int] = {}
    missing = []
    for name in sorted(names):
        found = next((source / f"{name}{ext}" for ext in ("", ".xz", ".zst")
                      if (source / f"{name}{ext}").is_file() or (source / f"{name}{ext}").is_symlink()), None)
        if found is None:
            missing.append(name)
            continue
        rel = found.relative_to(source)
        real = found.resolve()
        if source.resolve() not in real.parents or not real.is_file():
            missing.append(name)
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if found.is_symlink():
            real_rel = real.relative_to(source.resolve())
            (out / real_rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(real, out / real_rel)
            copied[str(real_rel)] = real.stat().st_size
            if not target.exists():
                os.symlink(os.path.relpath(out / real_rel, target.parent), target)
        else:
            shutil.copyfile(found, target)
            copied[str(rel)] = found.stat().st_size
    return copied, missing


# --- the outputs ---------------------------------------------------------------------------------


def write_tar(root: Path, top: str, target: Path) -> None:
    """An uncompressed tar of root/top as `top/...` (no ./: LinuxKit copies names as they are)."""
    paths = sorted([root / top, *(root / top).rglob("*")], key=lambda p: p.relative_to(root).as_posix())
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            info = tar.gettarinfo(str(path), path.relative_to(root).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            info.mode = 0o755 if info.isdir() else (0o777 if info.issym() else 0o644)
            if info.isfile():
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--arch", required=True, choices=("amd64", "arm64"))
    parser.add_argument("--check-config", type=Path, help="only check that this config has what the OS needs")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--kernel", type=Path)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--modules", type=Path)
    parser.add_argument("--all-modules", action="store_true")
    parser.add_argument("--firmware-debs", type=Path)
    parser.add_argument("--package", default="", help="the kernel package (for the record)")
    parser.add_argument("--flavour", default="debian")
    args = parser.parse_args()
    if args.check_config:
        check_config(read_config(args.check_config), args.arch, args.check_config.name)
        note(f"{args.check_config.name}: every option the Hook OS needs is there")
        return
    if not (args.root and args.kernel and args.config and args.out):
        die("give --root, --kernel, --config and --out (or --check-config CONFIG)")
    for what, path in (("kernel", args.kernel), ("config", args.config)):
        if not path.is_file():
            die(f"no {what} at {path}")
    config = read_config(args.config)
    check_config(config, args.arch, args.config.name)
    pe = pe_facts(args.kernel)
    if not pe["efi_stub"]:
        die(f"{args.kernel.name} is not a PE image: the kernel has no EFI stub (CONFIG_EFI_STUB)")

    base, version = modules_dir(args.root)
    depmod(base.parents[2], version)  # TREE, or TREE/usr for a merged-/usr package
    deps = read_deps(base)
    builtin = {module_name(line) for line in (base / "modules.builtin").read_text().split()} \
        if (base / "modules.builtin").is_file() else set()
    if args.all_modules:
        chosen, unmatched = sorted(deps), []
    else:
        if args.modules is None:
            die("give --modules FILE or --all-modules")
        chosen, unmatched = select(deps, read_patterns(args.modules), builtin)
    for pattern in unmatched:
        note(f"{pattern}: not in {version} (neither a module nor built in): skipped")

    work = Path(tempfile.mkdtemp(prefix="assemble-"))
    tree = work / "tree"
    out_base = tree / "lib" / "modules" / version
    firmware_names: set[str] = set()
    module_total = 0
    for rel in chosen:
        data = module_bytes(base / rel)
        target = out_base / re.sub(r"\.(xz|zst|gz)$", "", rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        module_total += len(data)
        firmware_names.update(modinfo(data, "firmware"))
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (base / name).is_file():
            out_base.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / name, out_base / name)
    if (base / "modules.builtin.modinfo").is_file():  # firmware of the drivers built in
        for field in (base / "modules.builtin.modinfo").read_bytes().split(b"\0"):
            key, _, value = field.partition(b"=")
            if key.endswith(b".firmware"):
                firmware_names.add(value.decode(errors="replace"))
    depmod(tree, version)

    packages: list[str] = []
    copied: dict[str, int] = {}
    missing: list[str] = sorted(firmware_names)
    if args.firmware_debs and firmware_names:
        fwtree = work / "firmware"
        packages = unpack_firmware(args.firmware_debs, fwtree)
        copied, missing = copy_firmware(firmware_names, firmware_root(fwtree), tree / "lib" / "firmware")

    args.out.mkdir(parents=True, exist_ok=True)
    write_tar(tree, "lib", args.out / "kernel.tar")
    shutil.copyfile(args.kernel, args.out / "kernel")
    shutil.copyfile(args.config, args.out / "kernel.config")
    record = {
        "flavour": args.flavour,
        "package": args.package,
        "version": version,
        "arch": args.arch,
        "config_sha256": hashlib.sha256(args.config.read_bytes()).hexdigest(),
        "kernel_bytes": args.kernel.stat().st_size,
        **pe,
        "modules": len(chosen),
        "modules_bytes": module_total,
        "builtin": len(builtin),
        "firmware_packages": packages,
        "firmware": copied,
        "firmware_bytes": sum(copied.values()),
        "firmware_missing": missing,
        "kernel_tar_bytes": (args.out / "kernel.tar").stat().st_size,
        "config": {k: config.get(k, "") for k in ("RD_GZIP", "RD_ZSTD", "MODULE_SIG", "KEXEC", "KEXEC_FILE",
                                                   "LOCK_DOWN_IN_EFI_SECURE_BOOT", "VLAN_8021Q")},
    }
    (args.out / "kernel.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work)
    note(f"{version}: {len(chosen)} modules ({module_total / 1e6:.1f} MB), {len(copied)} firmware files "
         f"({record['firmware_bytes'] / 1e6:.1f} MB) from {len(packages)} packages, {len(missing)} named but not "
         f"found; kernel.tar {record['kernel_tar_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
