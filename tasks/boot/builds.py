"""Booting a build's outputs under QEMU: what `doit boot` runs (tasks.boot.qemu is the harness)."""

from __future__ import annotations

from tasks.boot import qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.run import log_step
from tasks.settings import Settings
from tasks.settings.builds import Build, boot_files


def boot_build(settings: Settings, build: Build, arch: Arch, *, cmdline: str, memory_mb: int, accel: str,
               expect: str, timeout: float, registry: str = "", ssh_port: int = 0, net: str = "user",
               smp: int = 2) -> None:
    """Boot a build's converted kernel and initramfs under QEMU: on this terminal, or until `expect` shows.

    The guest's network (net="user") is QEMU's user net with restrict=on: it reaches nothing but a
    registry on this machine given as `registry` (HOST:PORT, seen in the guest as 10.0.2.100:5000,
    which `{registry}` in the cmdline stands for) and is reached on `ssh_port` (127.0.0.1) for sshd.
    The serial port is made the last console= (/dev/console), so init's and the services' lines show.
    """
    if net not in ("user", "none"):
        raise HookError(f"unknown --net {net!r}: user (restricted, forwards only) or none")
    guest_registry = f"{qemu.GUEST_SERVICE_IP}:5000"
    if "{registry}" in cmdline and not registry:
        raise HookError("the cmdline names {registry}: give --registry HOST:PORT (a registry on this machine)")
    forwards: tuple[qemu.Forward, ...] = ()
    if registry:
        host, _, port = registry.rpartition(":")
        if not port.isdigit() or host not in ("127.0.0.1", "localhost", "[::1]"):
            raise HookError(f"--registry {registry!r}: the HOST:PORT of a registry on this machine (127.0.0.1:5000)")
        forwards = (qemu.Forward(5000, int(port)),)
        log_step(f"the guest reaches {registry} as {guest_registry}")
    nics = [qemu.Nic(forwards=forwards, hostfwd=((ssh_port, 22),) if ssh_port else ())] if net == "user" else []
    kernel, initrd = boot_files(settings, build, arch)
    cmdline = qemu.console_cmdline(cmdline.replace("{registry}", guest_registry), arch)
    guest = qemu.Guest(kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=accel, smp=smp,
                       nics=nics, extra=["-device", "virtio-rng-pci"], milestone_patterns=qemu.HOOK_MILESTONES)
    if not expect:
        log_step("the console is this terminal: Ctrl-A X quits QEMU, Ctrl-A C its monitor")
        qemu.interactive(guest)
        return
    with guest:
        guest.echo = True
        guest.wait_for(expect, timeout=timeout)
        log_step(f"saw {expect!r} on the console after {guest.elapsed:.1f}s; milestones: {guest.milestone_report()}")
