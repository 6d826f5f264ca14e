"""aarch64, the release's other half, boots: the release build (`doit dist arches=aarch64`: our arm64
images built from the test OS's real arm64 bases and pushed to the htpasswd registry, LinuxKit's
arm64 packages from that registry, Debian's arm64 kernel) under `qemu-system-aarch64 -M virt -cpu
max` with AAVMF, TCG, `console=ttyAMA0` last:

- the kernel and initramfs (as `doit boot --arch aarch64` boots them: AAVMF starts the kernel's EFI
  stub) to a running arm64 tink-worker pulled with auth; hook-docker's dockerd and hook-bootkit's
  python are aarch64 ELF binaries, read from the running OS;
- the aarch64 ISO (`doit dist_iso`), patched with `tasks.iso patch`, from a virtual CD (virtio-scsi)
  with Secure Boot on (AAVMF with Microsoft's keys): shimaa64, Debian's signed GRUB and kernel, to
  tink-worker;
- the aarch64 Secure Boot netboot (`doit dist_netboot_sb`, booted by `doit boot --netboot
  --secure-boot`): AAVMF's own PXE client, shimaa64, Debian's signed network GRUB, by TFTP, to
  tink-worker;
- `doit dev_dist arches=aarch64`, the local build: an OS of aarch64 programs.

One release build, three boots. Emulating arm64 on x86 is slow (TCG): the milestones are in the README.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.boot import netboot, qemu
from tasks.core.arch import Arch
from tasks.media import iso
from tests.conftest import REGISTRY_PASSWORD, REGISTRY_USER, Registry, _start_registry, push_packages, push_worker
from tests.pipeline_env import Project, make_project
from tests.test_boot import GUEST_REGISTRY, WORKER_ID, WORKER_IMAGE, in_service, report, tinkerbell_cmdline

pytestmark = pytest.mark.slow
ARM = Arch.AARCH64
#: arm64 under TCG: the OS's first lines take a few times longer than x86_64's
ARM_BOOT_TIMEOUT = 1200
ARM_MEMORY_MB = 2048
ARM_SMP = 2  # the arm64 generic timer: no TSC to drift (see tests/test_boot.py's SMP)
ARM_WORKER = "hook-arm64-machine-1"
ISO_WORKER = "hook-arm64-machine-2"
#: ELF e_machine (offset 18, little endian) of an aarch64 binary
EM_AARCH64 = 183
#: the python3 hook-bootkit runs, in its LinuxKit service rootfs on the host
BOOTKIT_PYTHON = "/containers/services/hook-bootkit/lower/usr/bin/python3"


@pytest.fixture(scope="module")
def arm64_registry(tmp_path_factory: pytest.TempPathFactory, test_os: dict) -> Iterator[tuple[Registry, Path]]:
    """The htpasswd registry with the test OS's LinuxKit packages (multi-arch indexes of real amd64 and
    arm64 images) and the tink-worker stand-in (an index, so the arm64 guest pulls its arm64 image)."""
    folder = tmp_path_factory.mktemp("arm64-registry")
    reg = _start_registry(folder / "registry", username=REGISTRY_USER, password=REGISTRY_PASSWORD)
    config = folder / "docker-config"
    push_packages(reg, test_os, config)
    push_worker(reg, test_os, config)
    try:
        yield reg, config
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def arm64_release(arm64_registry, tmp_path_factory: pytest.TempPathFactory) -> Project:  # noqa: ANN001
    """`doit dist arches=aarch64` and `doit dist_iso arches=aarch64` from the registry, once."""
    reg, config = arm64_registry
    project = make_project(tmp_path_factory.mktemp("arm64") / "hook", env={
        "HOOK_ORG": f"{reg.addr}/hooktest", "HOOK_PKG_ORG": f"{reg.addr}/linuxkit", "DOCKER_CONFIG": str(config),
        "HOOK_ISO_BASE": "local/python-base:amd64"})
    project.built = project.doit("dist", "arches=aarch64", timeout=3600)
    print(f"\n[arm64 dist] {project.built.seconds:.0f}s, ran {len(project.built.executed)} tasks")
    done = project.doit("dist_iso", "arches=aarch64", timeout=1800)
    print(f"[arm64 dist_iso] {done.seconds:.0f}s")
    done = project.doit("dist_netboot_sb", "arches=aarch64", f"netboot_sb_cmdline={NETBOOT_CMDLINE}", timeout=1800)
    print(f"[arm64 dist_netboot_sb] {done.seconds:.0f}s")
    return project


def elf_machine_of(service: str, process: str) -> str:
    """A shell command: the ELF e_machine of each running `process` in `service`, from /proc/<pid>/exe."""
    code = ("import os; print(*sorted({open(f'/proc/{p}/exe', 'rb').read(20)[18] for p in os.listdir('/proc') "
            f"if p.isdigit() and open(f'/proc/{{p}}/comm').read().strip() == '{process}'}}))")
    return in_service(service, f'python3 -c "{code}"')


def elf_machine_of_file(path: str) -> str:
    """A shell command: the ELF e_machine of a file of the host's root, read by hook-docker (/host_root)."""
    return in_service("hook-docker", f"python3 -c \"print(open('/host_root{path}', 'rb').read(20)[18])\"")


#: Lines the console shares with a command's output: a program's mirrored warning or milestone
#: ('hook-bootkit: INFO ...') and a kernel message ('[  61.234] ...').
CONSOLE_ONLY = re.compile(r"^(?:[\w.-]+: (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) |\[\s*\d+\.\d+\] )")


def last_line(output: str) -> str:
    """The command's last line of output, skipping what the console showed between its lines."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not CONSOLE_ONLY.match(line.strip())]
    return lines[-1] if lines else ""


def marker(worker_id: str) -> str:
    return f"TINK-WORKER-RUNNING worker_id={worker_id}"


def worker_cmdline(worker_id: str) -> str:
    """The boot tests' Tinkerbell cmdline for this machine: its own worker_id, the PL011 console last."""
    assert f"worker_id={WORKER_ID} " in tinkerbell_cmdline()
    return tinkerbell_cmdline().replace("console=ttyS0", "console=ttyAMA0").replace(
        f"worker_id={WORKER_ID} ", f"worker_id={worker_id} ")


@pytest.mark.skipif(Arch.native() is not Arch.X86_64, reason="emulates arm64 on an x86_64 host")
def test_arm64_release_boots_to_tink_worker(arm64_release: Project, arm64_registry, tmp_path: Path) -> None:  # noqa: ANN001
    reg, _ = arm64_registry
    with tarfile.open(arm64_release.out("dist/release/hook_aarch64.tar.gz")) as tar:
        tar.extractall(tmp_path, filter="data")
    kernel, initrd = tmp_path / "vmlinuz-aarch64", tmp_path / "initramfs-aarch64"
    assert kernel.read_bytes()[:2] == b"MZ" and kernel.read_bytes()[0x38:0x3C] == b"ARM\x64"  # an arm64 Image
    nic = qemu.Nic(forwards=(qemu.Forward(5000, reg.port),))
    cmdline = worker_cmdline(ARM_WORKER)
    with qemu.Guest(kernel, initrd, arch=ARM, cmdline=qemu.console_cmdline(cmdline, ARM), memory_mb=ARM_MEMORY_MB,
                    accel="tcg", smp=ARM_SMP, nics=[nic], extra=["-device", "virtio-rng-pci"],
                    log=tmp_path / "console.log", milestone_patterns=qemu.HOOK_MILESTONES) as g:
        g.wait_for(marker(ARM_WORKER), timeout=ARM_BOOT_TIMEOUT)
        report(g, "aarch64 release, AAVMF, -kernel")
        machine = g.sh("uname -m", timeout=300).output
        dockerd = g.sh(elf_machine_of("hook-docker", "dockerd"), timeout=300)
        # hook-bootkit has done its job and exited (it started tink-worker): the python it ran, from its rootfs
        bootkit = g.sh(elf_machine_of_file(BOOTKIT_PYTHON), timeout=300)
        worker = g.sh(in_service("hook-docker", f"docker image inspect -f '{{{{.Architecture}}}}' {WORKER_IMAGE}"),
                      timeout=300)
    assert "aarch64" in machine
    # (the stand-in's lines on the console may come between: the answer is the last line)
    assert dockerd.status == 0 and last_line(dockerd.output) == str(EM_AARCH64), dockerd.output
    assert bootkit.status == 0 and last_line(bootkit.output) == str(EM_AARCH64), bootkit.output
    assert re.search(r"hook-bootkit.*tink-worker is running", g.console), "bootkit did not say it started tink-worker"
    assert worker.status == 0 and last_line(worker.output) == "arm64", worker.output  # pulled: the index's arm64 image
    assert "EFI stub: Booting Linux Kernel" in g.console  # through AAVMF, not QEMU's direct kernel loader
    assert f"tink_worker_image={WORKER_IMAGE}" in g.console and GUEST_REGISTRY in WORKER_IMAGE


#: netboot_sb_cmdline of the arm64 release: the site's keys, no worker_id (GRUB gives the NIC's MAC)
NETBOOT_CMDLINE = worker_cmdline("x").replace("worker_id=x ", "")


@pytest.mark.skipif(Arch.native() is not Arch.X86_64, reason="emulates arm64 on an x86_64 host")
def test_arm64_secure_boot_netboot_runs_tink_worker(arm64_release: Project, arm64_registry) -> None:  # noqa: ANN001
    """`doit boot --arch aarch64 --netboot --secure-boot`: the arm64 netboot_sb tarball by TFTP under
    AAVMF with Microsoft's keys: shimaa64, Debian's signed arm64 network GRUB, Debian's arm64 kernel,
    to the running arm64 tink-worker, worker_id the NIC's MAC."""
    reg, _ = arm64_registry
    with tarfile.open(arm64_release.out("dist/release/hook-netboot-sb_aarch64.tar.gz")) as tar:
        names = sorted(tar.getnames())
    assert names == ["./grub/grub.cfg", "./grubaa64.efi", "./initramfs-aarch64", "./mmaa64.efi", "./shimaa64.efi",
                     "./vmlinuz-aarch64"], names
    mac = netboot.MAC  # doit boot's NIC
    result = arm64_release.doit("boot", "--build", "release", "--arch", "aarch64", "--netboot", "--secure-boot",
                                "--registry", reg.addr, "--memory", str(ARM_MEMORY_MB), "--smp", str(ARM_SMP),
                                "--accel", "tcg", f"--expect={marker(mac)}", "--timeout", str(ARM_BOOT_TIMEOUT),
                                timeout=ARM_BOOT_TIMEOUT + 120)
    console = result.stderr
    print("\n".join(line for line in console.splitlines() if line.startswith("hook: ")))
    assert "UEFI (AAVMF) with Secure Boot on" in console and "DHCP boot file shimaa64.efi" in console
    assert "Fetching Netboot Image grubaa64.efi" in console and "iPXE" not in console
    assert "EFI stub: UEFI Secure Boot is enabled." in console
    assert "Kernel is locked down from EFI Secure Boot" in console
    assert f"worker_id={mac} hw_addr={mac} " in console


@pytest.mark.skipif(Arch.native() is not Arch.X86_64, reason="emulates arm64 on an x86_64 host")
def test_arm64_iso_patched_boots_from_a_virtual_cd_with_secure_boot(arm64_release: Project, arm64_registry,  # noqa: ANN001
                                                                    tmp_path: Path) -> None:
    reg, _ = arm64_registry
    image = tmp_path / "hook-aarch64.iso"
    shutil.copy(arm64_release.out("dist/release/hook-aarch64.iso"), image)
    cmdline = worker_cmdline(ISO_WORKER)
    iso.patch(image, cmdline)
    nic = qemu.Nic(forwards=(qemu.Forward(5000, reg.port),))
    attach = ["-drive", f"if=none,id=cd,format=raw,readonly=on,media=cdrom,file={image}",
              "-device", "virtio-scsi-pci", "-device", "scsi-cd,drive=cd", "-device", "virtio-rng-pci"]
    firmware = qemu.aarch64_secure_boot_firmware(tmp_path / "AAVMF_VARS.fd")  # Secure Boot on (issue 20)
    with qemu.Guest(None, None, arch=ARM, memory_mb=ARM_MEMORY_MB, accel="tcg", smp=ARM_SMP, nics=[nic],
                    extra=[*firmware, *attach], log=tmp_path / "console.log",
                    milestone_patterns=(("GRUB runs the Hook entry", r"Hook: loading the kernel"),
                                        *qemu.HOOK_MILESTONES)) as g:
        g.wait_for(marker(ISO_WORKER), timeout=ARM_BOOT_TIMEOUT)
        report(g, "aarch64 ISO, AAVMF, virtual CD")
        shown = g.sh("cat /proc/cmdline", timeout=300).output
    assert re.search(rf"worker_id={ISO_WORKER}\b", shown)
    # shimaa64 (Microsoft's signature), Debian's signed GRUB and arm64 kernel: the whole chain verified
    assert "EFI stub: UEFI Secure Boot is enabled." in g.console
    assert "Kernel is locked down from EFI Secure Boot" in g.console


def elf_machines(initramfs: Path, names: set[str]) -> dict[str, int]:
    """The ELF e_machine of each named file of a gzip newc initramfs (hardlinks followed: newc stores
    a hardlinked file's data with the last of its names, all of them sharing the inode number)."""
    inode_of: dict[str, int] = {}
    head_of: dict[int, bytes] = {}
    with gzip.open(initramfs, "rb") as stream:
        while True:
            header = stream.read(110)
            if len(header) < 110 or header[:6] != b"070701":
                break
            field = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
            ino, size, namesize = field[0], field[6], field[11]
            name = stream.read(namesize)[:-1].decode()
            stream.read((-(110 + namesize)) % 4)
            data = stream.read(size)
            stream.read((-size) % 4)
            if name == "TRAILER!!!":
                break
            if name in names:
                inode_of[name] = ino
            if size >= 20 and data[:4] == b"\x7fELF":
                head_of[ino] = data[:20]
    return {name: head_of[ino][18] for name, ino in inode_of.items() if ino in head_of}


def test_local_arm64_build_holds_arm64_programs(arm64_registry, tmp_path: Path) -> None:  # noqa: ANN001
    """`doit dev_dist arches=aarch64`: our images built locally for arm64 (no registry for them), LinuxKit's
    packages pulled for arm64 (here from the test registry, as from Docker Hub), an OS of arm64 programs."""
    reg, config = arm64_registry
    project = make_project(tmp_path / "hook", env={"HOOK_PKG_ORG": f"{reg.addr}/linuxkit",
                                                   "DOCKER_CONFIG": str(config)})
    done = project.doit("dev_dist", "arches=aarch64", timeout=3600)
    print(f"\n[arm64 dev_dist] {done.seconds:.0f}s, ran {len(done.executed)} tasks")
    with tarfile.open(project.out("dist/dev/hook_aarch64.tar.gz")) as tar:
        tar.extractall(tmp_path / "dist", filter="data")
    dockerd = "containers/services/hook-docker/lower/usr/sbin/dockerd"
    python = BOOTKIT_PYTHON.lstrip("/") + ".11"
    machines = elf_machines(tmp_path / "dist" / "initramfs-aarch64", {dockerd, python})
    assert machines == {dockerd: EM_AARCH64, python: EM_AARCH64}, machines
    for image in ("hook-docker", "hook-bootkit", "hook-events"):
        record = json.loads(project.out(f"images/local/{image}-aarch64.json").read_text())
        arch = subprocess.run(["docker", "image", "inspect", "-f", "{{.Architecture}}", record["ref"]],
                              check=True, capture_output=True, text=True).stdout.strip()
        assert arch == "arm64", (image, arch)
