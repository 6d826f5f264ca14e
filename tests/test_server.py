"""Hook on an emulated server, netbooted the way Tinkerbell's Smee boots it, installing a disk.

The server: QEMU's q35 with an e1000e NIC (its driver is a module of our kernel that nothing loads
by name: udev's coldplug does), and three disks with serial numbers on three controllers: q35's
AHCI, NVMe, and a MegaRAID SAS HBA (QEMU's megasas-gen2). Its NIC's option ROM is Debian's iPXE,
which runs Smee's script (TFTP from QEMU's user net) and fetches the kernel and initramfs over HTTP
from a server on 127.0.0.1 (reached only through a guestfwd relay), under SeaBIOS and under OVMF.

The workflow: the test tink-worker (hack/test-os/tink-worker.py) runs an action through the docker
socket, as tink-worker does: privileged, /dev bound; the action streams an OS image over HTTP onto
the disk named by its /dev/disk/by-id path; then the worker asks for a reboot. The host checks the
disk byte for byte, and QEMU boots it: the installed OS (a small hybrid ISO made here) runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.boot import netboot, qemu
from tasks.core.arch import Arch
from tests.conftest import REGISTRY_PASSWORD, REGISTRY_USER, Registry, free_port
from tests.pipeline_env import Project
from tests.test_boot import (
    BOOT_TIMEOUT,
    GUEST_REGISTRY,
    MARKER,
    MEMORY_MB,
    SMP,
    WORKER_ID,
    WORKER_IMAGE,
    packaged,
    report,
    tinkerbell_cmdline,
)
from tests.test_iso import SMALL_MARKER, small_files, small_iso, tool_ref  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
ACTION_IMAGE = f"{GUEST_REGISTRY}/hooktest/action:test"
DISKS = (("sata.img", "HOOKDISK01", "ahci"), ("nvme.img", "HOOKNVME02", "nvme"), ("raid.img", "HOOKRAID03", "megaraid"))
#: udev's names for them (60-persistent-storage.rules): the bus, the model, the serial
BY_ID = ("ata-QEMU_HARDDISK_HOOKDISK01", "nvme-QEMU_NVMe_Ctrl_HOOKNVME02", "scsi-0QEMU_QEMU_HARDDISK_HOOKRAID03")
TARGET = f"/dev/disk/by-id/{BY_ID[0]}"
DISK_BYTES = 64 << 20


def smee_extra(workflow: str = "") -> str:
    """Smee's extra kernel args, as the helm chart and an operator give them (after Smee's consoles)."""
    extra = (f"docker_registry={GUEST_REGISTRY} insecure_registries={GUEST_REGISTRY} registry_username={REGISTRY_USER} "
             f'"registry_password={REGISTRY_PASSWORD}" tink_worker_image={WORKER_IMAGE}')
    return f"{extra} hooktest_workflow=http://{netboot.HTTP_IP}/{workflow}" if workflow else extra


@dataclass
class Server:
    """One emulated server: its disks, the HTTP server's folder, the TFTP folder, the firmware's log."""

    folder: Path
    www: Path
    tftp: Path
    disks: list[netboot.Disk]

    @property
    def target(self) -> Path:
        return self.disks[0].path


def make_server(folder: Path, boot_files: tuple[Path, Path], *, blkdebug: Path | None = None) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    www, tftp = folder / "www", folder / "tftp"
    www.mkdir()
    for path in boot_files:
        os.link(path, www / path.name)
    disks = []
    for index, (name, serial, bus) in enumerate(DISKS):
        image = folder / name
        with image.open("wb") as out:
            out.truncate(DISK_BYTES)
        disks.append(netboot.Disk(image, serial, bus, blkdebug=blkdebug if index == 0 else None))
    return Server(folder, www, tftp, disks)


def server_guest(server: Server, *, uefi: bool, http_port: int, registry_port: int | None, log: Path,
                 extra_args: tuple[str, ...] = ()) -> qemu.Guest:
    nic = netboot.netboot_nic(tftp=server.tftp, http_port=http_port, registry_port=registry_port)
    extra = [*netboot.firmware_args(uefi=uefi, vars_copy=server.folder / "vars.fd"), *netboot.disk_args(server.disks),
             "-device", "virtio-rng-pci", *extra_args]
    return qemu.Guest(None, None, memory_mb=MEMORY_MB, accel="tcg", smp=SMP, nics=[nic], extra=extra, log=log,
                      milestone_patterns=(("iPXE runs Smee's script", "Hook: loading the kernel"),
                                          *qemu.HOOK_MILESTONES),
                      serial0=server.folder / "ttyS0.log")


@pytest.fixture(scope="module")
def server_boot_files(dev_project: Project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return packaged(dev_project, "dev", "hook", tmp_path_factory.mktemp("server-boot"))


@pytest.fixture(scope="module")
def installed_os(tool_ref: str, small_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The OS the workflow installs: a small hybrid ISO (BIOS and UEFI, CD or raw disk) of our kernel
    and a busybox initramfs that says SMALL_MARKER and powers off."""
    return small_iso(tool_ref, small_files, tmp_path_factory.mktemp("installed") / "os.img",
                     cmdline="console=ttyS0 panic=-1 installed_os=yes")


@pytest.fixture
def workflow_registry(worker_registry: Registry, test_os: dict, tmp_path: Path) -> Registry:
    """The registry with the test tink-worker, and the action image (the image2disk stand-in)."""
    import subprocess

    config = tmp_path / "docker-config"
    worker_registry.login(config)
    ref = f"{worker_registry.addr}/hooktest/action:test"
    env = {**os.environ, "DOCKER_CONFIG": str(config)}
    subprocess.run(["docker", "tag", test_os["action"], ref], check=True, capture_output=True)
    subprocess.run(["docker", "push", ref], check=True, capture_output=True, env=env)
    return worker_registry


def write_workflow(server: Server, image_name: str, *, reboot: bool = True) -> str:
    workflow = {"actions": [{"name": "stream-image", "image": ACTION_IMAGE,
                             "env": {"IMG_URL": f"http://{netboot.HTTP_IP}/{image_name}", "DEST_DISK": TARGET}}],
                "reboot": reboot}
    (server.www / "workflow.json").write_text(json.dumps(workflow))
    return "workflow.json"


def boot_installed_disk(disk: Path, *, uefi: bool, folder: Path) -> str:
    """QEMU boots the installed disk (nothing else): what the installed OS says."""
    vars_copy = folder / "vars-installed.fd"
    extra = [*netboot.firmware_args(uefi=uefi, vars_copy=vars_copy),
             "-drive", f"file={disk},if=none,id=installed,format=raw", "-device", "ide-hd,drive=installed,bus=ide.0"]
    with qemu.Guest(None, None, memory_mb=512, accel="tcg", smp=SMP, nics=None, extra=extra,
                    log=folder / "installed.log") as g:
        g.wait_for(SMALL_MARKER, timeout=300)
        g.wait_exit(120)
    return g.console


@pytest.mark.parametrize("uefi", [False, True], ids=["bios", "uefi"])
def test_netboot_install_the_disk_and_boot_it(server_boot_files: tuple[Path, Path], workflow_registry: Registry,
                                              installed_os: Path, tmp_path: Path, uefi: bool) -> None:
    server = make_server(tmp_path / "server", server_boot_files)
    shutil.copy(installed_os, server.www / "os.img")
    workflow = write_workflow(server, "os.img")
    script = netboot.smee_script(arch=Arch.X86_64, base_url=f"http://{netboot.HTTP_IP}", worker_id=WORKER_ID,
                                 extra=smee_extra(workflow))
    netboot.write_script(server.tftp, script)
    # Smee's whole parameter list, its consoles with ttyS1 last, then the extra args
    kernel_line = script.splitlines()[2]
    assert re.search(r"hw_addr=52:54:00:aa:bb:01 modules=loop,squashfs,sd-mod,usb-storage intel_iommu=on iommu=pt "
                     r"initrd=initramfs-x86_64 console=tty0 console=ttyS1,115200 docker_registry=", kernel_line)
    with netboot.HttpServer(server.www) as http, \
            server_guest(server, uefi=uefi, http_port=http.port, registry_port=workflow_registry.port,
                         log=tmp_path / "console.log") as g:
        g.wait_for(MARKER, timeout=BOOT_TIMEOUT)
        sees = g.wait_for(re.compile(r"TINK-WORKER-SEES by-id=(\S+) nics=(\S+) udev-db=(\d+)"), timeout=60)
        report(g, f"netboot {'uefi' if uefi else 'bios'}")
        by_id, nics, udev = sees.group(1).split(","), sees.group(2), int(sees.group(3))
        for name in BY_ID:  # every disk, by the name workflows use
            assert name in by_id, by_id
        assert re.search(r"\w+:e1000e", nics), nics  # the NIC, with its driver (a module) loaded
        assert udev > 10  # the udev database in the host's /run, as tink-worker and tink-agent read it
        wrote = g.wait_for(re.compile(r"IMAGE2DISK wrote .* in (\d+)s"), timeout=300)
        g.wait_for("WORKFLOW SUCCEEDED", timeout=120)
        g.wait_for("WORKFLOW asked for a reboot", timeout=60)
        code = g.wait_exit(180)  # -no-reboot: the reboot ends QEMU
        firmware = g.firmware_console
    assert code == 0
    assert "reboot: Restarting system" in g.console
    initramfs = http.transfer(server_boot_files[1].name)
    assert initramfs is not None and initramfs.size == server_boot_files[1].stat().st_size
    size = installed_os.stat().st_size
    print(f"\n[netboot {'uefi' if uefi else 'bios'}] initramfs {initramfs.size / 1e6:.1f} MB over iPXE's HTTP in "
          f"{initramfs.seconds:.1f}s; install {size / 1e6:.1f} MB in {wrote.group(1)}s; milestones: "
          f"{g.milestone_report()}")
    assert "iPXE" in firmware  # the firmware's and iPXE's lines went to ttyS0
    # the disk holds the image, byte for byte; the rest is as it was (zeros)
    with server.target.open("rb") as disk:
        assert disk.read(size) == installed_os.read_bytes()
    installed = boot_installed_disk(server.target, uefi=uefi, folder=tmp_path)
    assert re.search(rf"{SMALL_MARKER} cmdline=\[.*installed_os=yes", installed), installed[-2000:]


def test_a_disk_that_fails_writes_fails_the_action(server_boot_files: tuple[Path, Path], workflow_registry: Registry,
                                                   installed_os: Path, tmp_path: Path) -> None:
    """The target disk fails every write (QEMU's blkdebug, errors reported to the guest): the action
    fails, the worker says which and why, nothing claims success, and no reboot comes."""
    rules = tmp_path / "blkdebug.conf"
    rules.write_text('[inject-error]\nevent = "write_aio"\nerrno = "5"\n')
    server = make_server(tmp_path / "server", server_boot_files, blkdebug=rules)
    shutil.copy(installed_os, server.www / "os.img")
    workflow = write_workflow(server, "os.img")
    kernel, initrd = server_boot_files
    with netboot.HttpServer(server.www) as http:
        nic = qemu.Nic(forwards=(qemu.Forward(80, http.port, guest_ip=netboot.HTTP_IP),
                                 qemu.Forward(5000, workflow_registry.port)))
        extra = ["-machine", "q35", *netboot.disk_args(server.disks), "-device", "virtio-rng-pci"]
        cmdline = tinkerbell_cmdline(extra=f"hooktest_workflow=http://{netboot.HTTP_IP}/{workflow}")
        with qemu.Guest(kernel, initrd, cmdline=cmdline, memory_mb=MEMORY_MB, accel="tcg", smp=SMP, nics=[nic],
                        extra=extra, log=tmp_path / "console.log", milestone_patterns=qemu.HOOK_MILESTONES) as g:
            failed = g.wait_for(re.compile(r"WORKFLOW FAILED action=stream-image exit=(\d+)"), timeout=BOOT_TIMEOUT)
            report(g, "failing disk")
            time.sleep(15)  # a reboot would come within this
            assert g.returncode is None, "the guest rebooted after a failed action"
    assert int(failed.group(1)) != 0
    assert re.search(r"IMAGE2DISK FAILED writing http://\S+/os.img to " + re.escape(TARGET), g.console), \
        g.console[-3000:]
    assert "WORKFLOW SUCCEEDED" not in g.console and "IMAGE2DISK wrote" not in g.console
    assert re.search(r"I/O error, dev sd\w", g.console)  # the kernel saw the disk's error


def test_http_server_down_while_ipxe_loads(server_boot_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Nothing listens where Smee's HTTP should be: what the operator sees is iPXE's error on the
    serial console (ttyS0 here); the kernel never starts. (The netboot tests above are the boot
    that works once the server is up.)"""
    server = make_server(tmp_path / "server", server_boot_files)
    netboot.write_script(server.tftp, netboot.smee_script(arch=Arch.X86_64, base_url=f"http://{netboot.HTTP_IP}",
                                                          extra=smee_extra()))
    with server_guest(server, uefi=False, http_port=free_port(), registry_port=None,
                      log=tmp_path / "console.log") as g:
        deadline = time.monotonic() + 240
        while not re.search(r"(Connection reset|Connection refused|Could not boot)", g.firmware_console):
            assert time.monotonic() < deadline, g.firmware_console[-3000:]
            time.sleep(1)
        time.sleep(5)
        firmware = g.firmware_console
    error = re.search(r"^.*(Connection reset|Connection refused|Could not boot).*$", firmware, re.M)
    print(f"\n[HTTP down] iPXE said: {error.group(0).strip() if error else '?'}")
    assert f"http://{netboot.HTTP_IP}/vmlinuz-x86_64" in firmware  # iPXE names what it could not fetch
    assert "Linux version" not in g.console
