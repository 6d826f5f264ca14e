"""A repacked busybox initramfs boots a Debian kernel under QEMU (TCG): the kernel's unpacker
takes our parallel gzip (and zstd), a hardlink keeps one inode and its data, device nodes work,
and an uncompressed early microcode archive in front of the compressed one is unpacked too."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
from pathlib import Path

import pytest

from tasks.boot.qemu import boot
from tasks.convert import engine as initramfs
from tests.test_initramfs import AMD, INTEL, early_loader_find, early_tree, gnu_archive, split_early, write

INIT = """#!/bin/sh
export PATH=/bin
ino() { stat -c %i "$1"; }
hl=bad
[ "$(ino /etc/one)" = "$(ino /etc/two)" ] && [ "$(cat /etc/two)" = "linked content" ] && hl=ok
dd=bad
[ "$(ino /lib/fw/a.bin)" = "$(ino /lib/fw/b.bin)" ] && [ "$(md5sum < /lib/fw/b.bin)" = "{fw_md5}  -" ] && dd=ok
dev=bad
[ -c /dev/hooktest ] && [ "$(stat -c %t:%T /dev/hooktest)" = "1:3" ] && echo x > /dev/hooktest && dev=ok
big=bad
[ "$(md5sum < /opt/big.bin)" = "{big_md5}  -" ] && big=ok
early=none
ucode=/kernel/x86/microcode
[ -e $ucode/GenuineIntel.bin ] && early=bad && [ "$(md5sum < $ucode/GenuineIntel.bin)" = "{intel_md5}  -" ] \
  && [ "$(md5sum < $ucode/AuthenticAMD.bin)" = "{amd_md5}  -" ] && early=ok
echo "HOOK-BOOT-RESULT hardlink=$hl dedup=$dd device=$dev big=$big early=$early"
poweroff -f
"""


def busybox_tree(root: Path, busybox: Path, early: dict[str, bytes] | None = None) -> None:
    """The test's rootfs; early: the microcode blobs its /init expects to find (from the early archive)."""
    early = early or {INTEL: b"", AMD: b""}
    firmware = hashlib.sha512(b"fw").digest() * 4096  # 256 KiB, twice: dedup makes them one inode
    big = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(100_000))  # 3 MiB
    write(root / "bin/busybox", busybox.read_bytes(), mode=0o755)
    for applet in ("sh", "stat", "cat", "md5sum", "echo", "poweroff"):
        os.symlink("busybox", root / "bin" / applet)
    script = INIT.replace("{fw_md5}", hashlib.md5(firmware).hexdigest()).replace(
        "{big_md5}", hashlib.md5(big).hexdigest()).replace(
        "{intel_md5}", hashlib.md5(early[INTEL]).hexdigest()).replace("{amd_md5}", hashlib.md5(early[AMD]).hexdigest())
    write(root / "init", script.encode(), mode=0o755)
    write(root / "etc/one", b"linked content\n")
    os.link(root / "etc/one", root / "etc/two")
    write(root / "lib/fw/a.bin", firmware)
    write(root / "lib/fw/b.bin", firmware)
    write(root / "opt/big.bin", big)
    (root / "dev").mkdir()
    os.mknod(root / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    os.mknod(root / "dev/hooktest", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_repacked_initramfs_boots(test_kernel: Path, busybox: Path, tmp_path: Path, compression: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    busybox_tree(root, busybox)
    src = tmp_path / "linuxkit-initrd.img"
    src.write_bytes(gzip.compress(gnu_archive(root), 1))
    dst = tmp_path / "initramfs"
    stats = initramfs.repack(src, dst, compression=compression)
    assert stats.dedup_saved_bytes == 256 * 1024
    assert initramfs.quick_check(dst)
    result = boot(test_kernel, dst, accel="tcg", memory_mb=512, timeout=240, log=tmp_path / "console.log")
    results = [line for line in result.lines if line.startswith("HOOK-BOOT-RESULT")]
    assert results == ["HOOK-BOOT-RESULT hardlink=ok dedup=ok device=ok big=ok early=none"], result.console[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_early_microcode_archive_in_front_boots(test_kernel: Path, busybox: Path, tmp_path: Path,
                                               compression: str) -> None:
    """Debian's shape: an uncompressed microcode cpio (dummy blobs: a VM's kernel does not load
    microcode, and would ignore invalid blobs) before the gzip rootfs. The repacked output keeps it
    as an uncompressed archive in front; the kernel unpacks both parts (its /init sees the early
    files and everything else) and boots."""
    blobs = early_tree(tmp_path / "early")
    root = tmp_path / "root"
    root.mkdir()
    busybox_tree(root, busybox, blobs)
    src = tmp_path / "debian-initrd.img"
    src.write_bytes(gnu_archive(tmp_path / "early") + gzip.compress(gnu_archive(root), 1))
    dst = tmp_path / "initramfs"
    stats = initramfs.repack(src, dst, compression=compression)
    out = dst.read_bytes()
    early, _ = split_early(out)
    assert out[:6] == b"070701" and stats.early_entries == 6 and stats.early_bytes == len(early)
    assert early_loader_find(out, INTEL) == blobs[INTEL] and early_loader_find(out, AMD) == blobs[AMD]
    assert initramfs.quick_check(dst)
    result = boot(test_kernel, dst, accel="tcg", memory_mb=512, timeout=240, log=tmp_path / "console.log")
    results = [line for line in result.lines if line.startswith("HOOK-BOOT-RESULT")]
    assert results == ["HOOK-BOOT-RESULT hardlink=ok dedup=ok device=ok big=ok early=ok"], result.console[-3000:]
    assert "Initramfs unpacking failed" not in result.console
