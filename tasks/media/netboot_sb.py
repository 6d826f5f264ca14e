"""A netboot with Secure Boot on: the signed chain shim -> Debian's network GRUB -> the kernel, as a
TFTP folder in a tarball (`doit netboot_sb`, `dist_netboot_sb`, `debug_netboot_sb`).

Smee's iPXE is not signed: with Secure Boot on, the firmware refuses it. The firmware's own PXE
client (UEFI's) starts shim (signed by Microsoft's UEFI CA); shim fetches `grub<arch>.efi` from the
same server and folder (Debian's signed net image) and checks it; GRUB reads `$prefix/grub.cfg` from
there (prefix `/grub`) and loads the kernel and the initramfs by TFTP (Debian's signed GRUB has no
http module), and shim checks the kernel's signature. Out: out/dist/<build>/<prefix>-netboot-sb_<arch>.tar.gz

    shim<arch>.efi      the DHCP server's boot file (filename / option 67)
    grub<arch>.efi      Debian's signed network GRUB (grubnet<arch>.efi.signed)
    mm<arch>.efi        shim's MokManager (enrol a MOK at the console)
    grub/grub.cfg       the kernel cmdline: netboot_sb_cmdline, and worker_id/hw_addr the NIC's MAC
    vmlinuz-<arch>      the kernel (signed by Debian; and by iso_sign_key when set)
    initramfs-<arch>

Unpack it into the TFTP server's root (shim's folder must be the root: Debian's GRUB's prefix is
/grub of the server it came from). The tool image (containers/hook-iso, `mknetboot`) copies the
signed binaries out of Debian's packages and signs the kernel; this module writes grub.cfg and the
tarball (the same bytes for the same inputs, as the dist tarballs).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.run import log_step, mask
from tasks.images import tools
from tasks.media.iso import TOOLS, run_tool, secure_boot_line
from tasks.media.package import clean_output, output_is_current, record_output, write_tarball
from tasks.settings.builds import boot_files, netboot_sb_tarball
from tasks.settings.cmdline import canonical, cmdline_secrets, expand, grub_words, kernel_words

if TYPE_CHECKING:
    from tasks.settings import Settings
    from tasks.settings.builds import Build

#: The MAC of the NIC GRUB booted from (GRUB's net_default_mac: aa:bb:... lower case, as Smee's).
MAC_VARIABLE = "${net_default_mac}"
EFI_NAMES = {Arch.X86_64: "x64", Arch.AARCH64: "aa64"}


def efi_name(arch: Arch) -> str:
    return EFI_NAMES[arch]


def boot_file(arch: Arch) -> str:
    """What the DHCP server names as the boot file: shim."""
    return f"shim{efi_name(arch)}.efi"


def _mac_words(cmdline: str) -> list[str]:
    """worker_id and hw_addr: the NIC's MAC (as Smee gives them), unless the cmdline names them."""
    keys = {w.partition("=")[0] for w in kernel_words(cmdline)}
    return [f"{key}={MAC_VARIABLE}" for key in ("worker_id", "hw_addr") if key not in keys]


def netboot_cmdline(settings_cmdline: str, arch: Arch) -> str:
    """The kernel cmdline grub.cfg gives (canonical form; GRUB puts the MAC in for ${net_default_mac})."""
    cmdline = expand(settings_cmdline, arch, smee=False)
    return " ".join([*_mac_words(cmdline), canonical(cmdline)]).strip()


def grub_cfg(arch: Arch, settings_cmdline: str) -> bytes:
    """grub/grub.cfg: the kernel and the initramfs from the TFTP server GRUB came from, with the cmdline."""
    cmdline = expand(settings_cmdline, arch, smee=False)
    words = " ".join([*_mac_words(cmdline), grub_words(cmdline)]).strip()
    return (
        "# Hook: netboot with Secure Boot on (shim -> Debian's signed network GRUB -> the kernel).\n"
        "# GRUB read this from $prefix (/grub on the TFTP server shim came from); the kernel and the\n"
        "# initramfs come from that server too. ${net_default_mac}: the MAC of the NIC GRUB booted from.\n"
        "# Made by `doit netboot_sb` from the setting netboot_sb_cmdline (hook's docs/iso.md).\n"
        "set timeout=0\n"
        f'echo "Hook: loading the kernel and the initramfs ({arch}) by TFTP from $root"\n'
        f"linux /vmlinuz-{arch} {words}\n"
        f"initrd /initramfs-{arch}\n"
        "boot\n"
    ).encode("ascii")


def netboot_path(settings: Settings, build: Build, arch: Arch) -> Path:
    return netboot_sb_tarball(settings, build, arch)


def netboot_record(settings: Settings, build: Build, arch: Arch) -> Path:
    """What was made (sha512, size, mtime): the cheap up-to-date check, and checksum.txt's line."""
    return settings.out / "netboot-sb" / build.name / arch.value / f"{netboot_path(settings, build, arch).name}.json"


def netboot_config(settings: Settings, arch: Arch) -> dict[str, Any]:
    """The settings the tarball is made from (doit's config_changed); its files are the task's file_dep."""
    return {"grub.cfg": grub_cfg(arch, settings.netboot_sb_cmdline).decode(),
            "source_date_epoch": settings.source_date_epoch, "signed": settings.iso_sign is not None}


def make_netboot_file(*, tool_ref: str, kernel: Path, initrd: Path, arch: Arch, cmdline: str, target: Path,
                      source_date_epoch: int, sign: tuple[Path, Path] | None = None) -> str:
    """The tarball of one arch's Secure Boot netboot folder; returns its sha512. The tool image gets
    the kernel (and the key, through the pipe only) and gives back shim, GRUB, MokManager and the
    kernel it signed; the initramfs and grub.cfg are added here. Nothing at target until all is done."""
    for what, path in (("kernel", kernel), ("initramfs", initrd)):
        if not path.is_file():
            raise HookError(f"{what} {path} is missing: build the OS first (doit dev_dist, dist or debug_image)")
    config = grub_cfg(arch, cmdline)
    members: list[tuple[str, Path | bytes, int]] = [("vmlinuz", kernel, 0o644)]
    if sign is not None:
        members += [("sign.key", sign[0], 0o600), ("sign.crt", sign[1], 0o644)]
    log_step(f"making {target.name} ({arch}) with {tool_ref}")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    work.mkdir()
    try:
        chain = work / "chain.tar"
        run_tool(tool_ref=tool_ref, args=[arch.value], members=members, target=chain,
                 source_date_epoch=source_date_epoch, what="the netboot tools", entrypoint="/usr/local/bin/mknetboot")
        files = work / "files"
        (files / "grub").mkdir(parents=True)
        expected = {boot_file(arch), f"grub{efi_name(arch)}.efi", f"mm{efi_name(arch)}.efi", "vmlinuz"}
        try:
            with tarfile.open(chain) as tar:
                names = {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}
                if names != expected:
                    raise HookError(f"the netboot tools gave {sorted(names)}, not {sorted(expected)}; "
                                    "try: doit forget iso_tools, then run again")
                tar.extractall(files, filter="data")
        except tarfile.TarError as exc:
            raise HookError(f"the netboot tools' output is not a tar ({exc}); try: doit forget iso_tools, "
                            "then run again") from None
        os.replace(files / "vmlinuz", files / f"vmlinuz-{arch}")
        os.link(initrd, files / f"initramfs-{arch}")
        (files / "grub" / "grub.cfg").write_bytes(config)
        members_out = [("grub/grub.cfg", files / "grub" / "grub.cfg"),
                       *((p.name, p) for p in sorted(files.iterdir()) if p.is_file())]
        digest = write_tarball(target, members_out, mtime=source_date_epoch)
        signed = files / f"vmlinuz-{arch}"
        log_step(f"{target.name}: {target.stat().st_size} bytes in {time.monotonic() - started:.1f}s; "
                 f"DHCP boot file {boot_file(arch)}; "
                 f"cmdline: {mask(netboot_cmdline(cmdline, arch), cmdline_secrets(cmdline))}")
        log_step(secure_boot_line(signed, target.name, sign[1] if sign else None)
                 .replace("this ISO boots", "this netboot works"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return digest


def make_netboot(settings: Settings, build: Build, arch: Arch, record: Path) -> None:
    """`netboot_sb:<arch>` (and dist_netboot_sb, debug_netboot_sb): one build and arch, and its checksum line."""
    tool_ref = tools.recorded_ref(settings, TOOLS, "iso_tools")
    kernel, initrd = boot_files(settings, build, arch)
    target = netboot_path(settings, build, arch)
    digest = make_netboot_file(tool_ref=tool_ref, kernel=kernel, initrd=initrd, arch=arch,
                               cmdline=settings.netboot_sb_cmdline, target=target,
                               source_date_epoch=settings.source_date_epoch, sign=settings.iso_sign)
    record_output(target, digest, record, key="tarball", tool=tool_ref, config=netboot_config(settings, arch))


def netboot_is_current(settings: Settings, build: Build, arch: Arch) -> bool:
    """Part of the task's up-to-date check: the tarball is the one recorded, and checksum.txt lists it."""
    return output_is_current(netboot_path(settings, build, arch), netboot_record(settings, build, arch))


def clean_netboot(settings: Settings, build: Build, arch: Arch) -> None:
    """`doit clean`: the tarball's line in checksum.txt goes with it."""
    clean_output(netboot_path(settings, build, arch))
