"""The kernel image: Debian's vmlinuz as /kernel and /kernel.tar, a subset of its modules (with
their modules.dep closure) indexed by Debian's `depmod -b`, cached in $CACHE/test-os/kernel/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from .common import MTIME, RECIPE_VERSION, Rootfs, TestOsError, human, step
from .debs import depmod
from .engine import Image

KERNEL_REPO = "hooktest/kernel"

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


def kernel_tar(work: Path, kx: Path, kmod: Path, libkmod: Path, version: str) -> Path:
    """$CACHE/test-os/kernel/<version>-<key>.tar: lib/modules/<version>/ with the chosen modules."""
    moddir = kx / "lib" / "modules" / version
    if not (moddir / "modules.dep").is_file():
        raise TestOsError(f"{moddir}/modules.dep not found: delete {kx} and run again")
    key = hashlib.sha256(json.dumps([RECIPE_VERSION, kx.name, kmod.name, libkmod.name, MODULE_DIRS,
                                     MODULE_DIRS_SKIP, MODULE_NAMES]).encode()).hexdigest()[:16]
    out = work / "kernel" / f"{version}-{key}.tar"
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
                              "remove it from MODULE_NAMES in hack/testos/kernel.py")
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
        depmod(kmod, libkmod, stage, version)
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


def kernel_image(kx: Path, kernel_version: str, modules_tar: Path) -> Image:
    """hooktest/kernel:<version> (and -amd64, -arm64): /kernel and /kernel.tar."""
    fs = Rootfs()
    fs.file("kernel", kx / f"boot/vmlinuz-{kernel_version}", mode=0o644)
    fs.file("kernel.tar", modules_tar, mode=0o644)
    kref = f"{KERNEL_REPO}:{kernel_version}"
    return Image(name="kernel", refs=[kref, f"{kref}-amd64"], rootfs=fs, entrypoint=[], cmd=[],
                 arm64_refs=[f"{kref}-arm64"])
