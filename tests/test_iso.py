"""Bootable media (tasks/media/iso.py, containers/hook-iso): the hybrid ISO, its patchable cmdline area,
and real QEMU (TCG) boots of it through firmware and GRUB, never with -kernel.

- The cmdline codec and the refusals of `python -m tasks.iso patch`, on small ISOs made from a
  busybox initramfs by the real tool image.
- Small-ISO boots: SeaBIOS and OVMF, each from a CD, a USB disk and a virtio disk, after a patch:
  /proc/cmdline is exactly what was patched in (GRUB's quoting included).
- Smee's region: Tinkerbell's magic string once, at the start of a sector of the one grub.cfg;
  the ISO served through Smee's algorithm (tests/smee.py, written from SMEE.md) gives the kernel
  Smee's parameters, a patch longer than the placeholder included; iso_smee=false and
  `patch --drop-smee` give an ISO without it, which Smee passes through unchanged.
- The real Hook OS (`doit dev_dist` with the real LinuxKit, then `doit iso`): served by Smee
  (its consoles, ttyS1 last; its worker_id) on a BIOS CD and, after `tasks.iso patch`, on a UEFI
  CD; not served by Smee (the placeholder unpatched), on a BIOS raw USB disk. Each reaches the running tink-worker, as
  tests/test_boot.py does with -kernel.
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

from tasks.boot import netboot, qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.images import tools
from tasks.images.bases import BaseResolver
from tasks.images.specs import read_record
from tasks.media import iso
from tasks.settings import load_settings
from tests import smee
from tests.conftest import CACHE, REGISTRY_PASSWORD, ROOT, Registry
from tests.pipeline_env import CA_BUNDLE, Project, copy_out, make_project
from tests.test_boot import (
    AGENT_IMAGE,
    BOOT_TIMEOUT,
    GUEST_REGISTRY,
    MEMORY_MB,
    SMP,
    WORKER_ID,
    WORKER_IMAGE,
    report,
    tinkerbell_cmdline,
)
from tests.test_qemu import make_initramfs

ARCH = Arch.native()
AARCH64_SMP = 2  # the generic timer: no TSC to drift
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
#: What the kernel sees after the cmdline area of an ISO that Smee did not patch.
PLACEHOLDER = " " + smee.MAGIC.decode()


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
    # {consoles}: Smee gives them to an ISO with its placeholder; without it, the screen and the serial port
    assert iso.expand(settings.iso_cmdline, Arch.AARCH64) == ""
    assert iso.expand(settings.iso_cmdline, Arch.AARCH64, smee=False) == "console=tty0 console=ttyAMA0"
    assert iso.expand("{consoles} worker_id=1", Arch.X86_64, smee=False) == "console=tty0 console=ttyS0 worker_id=1"


def test_grub_cfg_holds_the_area_once_between_its_markers() -> None:
    area = iso.encode("worker_id=1")
    for arch in Arch:
        cfg = iso.grub_cfg(arch, area)
        assert cfg.count(iso.MARKER_PREFIX) == 1
        start = cfg.index(iso.MARKER) + len(iso.MARKER)
        assert cfg[start:start + iso.AREA_SIZE] == area
        # one space, then Smee's region: the magic string starting a sector, 1024 spaces of room after it
        assert cfg[start + iso.AREA_SIZE:start + iso.AREA_SIZE + 1] == b" "
        assert cfg.count(smee.MAGIC) == 1 and cfg.index(smee.MAGIC) == start + iso.AREA_SIZE + 1
        assert cfg.index(smee.MAGIC) % 2048 == 0
        assert cfg.index(iso.END) == cfg.index(smee.MAGIC) + 2048
        plain = iso.grub_cfg(arch, area, smee=False)
        assert smee.MAGIC not in plain and len(plain) == len(cfg)
    assert b"serial --unit=0" in iso.grub_cfg(Arch.X86_64, area) and b"serial" not in iso.grub_cfg(Arch.AARCH64, area)


def test_the_placeholder_is_tinkerbells() -> None:
    """The very bytes of Smee's isoMagicString (and of upstream Hook's template cmdline)."""
    assert iso.SMEE_MAGIC == smee.MAGIC
    assert len(smee.MAGIC) == 1024 and re.fullmatch(rb"[a-z0-9]+", smee.MAGIC)


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
              cmdline: str = "console=ttyS0 panic=-1 worker_id=small-0", smee: bool = True) -> Path:
    iso.make_iso_file(tool_ref=tool_ref, kernel=files[0], initrd=files[1], arch=arch, cmdline=cmdline,
                      target=target, source_date_epoch=EPOCH, smee=smee)
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
    # the Secure Boot chain: shim signed by Microsoft's UEFI CA, Debian's signed GRUB CD image and
    # MokManager beside it, no fallback (shim would run fbx64.efi instead of GRUB)
    assert b"GRUBX64 EFI" in part and b"MMX64   EFI" in part and b"FBX64" not in part
    assert b"Microsoft Corporation UEFI CA 2011" in part and b"Debian Secure Boot Signer 2022 - grub2" in part
    assert b"Hook x86_64 hook-" in data  # /.disk/info: how Debian's signed GRUB finds the volume from a disk
    assert part.count(iso.MARKER_PREFIX) == 0 and data.count(iso.MARKER_PREFIX) == 1
    area = iso.locate(small_x86)
    assert area.cmdline == "console=ttyS0 panic=-1 worker_id=small-0"
    # Smee's magic string: once in the whole ISO (the EFI image holds no copy), starting a sector,
    # so that no 32 KiB read of Smee's cuts it; right after the cmdline area
    assert part.count(smee.MAGIC) == 0 and data.count(smee.MAGIC) == 1
    at = data.index(smee.MAGIC)
    assert at % 2048 == 0 and at // smee.READ_SIZE == (at + 1023) // smee.READ_SIZE
    assert at == area.offset + area.size + 1 and area.placeholder


@pytest.mark.slow
def test_aarch64_iso_is_uefi_only(tool_ref: str, small_files: tuple[Path, Path], tmp_path: Path) -> None:
    """The structure of the aarch64 ISO (booted below, with an arm64 kernel and busybox)."""
    made = small_iso(tool_ref, small_files, tmp_path / "hook-aarch64.iso", arch=Arch.AARCH64,
                     cmdline="console=ttyAMA0 worker_id=arm-1")
    data = made.read_bytes()
    assert el_torito_platforms(data) == [0xEF]
    part = esp(data)
    assert b"BOOTAA64EFI" in part and b"PE\0\0\x64\xaa" in part  # /EFI/BOOT/BOOTAA64.EFI, an arm64 PE
    assert b"GRUBAA64EFI" in part and b"Microsoft Corporation UEFI CA 2011" in part  # shimaa64, gcdaa64
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
    shown = f"{iso.canonical(TRICKY)} <Smee's placeholder: patched as Smee serves the ISO>"
    assert done.stdout.strip().endswith(f": {shown}")
    assert run_patch("show", str(copy)).stdout.strip() == shown
    assert run_patch("show", "--raw", str(copy)).stdout.strip() == iso.encode(TRICKY).decode().rstrip()
    before, after = small_x86.read_bytes(), copy.read_bytes()
    assert len(before) == len(after)
    assert before[:area.offset] == after[:area.offset]
    assert before[area.offset + area.size:] == after[area.offset + area.size:]  # Smee's placeholder stays

    # --drop-smee: the placeholder becomes spaces; Smee then passes the ISO through unchanged
    done = run_patch("patch", str(copy), "--cmdline", TRICKY, "--drop-smee")
    assert done.returncode == 0, done.stderr
    assert run_patch("show", str(copy)).stdout.strip() == iso.canonical(TRICKY)
    after = copy.read_bytes()
    assert smee.MAGIC not in after and len(after) == len(before)
    assert before[area.offset + area.size + 1 + 2048:] == after[area.offset + area.size + 1 + 2048:]
    served = smee.patched_copy(copy, tmp_path / "served.iso", "worker_id=never")
    assert sha256(served) == sha256(copy)

    # a Smee-patched ISO is still ours: show says Smee's part, patch rewrites the area and keeps it
    patched = smee.patched_copy(small_x86, tmp_path / "smee.iso", "worker_id=from-smee")
    assert run_patch("show", str(patched)).stdout.strip() == "console=ttyS0 panic=-1 worker_id=small-0 " \
                                                              "worker_id=from-smee"
    assert run_patch("patch", str(patched), "--cmdline", "console=ttyS0").returncode == 0
    assert run_patch("show", str(patched)).stdout.strip() == "console=ttyS0 worker_id=from-smee"


@pytest.mark.slow
def test_iso_smee_false_has_no_placeholder(tool_ref: str, small_files: tuple[Path, Path], small_x86: Path,
                                           tmp_path: Path) -> None:
    """iso_smee=false: the ISO of before, with no magic string; its size and layout otherwise the same."""
    plain = small_iso(tool_ref, small_files, tmp_path / "plain.iso", arch=Arch.X86_64, smee=False)
    data = plain.read_bytes()
    assert smee.MAGIC not in data and len(data) == small_x86.stat().st_size
    area = iso.locate(plain)
    assert area.cmdline == "console=ttyS0 panic=-1 worker_id=small-0" and not area.placeholder
    assert run_patch("show", str(plain)).stdout.strip() == area.cmdline
    assert sha256(smee.patched_copy(plain, tmp_path / "served.iso", "worker_id=x")) == sha256(plain)


@pytest.mark.slow
def test_a_version_1_area_is_still_read_and_patched(small_x86: Path, tmp_path: Path) -> None:
    """ISOs of the previous layout (the 1024-byte area alone): show and patch keep working on them."""
    old = tmp_path / "v1.iso"
    shutil.copy(small_x86, old)
    area = iso.locate(old)
    start = area.offset - len(iso.MARKER)
    end = area.offset + area.size + 1 + 2048 + len(iso.END)
    block = iso.MARKER_V1 + iso.encode("console=ttyS0 worker_id=old") + iso.END
    block += b"#" + b"-" * (end - start - len(block) - 2) + b"\n"  # a GRUB comment keeps the file's size
    with old.open("r+b") as handle:
        handle.seek(start)
        handle.write(block)
    assert iso.locate(old).version == 1
    assert run_patch("show", str(old)).stdout.strip() == "console=ttyS0 worker_id=old"
    done = run_patch("patch", str(old), "--cmdline", "console=ttyS0 worker_id=new")
    assert done.returncode == 0, done.stderr
    assert iso.locate(old).cmdline == "console=ttyS0 worker_id=new"
    refused = run_patch("patch", str(old), "--cmdline", "x=1", "--drop-smee")
    assert refused.returncode == 1 and "no Smee region to drop" in refused.stderr


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
              nics: list[qemu.Nic] | None = None, serial1: Path | None = None) -> qemu.Guest:
    """A firmware boot of the ISO (no -kernel): SeaBIOS (QEMU's default) or OVMF, on q35 (AHCI CD).
    serial1: a second serial port (ttyS1, a BMC's serial-over-LAN) to that file."""
    if firmware == "uefi" and not OVMF.is_file():
        pytest.fail(f"no OVMF at {OVMF}: run hack/setup-test-machine.sh (Debian's ovmf package)")
    extra = ["-M", "q35", *(["-bios", str(OVMF)] if firmware == "uefi" else []), *media(medium, image),
             "-device", "virtio-rng-pci"]
    return qemu.Guest(None, None, arch=ARCH, memory_mb=memory_mb, accel="tcg", smp=SMP, nics=nics, extra=extra,
                      log=log, milestone_patterns=ISO_MILESTONES, serial1=serial1)


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
    assert found.group(1) == GRUB_PREFIX + iso.canonical(TRICKY) + PLACEHOLDER


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="the x86_64 ISO boots on an x86_64 host")
def test_a_smee_patch_longer_than_the_placeholder_reaches_the_kernel(small_x86: Path, tmp_path: Path) -> None:
    """Smee writes a patch longer than its 1024-byte string over what follows: our region has the room,
    so the kernel gets all of it and GRUB still reads the rest of grub.cfg (the initrd line)."""
    extra = " ".join(f"hook_test_{n}={'v' * 40}" for n in range(20))
    patch = smee.patch_text(mac="52:54:00:aa:bb:07", syslog_host="10.0.2.2", grpc_authority="10.0.2.2:42113",
                            vlan_id="", extra=extra)
    patch = patch.replace(smee.DEFAULT_CONSOLES, "console=ttyS0")  # the small init says it on ttyS0
    assert 1024 < len(patch) <= 2048
    served = smee.patched_copy(small_x86, tmp_path / "served.iso", patch)
    with iso_guest(served, tmp_path / "console.log", firmware="bios", medium="cdrom", memory_mb=512) as g:
        found = g.wait_for(re.compile(rf"{SMALL_MARKER} cmdline=\[(.*)\]"), timeout=180)
        assert g.wait_exit(60) == 0
    assert found.group(1) == GRUB_PREFIX + "console=ttyS0 panic=-1 worker_id=small-0 " + patch


# --- Secure Boot: OVMF with Microsoft's keys enrolled, the chain enforced ---------------------------------


def strip_signature(kernel: Path, target: Path) -> Path:
    """A copy of a signed kernel without its Authenticode signature (the PE certificate table)."""
    data = bytearray(kernel.read_bytes())
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    optional = pe + 24
    entry = optional + (112 if struct.unpack_from("<H", data, optional)[0] == 0x20B else 96) + 4 * 8
    offset, size = struct.unpack_from("<II", data, entry)
    assert size and offset + size == len(data), "the signature is not at the end of the kernel"
    struct.pack_into("<II", data, entry, 0, 0)
    target.write_bytes(bytes(data[:offset]))
    return target


def sb_guest(image: Path, folder: Path, *, secure_boot: bool, memory_mb: int = 512,
             nics: list[qemu.Nic] | None = None, serial1: Path | None = None,
             variables: Path | None = None) -> qemu.Guest:
    """A UEFI boot of the ISO from a CD under OVMF's 4 MB build: with Secure Boot on (Microsoft's keys
    enrolled, SMM; or the variables given), or off."""
    extra = [*netboot.firmware_args(uefi=True, vars_copy=folder / "vars.fd", secure_boot=secure_boot,
                                    variables=variables),
             "-cdrom", str(image), "-device", "virtio-rng-pci"]
    return qemu.Guest(None, None, arch=ARCH, memory_mb=memory_mb, accel="tcg", smp=SMP, nics=nics, extra=extra,
                      log=folder / "console.log", milestone_patterns=ISO_MILESTONES, serial1=serial1)


@pytest.fixture(scope="module")
def unsigned_kernel(small_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    kernel = strip_signature(small_files[0], tmp_path_factory.mktemp("unsigned-kernel") / "vmlinuz")
    assert iso.kernel_signers(kernel) is None and iso.kernel_signers(small_files[0])
    return kernel


@pytest.fixture(scope="module")
def unsigned_iso(tool_ref: str, small_files: tuple[Path, Path], unsigned_kernel: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unsigned")
    return small_iso(tool_ref, (unsigned_kernel, small_files[1]), folder / "unsigned.iso", arch=Arch.X86_64)


@pytest.mark.slow
def test_an_unsigned_kernel_still_makes_an_iso_and_the_log_says_so(tool_ref: str, small_files: tuple[Path, Path],
                                                                    unsigned_kernel: Path, tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """A kernel that is not signed (the source flavour, a user's kernel=): the ISO is made, and the
    build log says it boots with Secure Boot off only and how to sign it; a signed one names its signer."""
    target = small_iso(tool_ref, (unsigned_kernel, small_files[1]), tmp_path / "unsigned.iso", arch=Arch.X86_64)
    log = capfd.readouterr().err
    assert target.is_file() and target.stat().st_size > 0
    assert ("hook: warning: unsigned.iso: the kernel is not signed: this ISO boots with Secure Boot off only (sign it "
            "with iso_sign_key and iso_sign_cert") in log, log[-2000:]
    signed = iso.secure_boot_line(small_files[0], "hook-x86_64.iso")
    assert signed.startswith("hook-x86_64.iso: Secure Boot: shim -> Debian's signed GRUB -> the kernel, signed by "
                             "Debian Secure Boot"), signed


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="OVMF's Secure Boot build is x86_64")
@pytest.mark.parametrize(("kernel", "secure_boot"), [("signed", True), ("unsigned", True), ("unsigned", False)])
def test_secure_boot_enforces_the_chain(small_x86: Path, unsigned_iso: Path, kernel: str, secure_boot: bool,
                                        tmp_path: Path) -> None:
    """shim (Microsoft's signature) -> Debian's GRUB -> Debian's signed kernel boots with Secure Boot
    on, and the kernel says so; the same ISO with the kernel's signature removed is refused by the
    chain with Secure Boot on (GRUB: shim's verification failed) and boots with it off."""
    image = small_x86 if kernel == "signed" else unsigned_iso
    small_uefi_boot(image, tmp_path, secure_boot=secure_boot, refused=kernel == "unsigned" and secure_boot,
                    name=f"small ISO, OVMF {'Secure Boot' if secure_boot else 'no Secure Boot'}, {kernel} kernel")


def small_uefi_boot(image: Path, folder: Path, *, secure_boot: bool, refused: bool, name: str,
                    variables: Path | None = None) -> None:
    """Boot a small ISO under OVMF: refused, GRUB says shim's verification failed and no kernel
    starts; else the small init runs, and the kernel says whether Secure Boot is on (and locks down)."""
    with sb_guest(image, folder, secure_boot=secure_boot, variables=variables) as g:
        if refused:
            error = g.wait_for(re.compile(r"error: (bad shim signature|[^\r\n]*verification failed)[^\r\n]*"),
                               timeout=300)
            print(f"\n[{name}] GRUB says: {error.group(0)}")
            time.sleep(5)
            assert "Linux version" not in g.console and SMALL_MARKER not in g.console
            return
        g.wait_for(re.compile(rf"{SMALL_MARKER} cmdline="), timeout=300)
        report(g, name)
        assert g.wait_exit(60) == 0
    if secure_boot:
        assert "secureboot: Secure boot enabled" in g.console
        assert "Kernel is locked down from EFI Secure Boot" in g.console
    else:
        assert "Secure boot enabled" not in g.console


# --- iso_sign_key: the ISO's copy of the kernel signed with the user's own key ---------------------------

SIGN_CN = "hook test ISO signing key"
#: The owner GUID of our entry in db or MokList (any GUID: it records who added the entry).
CERT_OWNER = "6b6f6f68-7465-7374-8000-6b65792d6869"


@pytest.fixture(scope="module")
def sign_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A key and self-signed certificate, made as docs/iso.md tells users to."""
    folder = tmp_path_factory.mktemp("sign")
    key, cert = folder / "hook.key", folder / "hook.crt"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("no openssl: apt-get install openssl (hack/setup-test-machine.sh)")
    subprocess.run([openssl, "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
                    "-subj", f"/CN={SIGN_CN}/", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


def kernel_in_iso(data: bytes, kernel: Path) -> bytes:
    """The ISO's copy of a kernel whose first bytes may differ (a signature changes the PE header):
    found by the bytes after its header; its end from the PE certificate table."""
    original = kernel.read_bytes()
    at = data.find(original[4096:8192])
    assert at >= 4096, "the kernel is not in the ISO"
    start = at - 4096
    head = data[start:start + 4096]
    pe = struct.unpack_from("<I", head, 0x3C)[0]
    optional = pe + 24
    entry = optional + (112 if struct.unpack_from("<H", head, optional)[0] == 0x20B else 96) + 4 * 8
    offset, size = struct.unpack_from("<II", head, entry)
    return data[start:start + (offset + size if size else len(original))]


def signed_vars(folder: Path, cert: Path, where: str) -> Path:
    """OVMF's Secure Boot variables (Microsoft's keys) with our certificate in db or in shim's MokList,
    as the firmware setup, a BMC or `mokutil --import` would leave them (virt-fw-vars)."""
    tool = Path(sys.executable).with_name("virt-fw-vars")
    if not tool.is_file():
        pytest.fail(f"no {tool}: pip install -e '.[test]' (virt-firmware)")
    target = folder / f"vars-{where}.fd"
    subprocess.run([str(tool), "--input", str(netboot.OVMF_SB_VARS), "--output", str(target),
                    f"--add-{where}", CERT_OWNER, str(cert)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def signed_iso(tool_ref: str, small_files: tuple[Path, Path], unsigned_kernel: Path, sign_pair: tuple[Path, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("signed") / "signed.iso"
    iso.make_iso_file(tool_ref=tool_ref, kernel=unsigned_kernel, initrd=small_files[1], arch=Arch.X86_64,
                      cmdline="console=ttyS0 panic=-1 worker_id=small-signed", target=target,
                      source_date_epoch=EPOCH, sign=sign_pair)
    return target


@pytest.mark.slow
def test_iso_sign_key_signs_the_isos_kernel(tool_ref: str, small_files: tuple[Path, Path], unsigned_kernel: Path,
                                            sign_pair: tuple[Path, Path], signed_iso: Path, tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    """The ISO's kernel carries a signature by the user's key, the same inputs give the same bytes,
    the key is nowhere in the ISO or the build log, which names the certificate to enrol; Debian's
    signed kernel keeps Debian's signature and gets ours beside it; a key that is not the
    certificate's is a one-line error and leaves no ISO."""
    key, cert = sign_pair
    data = signed_iso.read_bytes()
    assert iso.kernel_signers(unsigned_kernel) is None
    copy = tmp_path / "vmlinuz"
    copy.write_bytes(kernel_in_iso(data, unsigned_kernel))
    assert iso.kernel_signers(copy) == [SIGN_CN]

    again = tmp_path / "again.iso"
    capfd.readouterr()
    iso.make_iso_file(tool_ref=tool_ref, kernel=unsigned_kernel, initrd=small_files[1], arch=Arch.X86_64,
                      cmdline="console=ttyS0 panic=-1 worker_id=small-signed", target=again,
                      source_date_epoch=EPOCH, sign=sign_pair)
    log = "".join(capfd.readouterr())
    assert again.read_bytes() == data  # reproducible, signature included
    body = "".join(line for line in key.read_text().splitlines() if "-----" not in line)
    for chunk in (body[i:i + 40] for i in range(0, len(body) - 40, 40)):
        assert chunk.encode() not in data and chunk not in log
    assert re.search(rf"signed by {SIGN_CN} \(iso_sign_cert: the machines must trust '{SIGN_CN}', enrolled as a "
                     r"MOK or in db", log), log[-2000:]
    assert "signed the kernel with iso_sign_key: 1 signature(s)" in log, log[-2000:]

    both = tmp_path / "both.iso"
    iso.make_iso_file(tool_ref=tool_ref, kernel=small_files[0], initrd=small_files[1], arch=Arch.X86_64,
                      cmdline="console=ttyS0", target=both, source_date_epoch=EPOCH, sign=sign_pair)
    copy.write_bytes(kernel_in_iso(both.read_bytes(), small_files[0]))
    debian = iso.kernel_signers(small_files[0]) or []
    assert debian and iso.kernel_signers(copy) == [*debian, SIGN_CN]

    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(other)],
                   check=True, capture_output=True)
    wrong = tmp_path / "wrong.iso"
    with pytest.raises(HookError) as err:
        iso.make_iso_file(tool_ref=tool_ref, kernel=unsigned_kernel, initrd=small_files[1], arch=Arch.X86_64,
                          cmdline="console=ttyS0", target=wrong, source_date_epoch=EPOCH, sign=(other, cert))
    message = str(err.value)
    print(f"\n[iso_sign_key, the wrong key] {message}")
    assert "sbsign could not sign the kernel with iso_sign_key and iso_sign_cert" in message
    assert "is the key the certificate's" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.iso", "both.iso", "other.key", "vmlinuz"]


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="OVMF's Secure Boot build is x86_64")
@pytest.mark.parametrize("enrolled", ["db", "mok", "nowhere"])
def test_a_kernel_signed_with_our_key_boots_where_its_certificate_is_enrolled(
        signed_iso: Path, sign_pair: tuple[Path, Path], enrolled: str, tmp_path: Path) -> None:
    """A kernel that only our key signed (iso_sign_key), Secure Boot on: shim starts it when the
    certificate is in the firmware's db or in shim's MOK list, and refuses it otherwise."""
    variables = None if enrolled == "nowhere" else signed_vars(tmp_path, sign_pair[1], enrolled)
    small_uefi_boot(signed_iso, tmp_path, secure_boot=True, variables=variables, refused=enrolled == "nowhere",
                    name=f"small ISO signed with our key, Secure Boot, certificate in {enrolled}")


# --- aarch64: the UEFI ISO under qemu-system-aarch64 (TCG) and AAVMF, a Debian arm64 kernel and busybox ---

AAVMF = qemu.AAVMF
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
    with qemu.Guest(None, None, arch=Arch.AARCH64, memory_mb=1024, accel="tcg", smp=AARCH64_SMP,
                    extra=[*qemu.aarch64_firmware(), *attach], log=tmp_path / "console.log",
                    milestone_patterns=ISO_MILESTONES) as g:
        found = g.wait_for(re.compile(rf"{SMALL_MARKER} cmdline=\[(.*)\]"), timeout=300)
        report(g, f"aarch64 ISO, AAVMF, {medium}")
        assert g.wait_exit(60) == 0
    assert found.group(1) == GRUB_PREFIX + iso.canonical(ARM_TRICKY) + PLACEHOLDER


# --- the real Hook OS on the ISO --------------------------------------------------------------------------


ISO_WORKER = "hook-iso-machine-1"
PATCHED_WORKER = "hook-iso-machine-2"


def worker_cmdline(worker_id: str, extra: str = "", *, consoles: bool = True) -> str:
    """tinkerbell_cmdline for another worker; without consoles: what an ISO that Smee serves holds."""
    text = tinkerbell_cmdline(extra=extra).replace(f"worker_id={WORKER_ID} ", f"worker_id={worker_id} ")
    return text if consoles else text.replace("console=tty0 console=ttyS0 ", "")


#: the built-in iso_cmdline of the ISO the tests build: what Smee does not give (the registry...),
#: and a worker_id that Smee's must override
ISO_CMDLINE = worker_cmdline(ISO_WORKER, consoles=False)


def marker(worker_id: str) -> str:
    return f"TINK-WORKER-RUNNING worker_id={worker_id}"


@pytest.fixture(scope="module")
def iso_project(dev_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the built dev project, with `doit iso` run once (built-in cmdline: worker ISO_WORKER)."""
    project = make_project(tmp_path_factory.mktemp("iso") / "hook", env={
        "HOOK_ISO_BASE": TEST_BASE, "HOOK_ISO_CMDLINE": ISO_CMDLINE})
    copy_out(dev_project, project)
    started = time.monotonic()
    first = project.doit("iso")
    project.built = first
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
def test_doit_iso_outputs_incremental_and_reproducible(iso_project: Project, built_iso: Path,
                                                       sign_pair: tuple[Path, Path]) -> None:
    dist = iso_project.out("dist/dev")
    assert f"  hook-{ARCH}.iso\n" in (dist / "checksum.txt").read_text()
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    assert iso.locate(built_iso).cmdline == iso.canonical(ISO_CMDLINE)
    assert iso_project.built is not None and "warning" not in iso_project.built.output
    assert REGISTRY_PASSWORD in ISO_CMDLINE and REGISTRY_PASSWORD not in iso_project.built.output  # logged masked

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
    assert "warning: iso_cmdline names console=ttyS0: served by Smee, the kernel's serial console is that one " \
           "whatever Smee gives" in changed.output
    assert iso.locate(iso_project.out(f"dist/dev/hook-{ARCH}.iso")).cmdline == "console=ttyS0 worker_id=other"
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)

    keys = ("iso_cmdline=console=ttyS0 worker_id=other", f"iso_sign_key={sign_pair[0]}",
            f"iso_sign_cert={sign_pair[1]}")
    signed = iso_project.doit("iso", *keys)
    assert signed.executed == [f"iso:{ARCH}"]  # the ISO only
    assert "Secure Boot: shim -> Debian's signed GRUB -> the kernel, signed by Debian Secure Boot CA" in signed.output
    assert f"{SIGN_CN} (iso_sign_cert: the machines must trust '{SIGN_CN}'" in signed.output, signed.output[-2000:]
    assert iso_project.doit("iso", *keys).executed == []
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)

    iso_project.doit("clean", f"iso:{ARCH}")
    assert not iso_project.out(f"dist/dev/hook-{ARCH}.iso").exists()
    assert f"hook-{ARCH}.iso" not in (dist / "checksum.txt").read_text()


def cmdline_of(g: qemu.Guest) -> str:
    """The guest's /proc/cmdline. The console is shared: the stand-in's own lines may come between
    those of the command; the command line is the line GRUB's BOOT_IMAGE= starts."""
    output = g.sh("cat /proc/cmdline", timeout=120).output.replace("\r", "")
    lines = [line.strip() for line in output.splitlines() if line.startswith("BOOT_IMAGE=")]
    return lines[-1] if lines else output.strip()


def wait_for_worker(g: qemu.Guest, worker_id: str, name: str) -> str:
    g.wait_for(marker(worker_id), timeout=BOOT_TIMEOUT)
    report(g, name)
    shown = cmdline_of(g)
    print(f"[{name}] /proc/cmdline: {shown}")
    return shown


def registry_nic(registry: Registry) -> list[qemu.Nic]:
    return [qemu.Nic(forwards=(qemu.Forward(5000, registry.port),))]


SMEE_MACS = {"bios": "52:54:00:5e:e0:01", "uefi": "52:54:00:5e:e0:02"}


def smee_patch(mac: str, extra: str = "", image: str = WORKER_IMAGE) -> str:
    """What Smee writes for one machine: its default consoles, its parameters, the chart's extra args
    (tink_worker_image: tink-worker, or tink-agent as the chart now runs it)."""
    return smee.patch_text(mac=mac, syslog_host=qemu.GUEST_SERVICE_IP, grpc_authority=f"{qemu.GUEST_SERVICE_IP}:42113",
                           extra=f"tink_worker_image={image} {extra}".strip())


def smee_nic(registry: Registry, mac: str) -> list[qemu.Nic]:
    return [qemu.Nic(forwards=(qemu.Forward(5000, registry.port),), mac=mac)]


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="the x86_64 ISO boots on an x86_64 host")
def test_iso_served_by_smee_boots_bios_cdrom(built_iso: Path, worker_registry: Registry, tmp_path: Path) -> None:
    """The ISO `doit iso` made, as Smee serves it to one machine: the built-in parameters (the
    registry), then Smee's; its worker_id (the MAC) wins over the built-in one. Smee's default
    consoles name ttyS0 before ttyS1 (last): Linux's serial console is the first ttyS named, so the
    kernel, the services and tink-worker are on ttyS0; ttyS1 gets a getty."""
    mac = SMEE_MACS["bios"]
    served = smee.patched_copy(built_iso, tmp_path / "served.iso", smee_patch(mac))
    with iso_guest(served, tmp_path / "console.log", firmware="bios", medium="cdrom", memory_mb=MEMORY_MB,
                   nics=smee_nic(worker_registry, mac), serial1=tmp_path / "ttyS1.log") as g:
        shown = wait_for_worker(g, mac, "ISO served by Smee, SeaBIOS, CD")
    assert shown == GRUB_PREFIX + iso.canonical(ISO_CMDLINE) + " " + smee_patch(mac)
    assert "Linux version" in g.console and "Welcome to LinuxKit" in g.second_serial
    assert f"docker_registry={GUEST_REGISTRY}" in shown and shown.endswith(f"tink_worker_image={WORKER_IMAGE}")


def patched_copy(built_iso: Path, target: Path, cmdline: str) -> Path:
    """The built ISO patched in place for another machine (`python -m tasks.iso patch`)."""
    shutil.copy(built_iso, target)
    started = time.monotonic()
    done = run_patch("patch", str(target), "--cmdline", cmdline)
    assert done.returncode == 0, done.stderr
    print(f"\n[patch] {time.monotonic() - started:.2f}s: {done.stdout.strip()}")
    return target


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="the x86_64 ISO boots on an x86_64 host")
def test_patched_iso_served_by_smee_runs_tink_agent_secure_boot(built_iso: Path, worker_registry: Registry,
                                                                tmp_path: Path) -> None:
    """`tasks.iso patch` keeps Smee's placeholder: the patched ISO, served by Smee with the chart's
    `tink_worker_image=<tink-agent>`, from a CD under OVMF with Secure Boot on (Microsoft's keys):
    shim, Debian's GRUB and Debian's kernel, in lockdown. bootkit starts the agent as it starts
    tink-worker, and the stand-in finds its whole contract met (AGENT.md: the legacy variables, the
    docker socket, /dev, the host's /run with udev's database, the host network)."""
    cmdline = worker_cmdline(PATCHED_WORKER, extra="hook_iso_test=patched", consoles=False)
    image = patched_copy(built_iso, tmp_path / "patched.iso", cmdline)
    mac = SMEE_MACS["uefi"]
    patch = smee_patch(mac, "hook_iso_test=smee", image=AGENT_IMAGE)
    served = smee.patched_copy(image, tmp_path / "served.iso", patch)
    with sb_guest(served, tmp_path, secure_boot=True, memory_mb=MEMORY_MB, nics=smee_nic(worker_registry, mac),
                  serial1=tmp_path / "ttyS1.log") as g:
        verdict = g.wait_for(re.compile(r"TINK-AGENT-CONTRACT (MET|BROKEN)[^\r\n]*"), timeout=BOOT_TIMEOUT)
        report(g, "patched ISO served by Smee, tink-agent, OVMF Secure Boot, CD")
        checks = sorted(set(re.findall(r"TINK-AGENT-CHECK \S+ [^\r\n]*", g.console)))
        print("\n".join(checks))
        shown = cmdline_of(g)
        policy = g.sh("cat /sys/module/module/parameters/sig_enforce; "
                      "grep -h . /sys/kernel/security/lockdown 2>/dev/null || "
                      "{ mount -t securityfs securityfs /sys/kernel/security && cat /sys/kernel/security/lockdown; }",
                      timeout=120).output
    print(f"[Secure Boot] module sig_enforce and lockdown: {policy.split()}")
    assert "secureboot: Secure boot enabled" in g.console
    assert "Kernel is locked down from EFI Secure Boot" in g.console
    assert re.search(r"(?m)^Y\s*$", policy) and "[integrity]" in policy  # unsigned modules refused
    assert verdict.group(1) == "MET", "\n".join(checks)
    assert verdict.group(0).endswith(f"worker_id={mac}")  # Smee's worker_id, shown on the console
    for name in ("env", "docker", "dev", "udev", "host-network", "hardware"):
        assert any(c.startswith(f"TINK-AGENT-CHECK ok {name}:") for c in checks), name
    assert not any(REGISTRY_PASSWORD in line for line in checks)  # checked, never shown
    assert shown == GRUB_PREFIX + iso.canonical(cmdline) + " " + patch
    assert ISO_WORKER not in shown


@pytest.mark.slow
@pytest.mark.skipif(ARCH is not Arch.X86_64, reason="the x86_64 ISO boots on an x86_64 host")
def test_patched_iso_not_served_by_smee_boots_bios_raw_usb_disk(built_iso: Path, worker_registry: Registry,
                                                                tmp_path: Path) -> None:
    """The ISO patched for a machine and written to a USB stick, never served by Smee: its consoles
    in the area; its placeholder reaches the kernel unpatched (one unknown word, as with upstream
    Hook's ISO) and the OS boots all the same."""
    cmdline = worker_cmdline(PATCHED_WORKER, extra="syslog_host=10.0.2.100 hook_iso_test=patched")
    image = patched_copy(built_iso, tmp_path / "patched.iso", cmdline)
    with iso_guest(image, tmp_path / "console.log", firmware="bios", medium="usb", memory_mb=MEMORY_MB,
                   nics=registry_nic(worker_registry)) as g:
        shown = wait_for_worker(g, PATCHED_WORKER, "patched ISO, SeaBIOS, raw USB disk")
    assert shown == GRUB_PREFIX + iso.canonical(cmdline) + PLACEHOLDER
    assert "hook_iso_test=patched" in shown and ISO_WORKER not in shown
