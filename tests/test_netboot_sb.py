"""Netboot with Secure Boot on (tasks/media/netboot_sb.py, containers/hook-iso/mknetboot).

- grub.cfg: the setting netboot_sb_cmdline in GRUB's words, worker_id and hw_addr GRUB's
  ${net_default_mac} unless the setting names them; a bad setting is refused before any work.
- `doit netboot_sb` on the built dev OS: the tarball (shim, Debian's signed net GRUB, MokManager,
  grub/grub.cfg, the kernel, the initramfs) and its checksum line; nothing to do when nothing
  changed; the same bytes again; a cmdline change remakes it alone.
- The real boot, as a user runs it (`doit boot --netboot --secure-boot`): the tarball unpacked as a
  TFTP root, an emulated server under OVMF with Secure Boot on (Microsoft's keys) PXE-boots shim by
  the firmware's own network stack (no iPXE: it is not signed), shim checks Debian's GRUB, GRUB
  loads the kernel and the initramfs by TFTP, shim checks the kernel; the OS runs locked down to
  the running tink-worker, whose worker_id is the NIC's MAC.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tasks.boot import netboot
from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.media import netboot_sb
from tasks.settings import load_settings
from tests.conftest import REGISTRY_PASSWORD, Registry
from tests.pipeline_env import Project, copy_out, make_project
from tests.test_boot import (
    BOOT_TIMEOUT,
    MEMORY_MB,
    SMP,
    WORKER_ID,
    assert_password_only_in_kernel_cmdline,
    tinkerbell_cmdline,
)
from tests.test_iso import TEST_BASE, sign_pair  # noqa: F401 - a fixture

ARCH = Arch.native()
#: The server's NIC: its MAC is the worker_id GRUB gives the kernel.
MAC = "52:54:00:5b:00:01"
#: The Tinkerbell keys a site gives (the registry, tink-worker's image, the server), no worker_id:
#: GRUB gives the NIC's MAC; the serial console last, so /dev/console is it.
NETBOOT_CMDLINE = tinkerbell_cmdline().replace(f"worker_id={WORKER_ID} ", "")


# --- grub.cfg ---------------------------------------------------------------------------------------


def linux_line(config: bytes) -> str:
    lines = [line for line in config.decode().splitlines() if line.startswith("linux ")]
    assert len(lines) == 1, config
    return lines[0]


def test_grub_cfg_gives_the_macs_and_the_setting_in_grub_words() -> None:
    config = netboot_sb.grub_cfg(Arch.X86_64, 'grpc_authority=10.1.1.1:42113 "note=two words" x=a$b {consoles}')
    assert linux_line(config) == ("linux /vmlinuz-x86_64 worker_id=${net_default_mac} hw_addr=${net_default_mac} "
                                  "grpc_authority=10.1.1.1:42113 \"note=two words\" 'x=a$b' console=tty0 console=ttyS0")
    assert "\ninitrd /initramfs-x86_64\nboot\n" in config.decode()
    # the setting's own worker_id wins; aarch64's serial port
    named = netboot_sb.grub_cfg(Arch.AARCH64, "worker_id=machine-7 console={serial}")
    assert linux_line(named) == "linux /vmlinuz-aarch64 hw_addr=${net_default_mac} worker_id=machine-7 console=ttyAMA0"
    assert netboot_sb.boot_file(Arch.AARCH64) == "shimaa64.efi"


def test_a_bad_netboot_cmdline_is_refused_before_any_work() -> None:
    with pytest.raises(HookError, match=r"^setting netboot_sb_cmdline: the cmdline has an unbalanced double quote"):
        load_settings(lambda n, d=None: d, {"HOOK_NETBOOT_SB_CMDLINE": 'a="b'})


# --- doit netboot_sb ---------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def netboot_project(dev_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the built dev project, with `doit netboot_sb` run once."""
    project = make_project(tmp_path_factory.mktemp("netboot-sb") / "hook", env={
        "HOOK_ISO_BASE": TEST_BASE, "HOOK_NETBOOT_SB_CMDLINE": NETBOOT_CMDLINE})
    copy_out(dev_project, project)
    first = project.doit("netboot_sb")
    project.built = first
    print(f"\n[doit netboot_sb] {first.seconds:.1f}s, ran {first.executed}")
    assert first.executed in (["iso_tools", f"netboot_sb:{ARCH}"], [f"netboot_sb:{ARCH}"]), first.output[-3000:]
    return project


@pytest.fixture(scope="module")
def built_tarball(netboot_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("netboot-built") / f"hook-netboot-sb_{ARCH}.tar.gz"
    shutil.copy(netboot_project.out(f"dist/dev/hook-netboot-sb_{ARCH}.tar.gz"), copy)
    return copy


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="OVMF's Secure Boot build is x86_64")
def test_doit_boot_secure_boot_netboot_runs_tink_worker_locked_down(netboot_project: Project, built_tarball: Path,
                                                                    worker_registry: Registry) -> None:
    """`doit boot --netboot --secure-boot`: the tarball as a TFTP root, OVMF with Secure Boot on
    (Microsoft's keys), the firmware's own PXE client (no iPXE: not signed) loads shim, shim checks
    and starts Debian's network GRUB, GRUB loads the kernel and the initramfs by TFTP, shim checks
    the kernel; the OS runs locked down to the running tink-worker, whose worker_id is the NIC's MAC."""
    result = netboot_project.doit("boot", "--netboot", "--secure-boot", "--registry", worker_registry.addr,
                                  "--memory", str(MEMORY_MB), "--smp", str(SMP), "--accel", "tcg",
                                  f"--expect=TINK-WORKER-RUNNING worker_id={netboot.MAC}",
                                  "--timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT + 120)
    console = result.stderr  # the console, echoed
    print("\n".join(line for line in result.stderr.splitlines() if line.startswith("hook: ")))
    assert f"DHCP boot file shim{netboot_sb.efi_name(ARCH)}.efi" in result.stderr
    assert "NBP filename is shimx64.efi" in console and "iPXE" not in console  # OVMF's PXE client
    assert "Fetching Netboot Image grubx64.efi" in console  # shim, from the same TFTP folder
    assert "Hook: loading the kernel and the initramfs (x86_64) by TFTP" in console  # GRUB read our grub.cfg
    assert "EFI stub: UEFI Secure Boot is enabled" in console and "secureboot: Secure boot enabled" in console
    assert "Kernel is locked down from EFI Secure Boot" in console
    command_line = next(line for line in console.splitlines() if "Command line: BOOT_IMAGE=" in line)
    assert f"worker_id={netboot.MAC} hw_addr={netboot.MAC} " in command_line, command_line  # GRUB's MAC
    assert "saw 'TINK-WORKER-RUNNING worker_id=" in result.stderr
    assert_password_only_in_kernel_cmdline(console, REGISTRY_PASSWORD)  # the grub.cfg line is logged masked


@pytest.mark.slow
def test_secure_boot_boot_refusals_are_one_line(netboot_project: Project) -> None:
    wrong = netboot_project.doit("boot", "--netboot", "--secure-boot", "--cmdline=worker_id=x", check=False)
    assert wrong.returncode != 0
    assert "--cmdline does not reach a --secure-boot netboot: its grub.cfg holds the cmdline" in wrong.output
    alone = netboot_project.doit("boot", "--secure-boot", check=False)
    assert alone.returncode != 0 and "--secure-boot is for --netboot" in alone.output


@pytest.mark.slow
def test_doit_netboot_sb_outputs_incremental_and_reproducible(netboot_project: Project, built_tarball: Path,
                                                             sign_pair: tuple[Path, Path]) -> None:  # noqa: F811
    efi = netboot_sb.efi_name(ARCH)
    with tarfile.open(built_tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
        config = tar.extractfile("./grub/grub.cfg").read()  # type: ignore[union-attr]
    assert sorted(members) == sorted(f"./{n}" for n in (
        f"shim{efi}.efi", f"grub{efi}.efi", f"mm{efi}.efi", "grub/grub.cfg", f"vmlinuz-{ARCH}", f"initramfs-{ARCH}"))
    assert len({(m.uid, m.gid, m.mtime) for m in members.values()}) == 1 and members["./grub/grub.cfg"].uid == 0
    with tarfile.open(netboot_project.out(f"dist/dev/hook_{ARCH}.tar.gz")) as tar:  # the dev build's own
        assert tar.getmember(f"./initramfs-{ARCH}").size == members[f"./initramfs-{ARCH}"].size
    assert "worker_id=${net_default_mac} hw_addr=${net_default_mac}" in linux_line(config)
    assert REGISTRY_PASSWORD in linux_line(config)  # the site's keys go in as given
    dist = netboot_project.out("dist/dev")
    assert f"  hook-netboot-sb_{ARCH}.tar.gz\n" in (dist / "checksum.txt").read_text()
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    assert netboot_project.built is not None
    assert "DHCP boot file shim" in netboot_project.built.output
    assert REGISTRY_PASSWORD not in netboot_project.built.output  # the cmdline is logged, masked
    assert "Secure Boot: shim -> Debian's signed GRUB -> the kernel, signed by Debian" in netboot_project.built.output

    noop = netboot_project.doit("netboot_sb")
    assert noop.executed == [], noop.output[-2000:]

    netboot_project.doit("forget", f"netboot_sb:{ARCH}")
    time.sleep(1.1)
    again = netboot_project.doit("netboot_sb")
    assert again.executed == [f"netboot_sb:{ARCH}"]
    assert sha256(netboot_project.out(f"dist/dev/hook-netboot-sb_{ARCH}.tar.gz")) == sha256(built_tarball), \
        "not reproducible"

    keys = ("netboot_sb_cmdline=console=ttyS1,115200 worker_id=other", f"iso_sign_key={sign_pair[0]}",
            f"iso_sign_cert={sign_pair[1]}")
    changed = netboot_project.doit("netboot_sb", *keys)
    assert changed.executed == [f"netboot_sb:{ARCH}"]  # the tarball only: no image, linuxkit or package step
    assert "hook test ISO signing key (iso_sign_cert: the machines must trust" in changed.output, changed.output[-2000:]
    with tarfile.open(netboot_project.out(f"dist/dev/hook-netboot-sb_{ARCH}.tar.gz")) as tar:
        config = tar.extractfile("./grub/grub.cfg").read()  # type: ignore[union-attr]
    assert linux_line(config).endswith("hw_addr=${net_default_mac} console=ttyS1,115200 worker_id=other")
    assert netboot_project.doit("netboot_sb", *keys).executed == []
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)

    netboot_project.doit("clean", f"netboot_sb:{ARCH}")
    assert not netboot_project.out(f"dist/dev/hook-netboot-sb_{ARCH}.tar.gz").exists()
    assert "netboot-sb" not in (dist / "checksum.txt").read_text()
