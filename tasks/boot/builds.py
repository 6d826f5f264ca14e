"""Booting a build's outputs under QEMU: what `doit boot` runs (tasks.boot.qemu is the harness)."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from tasks.boot import netboot, qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.run import log_step, mask
from tasks.settings import Settings
from tasks.settings.builds import Build, boot_files, netboot_sb_tarball
from tasks.settings.cmdline import cmdline_secrets

#: `doit boot`'s --cmdline when none is given.
DEFAULT_CMDLINE = "console=tty0 console=ttyS0"


def boot_build(settings: Settings, build: Build, arch: Arch, *, cmdline: str, memory_mb: int, accel: str,
               expect: str, timeout: float, registry: str = "", ssh_port: int = 0, net: str = "user",
               smp: int = 2, netboot: bool = False, uefi: bool = False, secure_boot: bool = False) -> None:
    """Boot a build's converted kernel and initramfs under QEMU: on this terminal, or until `expect` shows.

    The guest's network (net="user") is QEMU's user net with restrict=on: it reaches nothing but a
    registry on this machine given as `registry` (HOST:PORT, seen in the guest as 10.0.2.100:5000,
    which `{registry}` in the cmdline stands for) and is reached on `ssh_port` (127.0.0.1) for sshd.
    The serial port is made the last console= (/dev/console), so init's and the services' lines show.

    netboot: as Smee boots Hook (tasks.boot.netboot): an emulated server (q35, an e1000e NIC with
    iPXE, SeaBIOS or with `uefi` OVMF) fetches the kernel and initramfs over HTTP from a server on
    127.0.0.1, with Smee's parameters and consoles (ttyS1 last); the cmdline's words are Smee's extra
    kernel args (its console= words are dropped: Smee's own come before them).
    """
    if net not in ("user", "none"):
        raise HookError(f"unknown --net {net!r}: user (restricted, forwards only) or none")
    if secure_boot and not netboot:
        raise HookError("--secure-boot is for --netboot (the tarball of doit netboot_sb, under OVMF): add --netboot")
    if uefi and not netboot:
        raise HookError("--uefi is for --netboot (a direct -kernel boot needs no firmware choice)")
    if secure_boot and cmdline.strip() != DEFAULT_CMDLINE:
        raise HookError("--cmdline does not reach a --secure-boot netboot: its grub.cfg holds the cmdline; make the "
                        "tarball again with it: doit netboot_sb netboot_sb_cmdline='...'")
    if netboot and net == "none":
        raise HookError("--netboot needs the network: leave --net at user")
    guest_registry = f"{qemu.GUEST_SERVICE_IP}:5000"
    if "{registry}" in cmdline and not registry:
        raise HookError("the cmdline names {registry}: give --registry HOST:PORT (a registry on this machine)")
    forwards: tuple[qemu.Forward, ...] = ()
    registry_port = None
    if registry:
        host, _, port = registry.rpartition(":")
        if not port.isdigit() or host not in ("127.0.0.1", "localhost", "[::1]"):
            raise HookError(f"--registry {registry!r}: the HOST:PORT of a registry on this machine (127.0.0.1:5000)")
        registry_port = int(port)
        forwards = (qemu.Forward(5000, registry_port),)
        log_step(f"the guest reaches {registry} as {guest_registry}")
    if secure_boot:
        _netboot_sb(netboot_sb_tarball(settings, build, arch), arch, memory_mb=memory_mb, accel=accel, smp=smp,
                    registry_port=registry_port, expect=expect, timeout=timeout, build=build)
        return
    kernel, initrd = boot_files(settings, build, arch)
    cmdline = cmdline.replace("{registry}", guest_registry)
    if netboot:
        _netboot(arch, kernel, initrd, cmdline=cmdline, memory_mb=memory_mb, accel=accel, smp=smp, uefi=uefi,
                 registry_port=registry_port, expect=expect, timeout=timeout)
        return
    nics = [qemu.Nic(forwards=forwards, hostfwd=((ssh_port, 22),) if ssh_port else ())] if net == "user" else []
    guest = qemu.Guest(kernel, initrd, arch=arch, cmdline=qemu.console_cmdline(cmdline, arch), memory_mb=memory_mb,
                       accel=accel, smp=smp, nics=nics, extra=["-device", "virtio-rng-pci"],
                       milestone_patterns=qemu.HOOK_MILESTONES)
    _run(guest, expect, timeout)


def _run(guest: qemu.Guest, expect: str, timeout: float) -> None:
    if not expect:
        log_step("the console is this terminal: Ctrl-A X quits QEMU, Ctrl-A C its monitor")
        qemu.interactive(guest)
        return
    with guest:
        guest.echo = True
        guest.wait_for(expect, timeout=timeout)
        log_step(f"saw {expect!r} on the console after {guest.elapsed:.1f}s; milestones: {guest.milestone_report()}")


def _netboot(arch: Arch, kernel: Path, initrd: Path, *, cmdline: str, memory_mb: int, accel: str, smp: int,
             uefi: bool, registry_port: int | None, expect: str, timeout: float) -> None:
    if arch is not Arch.X86_64:
        raise HookError("--netboot emulates an x86_64 server (iPXE's e1000e ROM): use --arch x86_64")
    for path in (kernel, initrd):
        if not path.is_file():
            raise HookError(f"cannot netboot: {path} does not exist (build it first)")
    extra = " ".join(w for w in cmdline.split() if not w.startswith("console="))
    with tempfile.TemporaryDirectory(prefix="hook-netboot-") as folder:
        work = Path(folder)
        script = netboot.smee_script(arch=arch, base_url=f"http://{netboot.HTTP_IP}", extra=extra)
        netboot.write_script(work / "tftp", script)
        log_step(f"Smee's script (TFTP {netboot.SCRIPT}): {mask(script.splitlines()[2], cmdline_secrets(extra))}")
        with netboot.HttpServer(kernel.parent) as http:
            log_step(f"HTTP on 127.0.0.1:{http.port} serves {kernel.parent}; the guest reaches it as "
                     f"http://{netboot.HTTP_IP}")
            nic = netboot.netboot_nic(tftp=work / "tftp", http_port=http.port, registry_port=registry_port)
            serial0 = work / "ttyS0.log"
            guest = qemu.Guest(None, None, arch=arch, memory_mb=memory_mb, accel=accel, smp=smp, nics=[nic],
                               extra=[*netboot.firmware_args(uefi=uefi, vars_copy=work / "vars.fd"),
                                      "-device", "virtio-rng-pci"],
                               milestone_patterns=qemu.HOOK_MILESTONES, serial0=serial0)
            log_step(f"{'UEFI (OVMF)' if uefi else 'BIOS (SeaBIOS)'}, iPXE; the firmware's and iPXE's lines go to "
                     f"{serial0} (ttyS0), the console is ttyS1 (Smee's)")
            _run(guest, expect, timeout)
            done = http.transfer(initrd.name)
            if done:
                log_step(f"the initramfs ({done.size / 1e6:.1f} MB) came over iPXE's HTTP in {done.seconds:.1f}s")


def _netboot_sb(tarball: Path, arch: Arch, *, memory_mb: int, accel: str, smp: int, registry_port: int | None,
                expect: str, timeout: float, build: Build) -> None:
    if not tarball.is_file():
        task = {"release": "dist_netboot_sb", "dev": "netboot_sb", "debug": "debug_netboot_sb"}[build.name]
        raise HookError(f"cannot netboot with Secure Boot: {tarball} does not exist: make it first (doit {task})")
    with tempfile.TemporaryDirectory(prefix="hook-netboot-sb-") as folder:
        tftp = Path(folder) / "tftp"
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(tftp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise HookError(f"cannot unpack {tarball} ({exc}): make it again (doit forget, then doit netboot_sb)") \
                from None
        shims = sorted(p.name for p in tftp.glob("shim*.efi"))
        if not shims or not (tftp / "grub" / "grub.cfg").is_file():
            raise HookError(f"{tarball} is not a netboot_sb tarball (no shim*.efi or grub/grub.cfg): make it again")
        linux = next((line for line in (tftp / "grub" / "grub.cfg").read_text().splitlines()
                      if line.startswith("linux ")), "")
        log_step(f"TFTP root: {tarball.name} unpacked; DHCP boot file {shims[0]}; grub.cfg: "
                 f"{mask(linux, cmdline_secrets(linux.partition(' ')[2]))}")
        forwards = (qemu.Forward(5000, registry_port),) if registry_port is not None else ()
        # no option ROM: the firmware's own PXE client (QEMU's iPXE ROM would run, unsigned as it is)
        nic = qemu.Nic(forwards=forwards, mac=netboot.MAC, tftp=tftp, bootfile=shims[0], no_rom=True, bootindex=1)
        vars_copy = Path(folder) / "vars.fd"
        firmware = qemu.aarch64_secure_boot_firmware(vars_copy) if arch is Arch.AARCH64 else \
            netboot.firmware_args(uefi=True, vars_copy=vars_copy, secure_boot=True)
        guest = qemu.Guest(None, None, arch=arch, memory_mb=memory_mb, accel=accel, smp=smp, nics=[nic],
                           extra=[*firmware, "-device", "virtio-rng-pci"],
                           milestone_patterns=(("shim fetches GRUB", r"Fetching Netboot Image"),
                                               ("GRUB reads grub.cfg", r"Hook: loading the kernel"),
                                               *qemu.HOOK_MILESTONES))
        name = "AAVMF" if arch is Arch.AARCH64 else "OVMF"
        log_step(f"UEFI ({name}) with Secure Boot on (Microsoft's keys), the NIC's MAC {netboot.MAC}; the console is "
                 f"{arch.serial_console} (the firmware, shim, GRUB, then the kernel's consoles from grub.cfg)")
        _run(guest, expect, timeout)
