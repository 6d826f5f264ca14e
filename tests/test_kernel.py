"""Our kernel (containers/hook-kernel/): a LinuxKit kernel image made by the pipeline from Debian's
signed kernel package and firmware packages, from Debian's real mirror; the kernel every boot test
boots. The driver check, the arm64 image, the refusals of bad input, the incremental rules."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.pipeline_env import Project, copy_out, image_files, make_project

ROOT = Path(__file__).resolve().parent.parent
ASSEMBLE = ROOT / "containers" / "hook-kernel" / "common" / "assemble.py"

DRIVERS = {
    "NICs": "e1000e igb igc ixgbe i40e ice bnxt_en bnx2x tg3 mlx4_en mlx5_core be2net qede enic r8169 vmxnet3 "
            "virtio_net cdc_ncm 8021q",
    "storage": "megaraid_sas mpt3sas smartpqi hpsa nvme ahci md_mod raid1 dm_crypt usb_storage uas xhci_pci "
               "virtio_blk virtio_scsi",
    "management": "hpilo ipmi_si ipmi_devintf",
}
#: Firmware the issue names, by the driver that loads it: a file of each folder must be in the OS.
FIRMWARE = {"bnx2x": "bnx2x/", "ice": "intel/ice/ddp/", "tg3": "tigon/"}


def pe_machine(kernel: Path) -> int | None:
    """The PE machine type of a kernel image (0x8664 x86_64, 0xaa64 arm64): it has an EFI stub; else None."""
    data = kernel.read_bytes()[:4096]
    if data[:2] != b"MZ":
        return None
    at = struct.unpack_from("<I", data, 0x3C)[0]
    return struct.unpack_from("<H", data, at + 4)[0] if data[at:at + 4] == b"PE\0\0" else None


def modules_in(kernel_tar: Path) -> tuple[set[str], set[str], set[str]]:
    """(module names as .ko files, names built in, firmware files) of a kernel.tar."""
    modules, builtin, firmware = set(), set(), set()
    with tarfile.open(kernel_tar) as tar:
        for member in tar:
            name = member.name
            if name.endswith(".ko"):
                modules.add(Path(name).stem.replace("-", "_"))
            elif name.startswith("lib/firmware/") and (member.isfile() or member.issym()):
                firmware.add(name.removeprefix("lib/firmware/"))
            elif name.endswith("/modules.builtin"):
                text = tar.extractfile(member).read().decode()
                builtin = {Path(line).stem.replace("-", "_") for line in text.split()}
    return modules, builtin, firmware


def check_drivers(kernel_tar: Path, *, skip: set[str] = frozenset()) -> dict[str, str]:
    modules, builtin, firmware = modules_in(kernel_tar)
    where = {}
    for names in DRIVERS.values():
        for name in names.split():
            if name in skip:
                continue
            assert name in modules or name in builtin, f"{name} is neither a module nor built in"
            where[name] = "module" if name in modules else "built in"
    for driver, folder in FIRMWARE.items():
        assert any(f.startswith(folder) for f in firmware), f"no firmware for {driver} under lib/firmware/{folder}"
    return where


def test_shipped_kernel_has_an_efi_stub_the_server_drivers_and_their_firmware(shipped_kernel: dict) -> None:
    assert pe_machine(shipped_kernel["kernel"]) == 0x8664  # a PE header: UEFI and iPXE's EFI build start it
    where = check_drivers(shipped_kernel["kernel.tar"])
    print(f"\n[kernel] drivers: {where}")
    report = json.loads(shipped_kernel["kernel.json"].read_text())
    assert report == shipped_kernel["record"]["report"]  # the image task recorded what the image holds
    assert report["efi_stub"] and report["signed"]  # Debian's signed vmlinuz (Secure Boot)
    assert report["version"].endswith("-amd64") and report["package"].startswith("linux-image-")
    assert 500 < report["modules"] < 2000, report["modules"]  # the server classes, not all 4,000
    assert "firmware-bnx2x" in " ".join(report["firmware_packages"])


def test_a_build_prints_the_kernel_section_of_the_size_report(dev_project: Project) -> None:
    assert dev_project.built is not None
    lines = [line for line in dev_project.built.stderr.splitlines() if line.startswith("hook: size report: kernel")]
    assert any("EFI stub, signed (Secure Boot)" in line for line in lines), lines
    assert any(line.startswith("hook: size report: kernel modules:") for line in lines), lines
    assert any("kernel firmware:" in line and "firmware-bnx2x" in line for line in lines), lines


def _arch() -> str:
    from tasks.core.arch import Arch

    return str(Arch.native())


@pytest.mark.slow
def test_arm64_kernel_image(tmp_path: Path, test_os: dict) -> None:
    """The arm64 kernel image is made on this amd64 machine without emulation (arm64 packages are
    downloaded and unpacked, never run): an arm64 PE kernel and the same drivers (no HP iLO on arm64)."""
    project = make_project(tmp_path / "hook")
    project.doit("image_load:hook-kernel-aarch64", "arches=aarch64")
    record = json.loads(project.out("images/local/hook-kernel-aarch64.json").read_text())
    assert record["platform"] == "linux/arm64" and record["report"]["version"].endswith("-arm64")
    files = image_files(record["ref"], ["kernel", "kernel.tar"], tmp_path / "files")
    assert pe_machine(files["kernel"]) == 0xAA64
    check_drivers(files["kernel.tar"], skip={"hpilo"})  # Debian's arm64 kernel has no HP iLO driver


@pytest.mark.parametrize(("setting", "message"), [
    ("kernel_suite=nosuch", "the Debian suite 'nosuch' is not on http"),
    ("kernel_version=6.1.0-999", "no package linux-image-6.1.0-999-amd64 in bookworm: set kernel_version= to one of:"),
])
def test_bad_kernel_settings_are_one_line_and_leave_no_record(tmp_path: Path, test_os: dict, setting: str,
                                                              message: str) -> None:
    project = make_project(tmp_path / "hook")
    result = project.doit(f"image_load:hook-kernel-{_arch()}", setting, check=False)
    assert result.returncode != 0
    failures = [line for line in result.stderr.splitlines() if line.startswith("hook: image_load:hook-kernel")]
    assert len(failures) == 1 and message in failures[0], result.output[-3000:]
    assert "Traceback" not in result.output
    assert not project.out(f"images/local/hook-kernel-{_arch()}.json").exists()


def test_a_firmware_package_that_is_not_there_is_named(tmp_path: Path, test_os: dict) -> None:
    project = make_project(tmp_path / "hook")
    project.edit("containers/hook-kernel/common/firmware.list", "firmware-no-such-package\n")
    result = project.doit(f"image_load:hook-kernel-{_arch()}", check=False)
    assert result.returncode != 0
    assert ("the firmware package firmware-no-such-package is not in bookworm: take it out of "
            "containers/hook-kernel/common/firmware.list") in result.stderr, result.output[-3000:]


def test_the_kernel_image_is_rebuilt_only_when_its_inputs_change(dev_project: Project, tmp_path: Path) -> None:
    project = make_project(tmp_path / "hook")
    copy_out(dev_project, project)
    arch = _arch()
    # the programs' shared code is not an input of the kernel: only the two program images and the OS
    project.edit("containers/common/hookcommon/log.py", "\n# a comment\n")
    ran = project.doit("dev_dist").executed
    assert f"image_load:hook-kernel-{arch}" not in ran and f"image_load:hook-docker-{arch}" in ran
    # the module list is: the kernel image and the OS, not the programs
    project.edit("containers/hook-kernel/common/modules.list", "btrfs\n")
    ran = project.doit("dev_dist").executed
    assert sorted(ran) == sorted([f"image_load:hook-kernel-{arch}", f"linuxkit:dev-{arch}", "package:dev"])
    record = json.loads(project.out(f"images/local/hook-kernel-{arch}.json").read_text())
    files = image_files(record["ref"], ["kernel.tar"], tmp_path / "files")
    assert "btrfs" in modules_in(files["kernel.tar"])[0]
    assert project.doit("dev_dist").executed == []


# --- the config check of assemble.py (both flavours), on a tree made here -------------------------


def _tree(tmp_path: Path, config: str) -> list[str]:
    version = "6.1.0-test"
    base = tmp_path / "root" / "lib" / "modules" / version
    (base / "kernel").mkdir(parents=True)
    (base / "modules.builtin").write_text("")
    (tmp_path / "config").write_text(config)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"PE\0\0" + bytes(200))
    return [sys.executable, str(ASSEMBLE), "--arch", "amd64", "--root", str(tmp_path / "root"), "--kernel", str(kernel),
            "--config", str(tmp_path / "config"), "--all-modules", "--out", str(tmp_path / "out")]


GOOD = "\n".join(f"CONFIG_{o}=y" for o in ("EFI_STUB", "DEVTMPFS", "BLK_DEV_INITRD", "RD_GZIP",
                                            "SERIAL_8250_CONSOLE")) + "\n"


@pytest.mark.parametrize("option", ["EFI_STUB", "DEVTMPFS", "SERIAL_8250_CONSOLE", "RD_GZIP"])
def test_a_config_without_a_required_option_is_refused(tmp_path: Path, option: str) -> None:
    argv = _tree(tmp_path, GOOD.replace(f"CONFIG_{option}=y\n", f"# CONFIG_{option} is not set\n"))
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"hook: error: the kernel config config has CONFIG_{option} unset, the Hook OS "
                                  f"needs CONFIG_{option}=y"), done.stderr
    assert not (tmp_path / "out").exists()


def test_a_good_config_assembles(tmp_path: Path) -> None:
    done = subprocess.run(_tree(tmp_path, GOOD), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "kernel.json").read_text())
    assert report["efi_stub"] and not report["signed"] and report["modules"] == 0


# --- the source flavour: Debian's linux-source-6.1 tarball, our configs, the builder ----------------

#: Kernel config symbols of the drivers the issue lists (their modules' names differ).
CONFIG_OF = {
    "e1000e": "E1000E", "igb": "IGB", "igc": "IGC", "ixgbe": "IXGBE", "i40e": "I40E", "ice": "ICE", "bnxt_en": "BNXT",
    "bnx2x": "BNX2X", "tg3": "TIGON3", "mlx4_en": "MLX4_EN", "mlx5_core": "MLX5_CORE", "be2net": "BE2NET",
    "qede": "QEDE", "enic": "ENIC", "r8169": "R8169", "vmxnet3": "VMXNET3", "virtio_net": "VIRTIO_NET",
    "cdc_ncm": "USB_NET_CDC_NCM", "8021q": "VLAN_8021Q", "megaraid_sas": "MEGARAID_SAS", "mpt3sas": "SCSI_MPT3SAS",
    "smartpqi": "SCSI_SMARTPQI", "hpsa": "SCSI_HPSA", "nvme": "BLK_DEV_NVME", "ahci": "SATA_AHCI",
    "md_mod": "BLK_DEV_MD", "raid1": "MD_RAID1", "dm_crypt": "DM_CRYPT", "usb_storage": "USB_STORAGE", "uas": "USB_UAS",
    "xhci_pci": "USB_XHCI_PCI", "virtio_blk": "VIRTIO_BLK", "virtio_scsi": "SCSI_VIRTIO", "hpilo": "HP_ILO",
    "ipmi_si": "IPMI_SI", "ipmi_devintf": "IPMI_DEVICE_INTERFACE",
}


@pytest.fixture(scope="session")
def linux_source() -> Path:
    """Debian's linux-source-6.1 tarball (the kernel.org 6.1 tree with Debian's patches), cached."""
    from tests.conftest import CACHE

    tarball = CACHE / "linux-source-6.1.tar.xz"
    if tarball.is_file():
        return tarball
    work = CACHE / "linux-source.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(["apt-get", "download", "-q", "linux-source-6.1"], cwd=work, check=True, capture_output=True)
    deb = next(work.glob("linux-source-6.1_*.deb"))
    with (subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc,
          tarfile.open(fileobj=proc.stdout, mode="r|") as tar):
        for member in tar:
            if member.name.endswith("/linux-source-6.1.tar.xz"):
                with tar.extractfile(member) as src, (work / "linux.tar.xz").open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                break
    os.replace(work / "linux.tar.xz", tarball)
    shutil.rmtree(work, ignore_errors=True)
    return tarball


def _source_env(linux_source: Path, config: str = "tests/kernel/small-x86_64.config") -> dict[str, str]:
    from tests.conftest import CACHE

    return {"HOOK_KERNEL_FLAVOUR": "source", "HOOK_KERNEL_SRC": str(linux_source), "HOOK_KERNEL_CONFIG": config,
            "HOOK_CACHE_DIR": str(CACHE / "user-cache")}  # ccache stays between runs on this machine


@pytest.mark.slow
def test_source_kernel_builds_and_boots_through_its_efi_stub(tmp_path: Path, test_os: dict, linux_source: Path,
                                                             busybox: Path) -> None:
    """kernel_flavour=source: the builder compiles the small test config from Debian's 6.1 source, the
    image holds it; OVMF starts it through its EFI stub, it loads its module, and it keeps a 3000-byte
    cmdline whole (COMMAND_LINE_SIZE 4096: stock x86 cuts at 2048)."""
    from tasks.boot import qemu
    from tests.test_iso import OVMF

    project = make_project(tmp_path / "hook", env=_source_env(linux_source))
    built = project.doit(f"image_load:hook-kernel-{_arch()}", timeout=1800)
    compile_line = [line for line in built.stderr.splitlines() if "hook-kernel: built in" in line]
    print(f"\n[source kernel] {compile_line}")
    record = json.loads(project.out(f"images/local/hook-kernel-{_arch()}.json").read_text())
    report = record["report"]
    assert report["flavour"] == "source" and report["efi_stub"] and not report["signed"]
    assert report["modules"] == 1 and report["config"]["VLAN_8021Q"] == "m"
    files = image_files(record["ref"], ["kernel", "kernel.tar"], tmp_path / "files")
    assert pe_machine(files["kernel"]) == 0x8664

    root = tmp_path / "root"
    with tarfile.open(files["kernel.tar"]) as tar:
        tar.extractall(root, filter="data")
    (root / "bin").mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "modprobe", "mount", "wc", "echo", "poweroff", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    init = root / "init"
    init.write_text("#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n"
                    "modprobe 8021q && echo SMALL-KERNEL-MODULE-LOADED\n"
                    "echo CMDLINE-BYTES=$(wc -c < /proc/cmdline)\npoweroff -f\n")
    init.chmod(0o755)
    for folder in ("proc", "sys", "dev"):
        (root / folder).mkdir()
    initrd = tmp_path / "initrd.cpio"
    names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, text=True, check=True).stdout
    subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-O", str(initrd)], cwd=root, input=names, text=True,
                   check=True)
    pad = "hooktest_pad=" + "x" * 2980
    extra = ["-machine", "q35", "-bios", str(OVMF)]  # UEFI: OVMF starts -kernel through its EFI stub
    result = qemu.boot(files["kernel"], initrd, cmdline=f"console=ttyS0 panic=-1 {pad}", memory_mb=512, accel="tcg",
                       timeout=240, expect="CMDLINE-BYTES=", extra=extra, log=tmp_path / "console.log")
    assert "EFI stub" in result.console or "efi:" in result.console  # started by OVMF through the stub
    assert "SMALL-KERNEL-MODULE-LOADED" in result.console
    cmdline_bytes = int(re.search(r"CMDLINE-BYTES=(\d+)", result.console).group(1))
    assert cmdline_bytes > 3000, cmdline_bytes


@pytest.mark.slow
def test_shipped_source_configs_keep_what_the_os_needs(tmp_path: Path, test_os: dict, linux_source: Path) -> None:
    """containers/hook-kernel/source/config-{x86_64,aarch64} after `make olddefconfig` on 6.1: every
    required option, every listed driver (y or m), kexec; and `doit kernel_config --tool olddefconfig`
    saves our config back unchanged (it is a savedefconfig of that tree already)."""
    project = make_project(tmp_path / "hook", env=_source_env(linux_source, config=""))
    config = project.root / "containers/hook-kernel/source/config-x86_64"
    before = config.read_bytes()
    project.doit("kernel_config", "--tool", "olddefconfig", "--arch", "x86_64", timeout=1200)
    assert config.read_bytes() == before
    builder = json.loads(project.out("images/tools/hook-kernel-builder.json").read_text())["ref"]
    script = ("set -e; mkdir -p /b && tar -xf /src/linux.tar -C /b --strip-components=1 && cd /b; "
              "for a in x86_64: arm64:aarch64-linux-gnu-; do k=${a%%:*}; c=${a#*:}; o=$k; "
              "[ $k = arm64 ] && o=aarch64; cp /cfg/config-$o .config; "
              "make -s ARCH=$k CROSS_COMPILE=$c olddefconfig; cp .config /out/full-$o; done")
    out = tmp_path / "full"
    out.mkdir()
    subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh",
                    "-v", f"{linux_source}:/src/linux.tar:ro", "-v", f"{config.parent}:/cfg:ro", "-v", f"{out}:/out",
                    builder, "-c", script], check=True, capture_output=True, timeout=900)
    for arch, docker_arch in (("x86_64", "amd64"), ("aarch64", "arm64")):
        full = out / f"full-{arch}"
        done = subprocess.run([sys.executable, str(ASSEMBLE), "--arch", docker_arch, "--check-config", str(full)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        values = dict(line.split("=", 1) for line in full.read_text().splitlines() if line.startswith("CONFIG_"))
        for driver, symbol in CONFIG_OF.items():
            if driver == "hpilo" and arch == "aarch64":
                continue  # HP iLO is x86 hardware
            assert values.get(f"CONFIG_{symbol}") in ("y", "m"), f"{arch}: CONFIG_{symbol} ({driver}) is lost"
        assert values.get("CONFIG_KEXEC") == "y" and values.get("CONFIG_KEXEC_FILE") == "y"


def test_a_source_tarball_with_another_sha256_is_refused(tmp_path: Path, test_os: dict) -> None:
    tarball = tmp_path / "linux-6.1.tar.xz"
    tarball.write_bytes(b"not the kernel you asked for")
    wrong = "0" * 64
    project = make_project(tmp_path / "hook", env={"HOOK_KERNEL_FLAVOUR": "source", "HOOK_KERNEL_SRC": str(tarball),
                                                   "HOOK_KERNEL_SRC_SHA256": wrong})
    result = project.doit(f"image_load:hook-kernel-{_arch()}", check=False)
    assert result.returncode != 0
    assert f"has sha256 {hashlib.sha256(tarball.read_bytes()).hexdigest()}, kernel_src_sha256 is {wrong}" in \
        result.stderr, result.output[-2000:]
    assert not project.out(f"images/local/hook-kernel-{_arch()}.json").exists()


def test_a_downloaded_source_with_another_sha256_leaves_nothing(tmp_path: Path, test_os: dict) -> None:
    import functools
    import http.server
    import threading

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "linux-6.1.tar.xz").write_bytes(b"x" * 100000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/linux-6.1.tar.xz"
        cache = tmp_path / "cache"
        env = {"HOOK_KERNEL_FLAVOUR": "source", "HOOK_KERNEL_SRC": url, "HOOK_KERNEL_SRC_SHA256": "1" * 64,
               "HOOK_CACHE_DIR": str(cache)}
        project = make_project(tmp_path / "hook", env=env)
        result = project.doit(f"image_load:hook-kernel-{_arch()}", check=False)
    finally:
        httpd.shutdown()
    assert result.returncode != 0
    assert "kernel_src_sha256 is 1111" in result.stderr and "nothing was kept" in result.stderr, result.output[-2000:]
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_source_flavour_settings_are_checked_up_front(tmp_path: Path, test_os: dict) -> None:
    project = make_project(tmp_path / "hook")
    cases = [
        ({"HOOK_KERNEL_FLAVOUR": "source"}, "kernel_flavour=source needs kernel_src="),
        ({"HOOK_KERNEL_FLAVOUR": "source", "HOOK_KERNEL_SRC": "https://cdn.kernel.org/linux-6.1.tar.xz"},
         "is a URL: give its sha256 too (kernel_src_sha256="),
        ({"HOOK_KERNEL_FLAVOUR": "nosuch"}, "setting kernel_flavour='nosuch' is not one of debian, source"),
    ]
    for env, message in cases:
        result = project.doit("list", check=False, extra_env=env)
        assert result.returncode != 0 and message in result.stderr, (env, result.output[-1000:])
