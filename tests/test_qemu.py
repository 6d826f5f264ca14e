"""tasks.boot.qemu: real TCG boots of a tiny busybox initramfs made here, plus the pure helpers."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from pathlib import Path

import pytest

from tasks.boot import qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError

MARKER = "HOOK-QEMU-TEST: up"


def make_initramfs(dest: Path, busybox: Path, init: str) -> Path:
    """A gzip cpio newc with bin/busybox, bin/sh and /init, made with GNU cpio."""
    root = dest.parent / f"{dest.name}.root"
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev"):
        (root / d).mkdir()
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "init").write_text(init)
    (root / "init").chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
        cwd=root,
        input="\n".join(names).encode() + b"\n",
        check=True,
        capture_output=True,
    ).stdout
    dest.write_bytes(gzip.compress(archive, mtime=0))
    return dest


INIT_OK = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "{MARKER} cmdline=$(/bin/busybox cat /proc/cmdline)"
/bin/busybox poweroff -f
"""

INIT_SILENT = """#!/bin/sh
/bin/busybox poweroff -f
"""


@pytest.fixture(scope="module")
def initramfs_ok(tmp_path_factory: pytest.TempPathFactory, busybox: Path) -> Path:
    return make_initramfs(tmp_path_factory.mktemp("qemu") / "ok.img", busybox, INIT_OK)


@pytest.mark.slow
def test_boot_sees_marker(test_kernel: Path, initramfs_ok: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = qemu.boot(
        test_kernel, initramfs_ok, expect=MARKER, timeout=120, log=log, memory_mb=256, accel="tcg"
    )
    assert result.matched
    assert result.returncode is None  # killed once the marker was seen
    assert result.accel == "tcg"
    assert MARKER in result.console
    assert MARKER in log.read_text(errors="replace")
    assert "-no-reboot" in result.argv and "-nographic" in result.argv


@pytest.mark.slow
def test_boot_until_poweroff(test_kernel: Path, initramfs_ok: Path) -> None:
    """Without expect: returns when the guest powers off (qemu exits 0), cmdline passed through."""
    result = qemu.boot(
        test_kernel, initramfs_ok, cmdline="console=ttyS0 panic=-1 hook_test=1", timeout=120, memory_mb=256
    )
    assert not result.matched
    assert result.returncode == 0
    assert "hook_test=1" in result.console
    assert f"{MARKER} cmdline=" in result.console


@pytest.mark.slow
def test_milestones_beside_an_echoed_console_are_lines_of_their_own(test_kernel: Path, initramfs_ok: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """`doit boot --expect` echoes the console and announces milestones: an announcement never cuts a
    console line (the console often arrives in pieces that end mid-line)."""
    result = qemu.boot(test_kernel, initramfs_ok, timeout=120, memory_mb=256, echo=True,
                       milestones=(("kernel", r"Linux version \d"), ("marker", MARKER)))
    assert result.returncode == 0
    echoed = capfd.readouterr().err
    lines = echoed.splitlines()
    assert [line for line in lines if "boot milestone after" in line and not line.startswith("hook: boot")] == []
    assert sum("hook: boot milestone after" in line for line in lines) == 2, echoed[-2000:]
    # the kernel's line as the guest wrote it (the firmware's output before it may end in a bare CR)
    kernel_line = re.search(r"\[ *\d+\.\d+\] Linux version [^\r\n]*", result.console).group(0).strip()
    assert any(kernel_line in line for line in lines), [line for line in lines if "Linux version" in line]
    assert any(line.startswith(f"{MARKER} cmdline=") for line in lines)


@pytest.mark.slow
def test_boot_timeout_is_a_clean_error(test_kernel: Path, tmp_path: Path, busybox: Path) -> None:
    initrd = make_initramfs(
        tmp_path / "hang.img", busybox, "#!/bin/sh\necho HANGING\nexec /bin/busybox sleep 600\n"
    )
    log = tmp_path / "console.log"
    with pytest.raises(HookError) as err:
        qemu.boot(test_kernel, initrd, expect="NEVER-THERE", timeout=4, log=log, memory_mb=256)
    message = str(err.value)
    assert message.startswith("no 'NEVER-THERE' on the console after 4 s; last lines: ")
    assert str(log) in message
    assert log.is_file()  # the console log is kept


@pytest.mark.slow
def test_poweroff_before_marker_is_an_error(test_kernel: Path, tmp_path: Path, busybox: Path) -> None:
    initrd = make_initramfs(tmp_path / "silent.img", busybox, INIT_SILENT)
    with pytest.raises(HookError, match="powered off .* without 'NEVER-THERE'") as err:
        qemu.boot(test_kernel, initrd, expect="NEVER-THERE", timeout=120, memory_mb=256)
    kept = Path(str(err.value).rsplit("(console log: ", 1)[1].rstrip(")"))
    assert kept.is_file()
    kept.unlink()


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="kernel .* does not exist"):
        qemu.boot(tmp_path / "nope", tmp_path / "nope.img")


def test_pick_accel_is_conservative() -> None:
    x86, arm = Arch.X86_64, Arch.AARCH64
    assert qemu.pick_accel("tcg", x86, host=x86, usable=True) == "tcg"
    assert qemu.pick_accel("auto", x86, host=x86, usable=False) == "tcg"
    assert qemu.pick_accel("auto", x86, host=x86, usable=True) == "kvm"
    assert qemu.pick_accel("auto", arm, host=x86, usable=True) == "tcg"
    assert qemu.pick_accel("kvm", x86, host=x86, usable=False) == "kvm"
    with pytest.raises(HookError, match="cannot run an aarch64 guest"):
        qemu.pick_accel("kvm", arm, host=x86)
    with pytest.raises(HookError, match="unknown qemu accel"):
        qemu.pick_accel("hvf", x86)


def test_kvm_pvm_means_no_kvm(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    assert qemu.kvm_usable(device=dev, pvm_module=tmp_path / "absent")
    (tmp_path / "kvm_pvm").mkdir()
    assert not qemu.kvm_usable(device=dev, pvm_module=tmp_path / "kvm_pvm")
    assert not qemu.kvm_usable(device=tmp_path / "absent", pvm_module=tmp_path / "absent")
    if Path("/sys/module/kvm_pvm").exists():  # this test machine: auto must be TCG
        assert qemu.pick_accel("auto", Arch.X86_64, host=Arch.X86_64) == "tcg"


def test_arch_cmdline() -> None:
    assert qemu.arch_cmdline("console=ttyS0 panic=-1", Arch.X86_64) == "console=ttyS0 panic=-1"
    assert qemu.arch_cmdline("console=ttyS0,115200 quiet", Arch.AARCH64) == "console=ttyAMA0,115200 quiet"
    assert qemu.arch_cmdline("console=tty0 console=ttyS0", Arch.AARCH64) == "console=tty0 console=ttyAMA0"


def test_interactive_argv(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    argv = qemu.interactive_argv(kernel, initrd, cmdline="console=ttyS0 x=1", memory_mb=512, accel="tcg")
    assert os.path.basename(argv[0]) == "qemu-system-x86_64"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 x=1"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-m") + 1] == "512"
    assert "-enable-kvm" not in argv


def test_aarch64_argv_shape(tmp_path: Path) -> None:
    """The argv's shape; tests/test_arm64.py boots it."""
    argv = qemu._argv(
        "qemu-system-aarch64",
        tmp_path / "k",
        tmp_path / "i",
        arch=Arch.AARCH64,
        cmdline=qemu.DEFAULT_CMDLINE,
        memory_mb=1024,
        accel="tcg",
    )
    assert argv[:5] == ["qemu-system-aarch64", "-M", "virt", "-cpu", "max,pauth-impdef=on"]
    assert argv[argv.index("-bios") + 1] == str(qemu.AAVMF)  # a kernel boots through UEFI, as on a server
    assert argv[argv.index("-append") + 1] == "console=ttyAMA0 panic=-1"
    own = qemu._argv("qemu-system-aarch64", None, None, arch=Arch.AARCH64, cmdline="", memory_mb=1024, accel="tcg")
    assert "-bios" not in own  # no kernel: the caller's extra names the firmware (an ISO boot)


def test_aarch64_without_firmware_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="install Debian's qemu-efi-aarch64"):
        qemu.aarch64_firmware(tmp_path / "QEMU_EFI.fd")
