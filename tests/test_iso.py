"""Bootable media (tasks/media/iso.py, containers/hook-iso): the hybrid ISO, its patchable cmdline area,
and real QEMU (TCG) boots of it through firmware and GRUB, never with -kernel.

- The cmdline codec and the refusals of `python -m tasks.iso patch`, on small ISOs made from a
  busybox initramfs by the real tool image.
- Small-ISO boots: SeaBIOS and OVMF, each from a CD, a USB disk and a virtio disk, after a patch:
  /proc/cmdline is exactly what was patched in (GRUB's quoting included).
- The real Hook OS (`doit dev_dist` with the real LinuxKit, then `doit iso`): one BIOS CD boot with
  the ISO's built-in parameters, then patched: a UEFI CD boot and a BIOS raw USB-disk boot. Each
  reaches the running tink-worker, as tests/test_boot.py does with -kernel.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.boot import qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.images import tools
from tasks.images.bases import BaseResolver
from tasks.images.specs import read_record
from tasks.media import iso
from tasks.settings import load_settings
from tests.conftest import CACHE, ROOT, Registry
from tests.pipeline_env import CA_BUNDLE, Project, copy_out, make_project
from tests.test_boot import BOOT_TIMEOUT, GUEST_REGISTRY, MEMORY_MB, WORKER_ID, WORKER_IMAGE, report, tinkerbell_cmdline
from tests.test_qemu import make_initramfs

ARCH = Arch.native()
OVMF = Path("/usr/share/ovmf/OVMF.fd")
TEST_BASE = "local/python-base:amd64"  # a Debian bookworm with apt: the tool image's base in tests
EPOCH = 1700000000
SMALL_MARKER = "HOOK-ISO-TEST up"
SMALL_INIT = f"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "{SMALL_MARKER} cmdline=[$(/bin/busybox cat /proc/cmdline)]"
/bin/busybox poweroff -f
"""
#: What the firmware and GRUB show before the kernel's own milestones.
ISO_MILESTONES = (("UEFI firmware starts the boot loader", r"BdsDxe: starting"),
                  ("GRUB runs the Hook entry", r"Hook: loading the kernel"), *qemu.HOOK_MILESTONES)
#: A cmdline with what GRUB would otherwise change: a quoted value with a space, $, ;, #, *.
TRICKY = 'console=ttyS0 panic=-1 "registry_password=pa=ss w0rd" x=$y;#z glob=a*b worker_id=small-1'
GRUB_PREFIX = "BOOT_IMAGE=/boot/vmlinuz "


# --- the codec: no docker ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("cmdline", "area", "kernel_sees"), [
    ("console=ttyS0 worker_id=00:11:22:33:44:55", "console=ttyS0 worker_id=00:11:22:33:44:55",
     "console=ttyS0 worker_id=00:11:22:33:44:55"),
    ('"registry_password=pa=ss w0rd" a=1', '"registry_password=pa=ss w0rd" a=1', '"registry_password=pa=ss w0rd" a=1'),
    ('key="a b"', '"key=a b"', '"key=a b"'),
    ("x=$y;#z", "'x=$y;#z'", "x=$y;#z"),
    ('  spaced   words  ', "spaced words", "spaced words"),
    ('p="$HOME x"', "'p=$HOME x'", '"p=$HOME x"'),
    ('"" a ""', "a", "a"),
    ("", "", ""),
])
def test_encode_gives_grub_words_that_read_back(cmdline: str, area: str, kernel_sees: str) -> None:
    encoded = iso.encode(cmdline)
    assert len(encoded) == iso.AREA_SIZE
    assert encoded.rstrip(b" ").decode() == area
    assert iso.canonical(cmdline) == kernel_sees
    assert iso.decode(encoded) == kernel_sees


@pytest.mark.parametrize(("cmdline", "message"), [
    ("a=" + "x" * 1030, "the cmdline needs 1032 bytes in GRUB's syntax; the ISO's cmdline area holds 1024"),
    ('a="b c', "unbalanced double quote"),
    ('a=b"c d"e', 'the cmdline word \'a=b"c d"e\' has a double quote inside it: GRUB would hand it to the kernel'),
    ('"a"b', "has a double quote inside it"),
    ("name=o'brien", "holds ': GRUB would hand it to the kernel with a backslash added"),
    ("path=c:\\x", "holds \\: GRUB would hand it"),
    ("a=1\nb=2", "'\\n' at position 3: only printable ASCII"),
    ("a=1\tb=2", "'\\t' at position 3"),
    ("ü=1", "'ü' at position 0"),
])
def test_cmdlines_that_cannot_go_in_are_refused_in_one_line(cmdline: str, message: str) -> None:
    with pytest.raises(HookError) as caught:
        iso.encode(cmdline)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_area_fits_exactly_1024_bytes() -> None:
    assert iso.encode("a=" + "x" * 1022).endswith(b"x")
    with pytest.raises(HookError, match="needs 1025 bytes"):
        iso.encode("a=" + "x" * 1023)


def test_setting_iso_cmdline_is_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(HookError, match=r"^setting iso_cmdline: the cmdline has an unbalanced double quote"):
        load_settings(lambda n, d=None: d, {"HOOK_ISO_CMDLINE": 'worker_id="x', "HOOK_VERSION": "1",
                                            "SOURCE_DATE_EPOCH": "1"}, root=tmp_path)
    settings = load_settings(lambda n, d=None: d, {"HOOK_VERSION": "1", "SOURCE_DATE_EPOCH": "1"}, root=tmp_path)
    assert iso.expand(settings.iso_cmdline, Arch.AARCH64) == "console=tty0 console=ttyAMA0"


def test_grub_cfg_holds_the_area_once_between_its_markers() -> None:
    area = iso.encode("worker_id=1")
    cfg = iso.grub_cfg(Arch.X86_64, area)
    assert cfg.count(iso.MARKER_PREFIX) == 1
    assert cfg.index(iso.MARKER) + len(iso.MARKER) + iso.AREA_SIZE == cfg.index(iso.END)
    assert b"serial --unit=0" in cfg and b"serial" not in iso.grub_cfg(Arch.AARCH64, area)


# --- the tool image and small ISOs (docker) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_ref(tmp_path_factory: pytest.TempPathFactory, docker_engine: None) -> str:
    """The real tool image, built from containers/hook-iso on the test machine's Debian base."""
    folder = tmp_path_factory.mktemp("tools")
    settings = load_settings(lambda n, d=None: d, {"HOOK_ISO_BASE": TEST_BASE, "HOOK_BUILD_CA": CA_BUNDLE,
                                                   "HOOK_VERSION": "test", "SOURCE_DATE_EPOCH": str(EPOCH)})
    record = folder / "hook-iso.json"
    started = time.monotonic()
    tools.build(settings, iso.TOOLS, BaseResolver(folder / "bases.json"), versions=iso.TOOL_VERSIONS, record=record)
    data = read_record(record)
    assert data is not None
    print(f"\n[tool image] {data['ref']} ready in {time.monotonic() - started:.1f}s: {', '.join(data['versions'])}")
    return data["ref"]


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory, test_kernel: Path, busybox: Path) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("small")
    return test_kernel, make_initramfs(folder / "initramfs", busybox, SMALL_INIT)


def small_iso(tool_ref: str, files: tuple[Path, Path], target: Path, *, arch: Arch = ARCH,
              cmdline: str = "console=ttyS0 panic=-1 worker_id=small-0") -> Path:
    iso.make_iso_file(tool_ref=tool_ref, kernel=files[0], initrd=files[1], arch=arch, cmdline=cmdline,
                      target=target, source_date_epoch=EPOCH)
    return target


@pytest.fixture(scope="module")
def small_x86(tool_ref: str, small_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_iso(tool_ref, small_files, tmp_path_factory.mktemp("iso") / "hook-x86_64.iso", arch=Arch.X86_64)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def el_torito_platforms(data: bytes) -> list[int]:
    """The platform ids of the El Torito catalog's sections: 0 = BIOS (x86), 0xEF = UEFI."""
    record = data[17 * 2048:18 * 2048]
    assert record[1:6] == b"CD001" and record[7:30] == b"EL TORITO SPECIFICATION"
    catalog = struct.unpack_from("<I", record, 0x47)[0] * 2048
    platforms = [data[catalog + 1]]
    at = catalog + 64
    while data[at] in (0x90, 0x91):
        platforms.append(data[at + 1])
        count = struct.unpack_from("<H", data, at + 2)[0]
        if data[at] == 0x91:
            break
        at += 32 * (count + 1)
    return platforms


def esp(data: bytes) -> bytes:
    """The EFI system partition (MBR type 0xEF) of a hybrid ISO."""
    assert data[510:512] == b"\x55\xaa"
    for n in range(4):
        entry = data[446 + 16 * n:462 + 16 * n]
        if entry[4] == 0xEF:
            start, count = struct.unpack_from("<II", entry, 8)
            return data[start * 512:(start + count) * 512]
    raise AssertionError("no EFI system partition in the MBR")


@pytest.mark.slow
def test_x86_64_iso_layout(small_x86: Path) -> None:
    data = small_x86.read_bytes()
    assert el_torito_platforms(data) == [0x00, 0xEF]  # BIOS first, then UEFI
    assert data[:440].count(b"\0") < 400  # GRUB's hybrid MBR boot code
    part = esp(data)
    assert b"BOOTX64 EFI" in part and b"PE\0\0\x64\x86" in part  # /EFI/BOOT/BOOTX64.EFI, an x86-64 PE
    assert part.count(iso.MARKER_PREFIX) == 0 and data.count(iso.MARKER_PREFIX) == 1
    area = iso.locate(small_x86)
    # marker, area and end marker sit in one 2048-byte sector (a server patching ranges sees them whole)
    first, last = area.offset - len(iso.MARKER), area.offset + area.size + len(iso.END) - 1
    assert first // 2048 == last // 2048
    assert area.cmdline == "console=ttyS0 panic=-1 worker_id=small-0"


@pytest.mark.slow
def test_aarch64_iso_is_uefi_only(tool_ref: str, small_files: tuple[Path, Path], tmp_path: Path) -> None:
    """The structure of the aarch64 ISO (booted below, with an arm64 kernel and busybox)."""
    made = small_iso(tool_ref, small_files, tmp_path / "hook-aarch64.iso", arch=Arch.AARCH64,
                     cmdline="console=ttyAMA0 worker_id=arm-1")
    data = made.read_bytes()
    assert el_torito_platforms(data) == [0xEF]
    part = esp(data)
    assert b"BOOTAA64EFI" in part and b"PE\0\0\x64\xaa" in part  # /EFI/BOOT/BOOTAA64.EFI, an arm64 PE
    assert iso.locate(made).cmdline == "console=ttyAMA0 worker_id=arm-1"
    iso.patch(made, "console=ttyAMA0 worker_id=arm-2")
    assert iso.locate(made).cmdline == "console=ttyAMA0 worker_id=arm-2"


@pytest.mark.slow
def test_same_inputs_same_bytes(tool_ref: str, small_files: tuple[Path, Path], small_x86: Path,
                                tmp_path: Path) -> None:
    time.sleep(2.1)  # FAT and ISO 9660 dates have a 2 s and 1 s resolution: a clock-dated field would differ
    again = small_iso(tool_ref, small_files, tmp_path / "again.iso", arch=Arch.X86_64)
    assert sha256(again) == sha256(small_x86)


# --- patch: what it changes, what it refuses -----------------------------------------------------------------


def run_patch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.iso", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_patch_changes_the_area_and_nothing_else(small_x86: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.iso"
    shutil.copy(small_x86, copy)
    done = run_patch("patch", str(copy), "--cmdline", TRICKY)
    assert done.returncode == 0, done.stderr
    area = iso.locate(copy)
    assert done.stdout.strip().endswith(f": {iso.canonical(TRICKY)}")
    assert run_patch("show", str(copy)).stdout.strip() == iso.canonical(TRICKY)
    assert run_patch("show", "--raw", str(copy)).stdout.strip() == iso.encode(TRICKY).decode().rstrip()
    before, after = small_x86.read_bytes(), copy.read_bytes()
    assert len(before) == len(after)
    assert before[:area.offset] == after[:area.offset]
    assert before[area.offset + area.size:] == after[area.offset + area.size:]


def foreign_iso(tool_ref: str, target: Path, *, grub_cfg: str | None) -> Path:
    """An ISO from elsewhere: GRUB's own grub-mkrescue (with a grub.cfg of its own), or a plain data ISO."""
    make = ("mkdir -p /t/boot/grub && printf '%s\\n' \"$CFG\" >/t/boot/grub/grub.cfg && "
            "grub-mkrescue -o /o.iso /t >/dev/null 2>&1 && cat /o.iso") if grub_cfg is not None else \
        "mkdir -p /t/data && echo hi >/t/data/file && xorriso -as mkisofs -o /o.iso -r /t >/dev/null 2>&1 && cat /o.iso"
    with target.open("wb") as out:
        subprocess.run(["docker", "run", "--rm", "--network", "none", "-e", f"CFG={grub_cfg or ''}", "--entrypoint",
                        "sh", tool_ref, "-c", make], stdout=out, check=True)
    return target


@pytest.mark.slow
def test_patch_refusals_leave_every_file_unchanged(tool_ref: str, small_x86: Path, test_kernel: Path,
                                                   tmp_path: Path) -> None:
    ours = tmp_path / "ours.iso"
    shutil.copy(small_x86, ours)
    doubled = tmp_path / "doubled.iso"  # ours, with a second marker in it (e.g. an embedded copy)
    shutil.copy(small_x86, doubled)
    with doubled.open("ab") as handle:
        handle.write(iso.MARKER + iso.encode("worker_id=x") + iso.END)
    not_iso = tmp_path / "vmlinuz"
    shutil.copy(test_kernel, not_iso)
    cases = [
        (ours, "a=" + "x" * 1100, "hook: the cmdline needs 1102 bytes in GRUB's syntax; the ISO's cmdline area "
                                  "holds 1024: shorten it"),
        (not_iso, "worker_id=1", f"hook: {not_iso} is not an ISO 9660 image (no primary volume descriptor at byte "
                                 "32768): nothing was changed"),
        (foreign_iso(tool_ref, tmp_path / "rescue.iso", grub_cfg="linux /boot/vmlinuz console=ttyS0"), "worker_id=1",
         "its /boot/grub/grub.cfg has no hook cmdline area"),
        (foreign_iso(tool_ref, tmp_path / "data.iso", grub_cfg=None), "worker_id=1",
         "is an ISO 9660 image, but not one that `doit iso` made: it has no /boot/grub/grub.cfg; nothing was changed"),
        (doubled, "worker_id=1", "holds 2 hook cmdline areas, not one"),
        (ours, "name=o'brien", "GRUB would hand it to the kernel with a backslash added"),
    ]
    for path, cmdline, message in cases:
        before = sha256(path)
        done = run_patch("patch", str(path), "--cmdline", cmdline)
        print(f"[refused] {path.name}: {done.stderr.strip()}")
        assert done.returncode == 1
        assert message in done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("hook: ")
        assert done.stdout == ""
        assert sha256(path) == before, f"{path.name} changed"


# --- small-ISO boots: every firmware and medium, /proc/cmdline exactly as patched ---------------------------


def media(kind: str, image: Path) -> list[str]:
    """QEMU arguments that attach the ISO as a CD, a USB disk or a virtio disk (writes go to a snapshot)."""
    if kind == "cdrom":
        return ["-cdrom", str(image)]
    if kind == "usb":
        return ["-device", "qemu-xhci", "-drive", f"if=none,id=stick,format=raw,snapshot=on,file={image}",
                "-device", "usb-storage,drive=stick"]
    return ["-drive", f"if=virtio,format=raw,snapshot=on,file={image}"]


def iso_guest(image: Path, log: Path, *, firmware: str, medium: str, memory_mb: int,
              nics: list[qemu.Nic] | None = None) -> qemu.Guest:
    """A firmware boot of the ISO (no -kernel): SeaBIOS (QEMU's default) or OVMF, on q35 (AHCI CD)."""
    if firmware == "uefi" and not OVMF.is_file():
        pytest.fail(f"no OVMF at {OVMF}: run hack/setup-test-machine.sh (Debian's ovmf package)")
    extra = ["-M", "q35", *(["-bios", str(OVMF)] if firmware == "uefi" else []), *media(medium, image),
             "-device", "virtio-rng-pci"]
    return qemu.Guest(None, None, arch=ARCH, memory_mb=memory_mb, accel="tcg", smp=2, nics=nics, extra=extra,
                      log=log, milestone_patterns=ISO_MILESTONES)


@pytest.fixture(scope="module")
def small_patched(small_x86: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("patched") / "hook-x86_64.iso"
    shutil.copy(small_x86, copy)
    iso.patch(copy, TRICKY)
    return copy


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="the x86_64 ISO boots on an x86_64 host")
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
@pytest.mark.parametrize("medium", ["cdrom", "usb", "virtio"])
def test_small_patched_iso_boots(small_patched: Path, firmware: str, medium: str, tmp_path: Path) -> None:
    with iso_guest(small_patched, tmp_path / "console.log", firmware=firmware, medium=medium, memory_mb=512) as g:
        found = g.wait_for(re.compile(rf"{SMALL_MARKER} cmdline=\[(.*)\]"), timeout=180)
        report(g, f"small ISO, {firmware}, {medium}")
        assert g.wait_exit(60) == 0
    assert found.group(1) == GRUB_PREFIX + iso.canonical(TRICKY)


# --- aarch64: the UEFI ISO under qemu-system-aarch64 (TCG) and AAVMF, a Debian arm64 kernel and busybox ---

AAVMF = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")
ARM64_CACHE = CACHE / "arm64"
ARM_TRICKY = TRICKY.replace("ttyS0", "ttyAMA0")


@pytest.fixture(scope="session")
def arm64_boot_parts(docker_engine: None) -> tuple[Path, Path]:
    """(Debian's arm64 kernel, Debian's static arm64 busybox), cached in $HOOK_TEST_CACHE/arm64.

    Fetched once with apt-get download in a Debian container (the test base) and unpacked with
    dpkg-deb here: no arm64 code runs on the host.
    """
    kernel, busybox_arm64 = ARM64_CACHE / "vmlinuz", ARM64_CACHE / "busybox"
    if kernel.is_file() and busybox_arm64.is_file():
        return kernel, busybox_arm64
    shutil.rmtree(ARM64_CACHE.with_suffix(".tmp"), ignore_errors=True)
    debs = ARM64_CACHE.with_suffix(".tmp")
    debs.mkdir(parents=True)
    fetch = ("set -e; dpkg --add-architecture arm64; apt-get update -qq; cd /out; "
             "k=$(apt-cache depends linux-image-arm64:arm64 | awk '/Depends: linux-image-/{print $2; exit}'); "
             "apt-get download -qq \"$k\" busybox-static:arm64; chmod a+r *.deb")
    subprocess.run(["docker", "run", "--rm", "-v", f"{debs}:/out", TEST_BASE, "sh", "-c", fetch], check=True,
                   capture_output=True)
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(debs / "root")], check=True)
    shutil.copy(next((debs / "root" / "boot").glob("vmlinuz-*")), debs / "vmlinuz")
    shutil.copy(debs / "root" / "bin" / "busybox", debs / "busybox")
    ARM64_CACHE.mkdir(parents=True, exist_ok=True)
    for name in ("busybox", "vmlinuz"):
        (debs / name).replace(ARM64_CACHE / name)
    shutil.rmtree(debs, ignore_errors=True)
    return kernel, busybox_arm64


@pytest.fixture(scope="module")
def arm64_iso(tool_ref: str, arm64_boot_parts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("arm64")
    initrd = make_initramfs(folder / "initramfs", arm64_boot_parts[1], SMALL_INIT)
    made = small_iso(tool_ref, (arm64_boot_parts[0], initrd), folder / "hook-aarch64.iso", arch=Arch.AARCH64,
                     cmdline="console=ttyAMA0 worker_id=arm-0")
    iso.patch(made, ARM_TRICKY)
    return made



@pytest.mark.slow
@pytest.mark.parametrize("medium", ["cdrom", "disk"])
def test_aarch64_patched_iso_boots_uefi(arm64_iso: Path, medium: str, tmp_path: Path) -> None:
    for tool, package in (("qemu-system-aarch64", "qemu-system-arm"), (str(AAVMF), "qemu-efi-aarch64")):
        if not shutil.which(tool) and not Path(tool).is_file():
            pytest.fail(f"{tool} missing: run hack/setup-test-machine.sh (Debian's {package})")
    attach = (["-drive", f"if=none,id=cd,format=raw,readonly=on,media=cdrom,file={arm64_iso}",
               "-device", "virtio-scsi-pci", "-device", "scsi-cd,drive=cd"] if medium == "cdrom"
              else ["-drive", f"if=virtio,format=raw,snapshot=on,file={arm64_iso}"])
    with qemu.Guest(None, None, arch=Arch.AARCH64, memory_mb=1024, accel="tcg", smp=2,
                    extra=["-bios", str(AAVMF), *attach], log=tmp_path / "console.log",
                    milestone_patterns=ISO_MILESTONES) as g:
        found = g.wait_for(re.compile(rf"{SMALL_MARKER} cmdline=\[(.*)\]"), timeout=300)
        report(g, f"aarch64 ISO, AAVMF, {medium}")
        assert g.wait_exit(60) == 0
    assert found.group(1) == GRUB_PREFIX + iso.canonical(ARM_TRICKY)


# --- the real Hook OS on the ISO --------------------------------------------------------------------------


ISO_WORKER = "hook-iso-machine-1"
PATCHED_WORKER = "hook-iso-machine-2"


def worker_cmdline(worker_id: str, extra: str = "") -> str:
    return tinkerbell_cmdline(extra=extra).replace(f"worker_id={WORKER_ID} ", f"worker_id={worker_id} ")


def marker(worker_id: str) -> str:
    return f"TINK-WORKER-RUNNING worker_id={worker_id}"


@pytest.fixture(scope="module")
def iso_project(dev_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the built dev project, with `doit iso` run once (built-in cmdline: worker ISO_WORKER)."""
    project = make_project(tmp_path_factory.mktemp("iso") / "hook", env={
        "HOOK_ISO_BASE": TEST_BASE, "HOOK_ISO_CMDLINE": worker_cmdline(ISO_WORKER)})
    copy_out(dev_project, project)
    started = time.monotonic()
    first = project.doit("iso")
    print(f"\n[doit iso] {time.monotonic() - started:.1f}s, ran {first.executed}")
    assert first.executed == ["iso_tools", f"iso:{ARCH}"] or first.executed == [f"iso:{ARCH}"], first.output[-3000:]
    return project


@pytest.fixture(scope="module")
def built_iso(iso_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ISO `doit iso` made, copied before any test changes the project."""
    copy = tmp_path_factory.mktemp("built") / f"hook-{ARCH}.iso"
    shutil.copy(iso_project.out(f"dist/dev/hook-{ARCH}.iso"), copy)
    return copy


@pytest.mark.slow
def test_doit_iso_outputs_incremental_and_reproducible(iso_project: Project, built_iso: Path) -> None:
    dist = iso_project.out("dist/dev")
    assert f"  hook-{ARCH}.iso\n" in (dist / "checksum.txt").read_text()
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    assert iso.locate(built_iso).cmdline == iso.canonical(worker_cmdline(ISO_WORKER))

    noop = iso_project.doit("iso")
    assert noop.executed == [], noop.output[-2000:]
    print(f"[doit iso] no-op {noop.seconds:.2f}s")

    iso_project.doit("forget", f"iso:{ARCH}")
    time.sleep(2.1)
    again = iso_project.doit("iso")
    assert again.executed == [f"iso:{ARCH}"]
    assert sha256(iso_project.out(f"dist/dev/hook-{ARCH}.iso")) == sha256(built_iso), "not reproducible"
    print(f"[doit iso] the same ISO again, byte for byte, in {again.seconds:.1f}s")

    changed = iso_project.doit("iso", "iso_cmdline=console=ttyS0 worker_id=other")
    assert changed.executed == [f"iso:{ARCH}"]  # a boot setting: the ISO only, no image, linuxkit or package step
    assert iso.locate(iso_project.out(f"dist/dev/hook-{ARCH}.iso")).cmdline == "console=ttyS0 worker_id=other"
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)

    iso_project.doit("clean", f"iso:{ARCH}")
    assert not iso_project.out(f"dist/dev/hook-{ARCH}.iso").exists()
    assert f"hook-{ARCH}.iso" not in (dist / "checksum.txt").read_text()


def wait_for_worker(g: qemu.Guest, worker_id: str, name: str) -> str:
    g.wait_for(marker(worker_id), timeout=BOOT_TIMEOUT)
    report(g, name)
    shown = g.sh("cat /proc/cmdline", timeout=120).output.replace("\r", "").strip()
    print(f"[{name}] /proc/cmdline: {shown}")
    return shown


def registry_nic(registry: Registry) -> list[qemu.Nic]:
    return [qemu.Nic(forwards=(qemu.Forward(5000, registry.port),))]


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="the x86_64 ISO boots on an x86_64 host")
def test_iso_boots_bios_cdrom_with_its_built_in_parameters(built_iso: Path, worker_registry: Registry,
                                                           tmp_path: Path) -> None:
    with iso_guest(built_iso, tmp_path / "console.log", firmware="bios", medium="cdrom", memory_mb=MEMORY_MB,
                   nics=registry_nic(worker_registry)) as g:
        shown = wait_for_worker(g, ISO_WORKER, "ISO, SeaBIOS, CD")
    assert shown == GRUB_PREFIX + iso.canonical(worker_cmdline(ISO_WORKER))
    assert f"tink_worker_image={WORKER_IMAGE}" in shown and f"docker_registry={GUEST_REGISTRY}" in shown


@pytest.fixture(scope="module")
def patched_iso(built_iso: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The built ISO patched in place for another machine, as a provisioning server would."""
    copy = tmp_path_factory.mktemp("patched-os") / f"hook-{ARCH}.iso"
    shutil.copy(built_iso, copy)
    cmdline = worker_cmdline(PATCHED_WORKER, extra="syslog_host=10.0.2.100 hook_iso_test=patched")
    started = time.monotonic()
    done = run_patch("patch", str(copy), "--cmdline", cmdline)
    assert done.returncode == 0, done.stderr
    print(f"\n[patch] {time.monotonic() - started:.2f}s: {done.stdout.strip()}")
    return copy, cmdline


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="the x86_64 ISO boots on an x86_64 host")
@pytest.mark.parametrize(("firmware", "medium", "label"), [
    ("uefi", "cdrom", "patched ISO, OVMF, CD"),
    ("bios", "usb", "patched ISO, SeaBIOS, raw USB disk"),
], ids=["uefi-cdrom", "bios-raw-usb-disk"])
def test_patched_iso_boots(patched_iso: tuple[Path, str], worker_registry: Registry, tmp_path: Path,
                           firmware: str, medium: str, label: str) -> None:
    image, cmdline = patched_iso
    with iso_guest(image, tmp_path / "console.log", firmware=firmware, medium=medium, memory_mb=MEMORY_MB,
                   nics=registry_nic(worker_registry)) as g:
        shown = wait_for_worker(g, PATCHED_WORKER, label)
    assert shown == GRUB_PREFIX + iso.canonical(cmdline)
    assert "hook_iso_test=patched" in shown and ISO_WORKER not in shown
