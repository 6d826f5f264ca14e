"""Booting a build's outputs under QEMU: what `doit boot` runs (tasks.boot.qemu is the harness)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.boot import netboot, qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.run import log_step
from tasks.settings import Settings
from tasks.settings.builds import Build, boot_files


def boot_build(settings: Settings, build: Build, arch: Arch, *, cmdline: str, memory_mb: int, accel: str,
               expect: str, timeout: float, registry: str = "", ssh_port: int = 0, net: str = "user",
               smp: int = 2, netboot: bool = False, uefi: bool = False) -> None:
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
    if uefi and not netboot:
        raise HookError("--uefi is for --netboot (a direct -kernel boot needs no firmware choice)")
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
        log_step(f"Smee's script (TFTP {netboot.SCRIPT}): {script.splitlines()[2]}")
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
