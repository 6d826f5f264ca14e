"""Bootable media: a hybrid ISO (BIOS and UEFI) of a build's kernel and initramfs, with a kernel
command line that can be rewritten in place after the build.

- `doit iso` (dev), `doit dist_iso` (release), `doit debug_iso`: out/dist/<build>/<name>-<arch>.iso
  and its sha512 in checksum.txt. The ISO tools (GRUB, xorriso, mtools) run in the `hook-iso`
  image, built from containers/hook-iso/ on a Debian base (setting iso_base); only Docker is needed.
- The command line sits in a fixed-size area of /boot/grub/grub.cfg, the one file BIOS and UEFI
  GRUB both read. `python -m tasks.iso patch ISO --cmdline '...'` rewrites it in place;
  `python -m tasks.iso show ISO` prints it. Layout, marker and encoding: docs/iso.md.

The area (v2), as bytes in the ISO:

    b"# hook-cmdline-area v2 size=1024 smee=2048\\nlinux /boot/vmlinuz "   MARKER: where it starts
    1024 bytes      the command line (iso_cmdline), in GRUB's word syntax (encode()), space-padded
    b" "
    2048 bytes      Smee's region: Tinkerbell's 1024-byte magic string (SMEE_MAGIC) and 1024 spaces,
                    or (iso_smee=false) 2048 spaces. Smee patches the magic string as it serves the
                    ISO: spaces over it, then the machine's parameters (a longer patch runs into the
                    spaces after it, never into what follows); the magic string starts a 2048-byte
                    sector (grub.cfg's head is padded for it), so no 32 KiB read of Smee's cuts it
    b"\\n# hook-cmdline-area end\\n"                                         END: right after it

MARKER occurs exactly once in the whole ISO, inside the data of /boot/grub/grub.cfg (ISO 9660
files are stored contiguously, so an in-place rewrite changes what GRUB reads and nothing else).
GRUB joins the words of the `linux` line with one space: the padding costs the kernel nothing.
ISOs of the v1 layout (the 1024-byte area alone) are read and patched too.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import io
import mmap
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.run import find_tool, log_step, mask, timed
from tasks.images import tools
from tasks.images.specs import ImageSpec
from tasks.media.package import clean_output, output_is_current, record_output, sha512
from tasks.settings.builds import boot_files
from tasks.settings.cmdline import (
    AREA_SIZE,
    canonical,
    cmdline_secrets,
    decode,
    encode,
    expand,
    kernel_words,
    serial_consoles,
)

if TYPE_CHECKING:
    from tasks.settings import Settings
    from tasks.settings.builds import Build

__all__ = ["AREA_SIZE", "canonical", "decode", "encode", "expand", "kernel_words"]  # the area's grammar, read here too

AREA_VERSION = 2
MARKER = b"# hook-cmdline-area v2 size=1024 smee=2048\nlinux /boot/vmlinuz "
MARKER_V1 = b"# hook-cmdline-area v1 size=1024\nlinux /boot/vmlinuz "
END = b"\n# hook-cmdline-area end\n"
#: Smee's region after the cmdline area: the placeholder, then room for a patch longer than it.
SMEE_SIZE = 2048
#: Tinkerbell's ISO placeholder (Smee's isoMagicString, Hook's template cmdline): 1024 bytes of [a-z0-9].
SMEE_MAGIC = (
    b"464vn90e7rbj08xbwdjejmdf4it17c5zfzjyfhthbh19eij201hjgit021bmpdb9ctrc87x2ymc8e7icu4ffi15x1hah9iya"
    b"iz38ckyap8hwx2vt5rm44ixv4hau8iw718q5yd019um5dt2xpqqa2rjtdypzr5v1gun8un110hhwp8cex7pqrh2ivh0ynpm4"
    b"zkkwc8wcn367zyethzy7q8hzudyeyzx3cgmxqbkh825gcak7kxzjbgjajwizryv7ec1xm2h0hh7pz29qmvtgfjj1vphpgq1z"
    b"cbiiehv52wrjy9yq473d9t1rvryy6929nk435hfx55du3ih05kn5tju3vijreru1p6knc988d4gfdz28eragvryq5x8aibe5"
    b"trxd0t6t7jwxkde34v6pj1khmp50k6qqj3nzgcfzabtgqkmeqhdedbvwf3byfdma4nkv3rcxugaj2d0ru30pa2fqadjqrtjn"
    b"v8bu52xzxv7irbhyvygygxu1nt5z4fh9w1vwbdcmagep26d298zknykf2e88kumt59ab7nq79d8amnhhvbexgh48e8qc61vq"
    b"2e9qkihzt1twk1ijfgw70nwizai15iqyted2dt9gfmf2gg7amzufre79hwqkddc1cd935ywacnkrnak6r7xzcz7zbmq3kt04"
    b"u2hg1iuupid8rt4nyrju51e6uejb2ruu36g9aibmz3hnmvazptu8x5tyxk820g2cdpxjdij766bt2n3djur7v623a2v44juy"
    b"fgz80ekgfb9hkibpxh3zgknw8a34t4jifhf116x15cei9hwch0fye3xyq0acuym8uhitu5evc4rag3ui0fny3qg4kju7zkfy"
    b"y8hwh537urd5uixkzwu5bdvafz4jmv7imypj543xg5em8jk8cgk7c4504xdd5e4e71ihaumt6u5u2t1w7um92fepzae8p0vq"
    b"93wdrd1756npu1pziiur1payc7kmdwyxg3hj5n4phxbc29x0tcddamjrwt260b0w"
)

#: What every version of the marker starts with: a file with two of these is refused.
MARKER_PREFIX = b"# hook-cmdline-area v"
_MARKER_LINE = re.compile(rb"# hook-cmdline-area v(\d+) size=(\d+)(?: smee=(\d+))?\n")
VOLUME_ID = "HOOK"
GRUB_CFG = ("boot", "grub", "grub.cfg")
TOOL_IMAGE = "hook-iso"
SECTOR = 2048

# --- the boot configuration ------------------------------------------------------------------------


def smee_region(smee: bool) -> bytes:
    """What follows the cmdline area: Smee's placeholder and its room, or only spaces."""
    return (SMEE_MAGIC if smee else b"").ljust(SMEE_SIZE, b" ")


def grub_cfg(arch: Arch, area: bytes, *, smee: bool = True) -> bytes:
    """/boot/grub/grub.cfg: the one configuration BIOS and UEFI GRUB read, with the cmdline area
    and Smee's region; its head is padded so that Smee's magic string starts a 2048-byte sector."""
    if len(area) != AREA_SIZE:
        raise HookError(f"internal: the cmdline area must be {AREA_SIZE} bytes, not {len(area)}")
    serial = (
        'if [ "$grub_platform" = pc ]; then\n'
        "\tif serial --unit=0 --speed=115200; then\n"
        "\t\tterminal_input console serial\n"
        "\t\tterminal_output console serial\n"
        "\tfi\n"
        "fi\n"
    ) if arch is Arch.X86_64 else ""
    head = (
        "# Hook: the boot configuration of this ISO, read by GRUB on BIOS and on UEFI alike.\n"
        "# The kernel command line is the fixed-size area after the `linux /boot/vmlinuz ` below, then\n"
        "# Tinkerbell's placeholder that Smee patches as it serves the ISO; rewrite the area in place\n"
        "# (python -m tasks.iso patch ISO --cmdline ...; layout: hook's docs/iso.md).\n"
        "set timeout=0\n"
        "set default=hook\n"
        f"{serial}"
        f'menuentry "Hook ({arch})" --id hook {{\n'
        f'\techo "Hook: loading the kernel and the initramfs ({arch})"\n'
    ).encode()
    before_magic = len(head) + len(MARKER) + AREA_SIZE + 1
    pad = -(before_magic + 2) % SECTOR  # a comment line of pad + 2 bytes: "#" ... "\n"
    head = head[:head.index(b"set timeout")] + b"#" + b"-" * pad + b"\n" + head[head.index(b"set timeout"):]
    tail = b"\tinitrd /boot/initramfs\n}\n"
    if (len(head) + len(MARKER) + AREA_SIZE + 1) % SECTOR:
        raise HookError("internal: Smee's region does not start a sector of grub.cfg")
    return head + MARKER + area + b" " + smee_region(smee) + END + tail


# --- finding and rewriting the area in an ISO -----------------------------------------------------------


@dataclass(frozen=True)
class Area:
    """The cmdline area of one ISO: where it is and what it holds now; and Smee's region after it."""

    path: Path
    offset: int
    size: int
    content: bytes
    version: int = AREA_VERSION
    #: Smee's region (v2): the placeholder, Smee's patch of it, or spaces; b"" for v1
    smee: bytes = b""

    @property
    def cmdline(self) -> str:
        return decode(self.content)

    @property
    def placeholder(self) -> bool:
        """Smee's magic string is there, unpatched."""
        return self.smee.startswith(SMEE_MAGIC)

    @property
    def smee_cmdline(self) -> str:
        """What Smee's region gives the kernel: its patch (the machine's parameters), or ""."""
        return "" if self.placeholder else decode(self.smee)

    def describe(self) -> str:
        """The whole command line the ISO gives the kernel, Smee's part said as such."""
        if self.version == 1 or not self.smee.strip():
            return self.cmdline
        smee = "<Smee's placeholder: patched as Smee serves the ISO>" if self.placeholder else self.smee_cmdline
        return f"{self.cmdline} {smee}".strip()


def _u32(data: bytes, at: int) -> int:
    return struct.unpack_from("<I", data, at)[0]


def _record_name(record: bytes) -> str:
    """A directory record's name: its Rock Ridge NM name when it has one, else the ISO 9660 name."""
    length = record[32]
    raw = record[33:33 + length]
    use = 33 + length + (1 - length % 2)
    rr_name = b""
    while use + 4 <= len(record):
        sig, entry_len = record[use:use + 2], record[use + 2]
        if entry_len < 4:
            break
        if sig == b"NM":
            rr_name += record[use + 5:use + entry_len]
        use += entry_len
    if rr_name:
        return rr_name.decode("latin-1")
    return raw.decode("latin-1").split(";", 1)[0].rstrip(".").lower()


def _entries(handle: BinaryIO, lba: int, size: int) -> Iterator[tuple[str, int, int, bool]]:
    """(name, extent lba, size, is_dir) of one directory's records."""
    handle.seek(lba * SECTOR)
    data = handle.read(size)
    pos = 0
    while pos < len(data):
        length = data[pos]
        if length == 0:  # records never cross a sector: the rest of this one is padding
            pos = (pos // SECTOR + 1) * SECTOR
            continue
        record = data[pos:pos + length]
        pos += length
        if len(record) < 34 or record[32] == 1 and record[33] in (0, 1):  # "." and ".."
            continue
        yield _record_name(record), _u32(record, 2), _u32(record, 10), bool(record[25] & 2)


def _find_file(handle: BinaryIO, pvd: bytes, path: Sequence[str]) -> tuple[int, int] | None:
    """(byte offset, size) of a file in the ISO 9660 tree, or None."""
    root = pvd[156:190]
    lba, size, is_dir = _u32(root, 2), _u32(root, 10), True
    for depth, part in enumerate(path):
        if not is_dir:
            return None
        for name, entry_lba, entry_size, entry_dir in _entries(handle, lba, size):
            if name.lower() == part.lower():
                lba, size, is_dir = entry_lba, entry_size, entry_dir
                break
        else:
            return None
        if depth == len(path) - 1 and is_dir:
            return None
    return lba * SECTOR, size


def _count(data: mmap.mmap, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


def locate(path: Path) -> Area:
    """Find the cmdline area of a Hook ISO and check the whole file is what `patch` expects.

    Raises HookError (one line) for a file that is not an ISO 9660 image, an ISO without exactly one
    area in its /boot/grub/grub.cfg, or an area that is damaged. Reads only.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise HookError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        handle.seek(16 * SECTOR)
        pvd = handle.read(SECTOR)
        if len(pvd) < SECTOR or pvd[0:6] != b"\x01CD001":
            raise HookError(f"{path} is not an ISO 9660 image (no primary volume descriptor at byte {16 * SECTOR}): "
                            "nothing was changed")
        if struct.unpack_from("<H", pvd, 128)[0] != SECTOR:
            raise HookError(f"{path} is an ISO 9660 image with a block size other than {SECTOR}: not one that "
                            "`doit iso` made; nothing was changed")
        where = _find_file(handle, pvd, GRUB_CFG)
        if where is None:
            raise HookError(f"{path} is an ISO 9660 image, but not one that `doit iso` made: it has no "
                            "/boot/grub/grub.cfg; nothing was changed")
        start, size = where
        handle.seek(start)
        cfg = handle.read(size)
        if cfg.count(MARKER_PREFIX) == 0:
            raise HookError(f"{path} is an ISO 9660 image, but not one that `doit iso` made: its /boot/grub/grub.cfg "
                            f"has no hook cmdline area (marker {MARKER_PREFIX.decode()!r}); nothing was changed")
        line = _MARKER_LINE.search(cfg)
        version = int(line.group(1)) if line else 0
        if line is None or version not in (1, AREA_VERSION):
            raise HookError(f"{path} has a cmdline area of version {line.group(1).decode() if line else '?'}; this "
                            f"hook reads versions 1 and {AREA_VERSION}: use the hook that made the ISO; nothing was "
                            "changed")
        marker = MARKER if version == AREA_VERSION else MARKER_V1
        at = cfg.find(marker)
        if at < 0:
            raise HookError(f"{path}: its cmdline area is not laid out as version {version} says "
                            f"({marker!r} expected); nothing was changed")
        area_size = int(line.group(2))
        smee_size = int(line.group(3) or 0) if version == AREA_VERSION else 0
        content = cfg[at + len(marker):at + len(marker) + area_size]
        smee_at = at + len(marker) + area_size + (1 if smee_size else 0)
        smee = cfg[smee_at:smee_at + smee_size]
        if cfg[smee_at + smee_size:smee_at + smee_size + len(END)] != END:
            raise HookError(f"{path}: its cmdline area is damaged (no end marker after {area_size} bytes); "
                            "nothing was changed")
        if any(not 0x20 <= b <= 0x7E for b in content + smee):
            raise HookError(f"{path}: its cmdline area holds bytes other than printable ASCII; nothing was changed")
        handle.seek(0)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = _count(data, MARKER_PREFIX)
        offset = start + at + len(marker)
        if found != [start + at]:
            raise HookError(f"{path} holds {len(found)} hook cmdline areas, not one (in /boot/grub/grub.cfg): "
                            "not an ISO that `doit iso` made; nothing was changed")
    return Area(path, offset, area_size, content, version, smee)


def smee_placeholders(path: Path) -> list[int]:
    """Where Smee's magic string is in a file (byte offsets)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _count(data, SMEE_MAGIC)


def check_smee_placeholder(path: Path) -> int:
    """Smee patches the first match of each 32 KiB read of the ISO: the magic string must be there
    once, and start a 2048-byte sector (an ISO's sectors never straddle those reads). Its offset."""
    found = smee_placeholders(path)
    if len(found) != 1 or found[0] % SECTOR:
        raise HookError(f"{path}: Smee's placeholder is at bytes {found or 'nowhere'}, not once at the start of a "
                        f"{SECTOR}-byte sector: Smee would not patch it; report this as a bug")
    return found[0]


def patch(path: Path, cmdline: str, *, drop_smee: bool = False) -> Area:
    """Rewrite the cmdline area of a Hook ISO in place; Smee's region after it stays as it is (Smee
    can still patch the placeholder), or with drop_smee becomes spaces (an ISO no Smee serves).
    Everything is checked first (the file, the area, the cmdline); a refusal leaves the file as it was."""
    area = locate(path)
    data = encode(cmdline, area.size)
    if drop_smee and area.version == 1:
        raise HookError(f"{path} has a version 1 area, with no Smee region to drop: leave out --drop-smee")
    with open(area.path, "r+b") as handle:
        handle.seek(area.offset)
        handle.write(data)
        if drop_smee:
            handle.seek(area.offset + area.size + 1)
            handle.write(smee_region(False))
        handle.flush()
        os.fsync(handle.fileno())
    done = locate(path)
    if done.content != data or (drop_smee and done.smee != smee_region(False)):
        raise HookError(f"{path}: the cmdline area does not read back as written; write the ISO again")
    return done


# --- the tool image (containers/hook-iso) ------------------------------------------------------------

#: The ISO tools image. Not one of the OS's images (images.specs.os_images): the OS does not depend on it.
TOOLS = ImageSpec(TOOL_IMAGE, (("BASE_IMAGE", "iso_base"),), folders=(TOOL_IMAGE,), extra_args=False)
#: What the tools image lists of its packages (its record keeps it).
TOOL_VERSIONS = "/usr/share/hook-iso/versions"


# --- making the ISO --------------------------------------------------------------------------------


def iso_path(settings: Settings, build: Build, arch: Arch) -> Path:
    return settings.out / "dist" / build.name / f"{build.prefix}-{arch}.iso"


def iso_record(settings: Settings, build: Build, arch: Arch) -> Path:
    """What mkiso made (sha512, size, mtime): the cheap up-to-date check, and checksum.txt's line."""
    return settings.out / "iso" / build.name / arch.value / f"{build.prefix}-{arch}.iso.json"


def iso_config(settings: Settings, arch: Arch) -> dict[str, Any]:
    """The settings an ISO is made from (doit's config_changed); its files are the task's file_dep."""
    return {"cmdline": expand(settings.iso_cmdline, arch, smee=settings.iso_smee),
            "source_date_epoch": settings.source_date_epoch, "volume_id": VOLUME_ID,
            "area": [AREA_VERSION, AREA_SIZE, SMEE_SIZE], "smee": settings.iso_smee,
            "signed": settings.iso_sign is not None}


def sign_files(settings: Settings) -> list[Path]:
    """The key and certificate the ISOs' kernel is signed with (file_dep of the ISO tasks), if any."""
    return list(settings.iso_sign or ())


def _stamp(kernel: Path, initrd: Path, arch: Arch) -> str:
    """The file GRUB finds its own volume by: unique to these boot files."""
    digest = hashlib.sha256(arch.value.encode())
    for path in (kernel, initrd):
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return f"hook-{digest.hexdigest()[:20]}.id"


# --- Secure Boot: is the kernel signed? ----------------------------------------------------------------

_CN = b"\x06\x03\x55\x04\x03"  # the DER of the OID commonName (2.5.4.3)


def kernel_signers(kernel: Path) -> list[str] | None:
    """The common names in a kernel's Authenticode signature (the PE certificate table): [] for a
    signature without one, None for a kernel that is not signed (or not a PE file, no EFI stub).
    Shim, under Secure Boot, starts a kernel signed by Debian's key (its built-in CA), by a key in
    the firmware's db, or by a MOK; this reads which names signed it, it does not verify."""
    with open(kernel, "rb") as handle:
        head = handle.read(4096)
        if head[:2] != b"MZ" or len(head) < 0x40:
            return None
        pe = struct.unpack_from("<I", head, 0x3C)[0]
        if pe + 24 + 2 > len(head) or head[pe:pe + 4] != b"PE\0\0":
            return None
        optional = pe + 24
        directories = optional + (112 if struct.unpack_from("<H", head, optional)[0] == 0x20B else 96)
        offset, size = struct.unpack_from("<II", head, directories + 4 * 8)  # entry 4: certificates
        if not size:
            return None
        handle.seek(offset)
        table = handle.read(size)
    return _common_names(table)


def _common_names(der: bytes) -> list[str]:
    """The commonName values in DER data (a PE certificate table, a certificate), in order, once each."""
    names: list[str] = []
    at = der.find(_CN)
    while at >= 0 and at + 7 <= len(der):
        length = der[at + 6]
        value = der[at + 7:at + 7 + length]
        if der[at + 5] in (0x0C, 0x13) and length < 0x80:  # UTF8String, PrintableString
            name = value.decode("utf-8", "replace")
            if name not in names:
                names.append(name)
        at = der.find(_CN, at + 1)
    return names


def certificate_names(cert: Path) -> list[str]:
    """The common names (subject, issuer) of a PEM certificate: the first one's, for the build log."""
    text = cert.read_text(encoding="ascii", errors="replace")
    found = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    try:
        return _common_names(base64.b64decode("".join(found.group(1).split()))) if found else []
    except ValueError:
        return []


def secure_boot_line(kernel: Path, name: str, sign_cert: Path | None = None) -> str:
    """What the build log says of an ISO and Secure Boot."""
    signers = kernel_signers(kernel)
    if sign_cert is not None:
        ours = certificate_names(sign_cert)[:1] or [sign_cert.name]
        return (f"{name}: Secure Boot: shim -> Debian's signed GRUB -> the kernel, signed by "
                f"{', '.join([*(signers or []), *ours])} (iso_sign_cert: the machines must trust {ours[0]!r}, "
                "enrolled as a MOK or in db: docs/iso.md)")
    if signers is None:
        return (f"warning: {name}: the kernel is not signed: this ISO boots with Secure Boot off only "
                "(sign it with iso_sign_key and iso_sign_cert, and enrol the certificate: docs/iso.md, Secure Boot)")
    return f"{name}: Secure Boot: shim -> Debian's signed GRUB -> the kernel, signed by {', '.join(signers) or '?'}"


def run_tool(*, tool_ref: str, args: Sequence[str], members: Sequence[tuple[str, Path | bytes, int]], target: Path,
             source_date_epoch: int, what: str, entrypoint: str = "") -> None:
    """Run the tool image (its entrypoint, or the one given) with args: a tar of members (name, a file
    or bytes, mode) on its stdin, its stdout into target (fsync'd; the caller renames it into place).
    Its stderr is shown as it comes; a failure raises HookError with its last lines. An interrupt
    removes the container. A key among the members goes through the pipe only."""
    docker = find_tool("docker")
    name = f"hook-iso-{uuid.uuid4().hex[:12]}"
    argv = [docker, "run", "--rm", "-i", "--init", "--name", name, "--network", "none", "--pull", "never",
            "-e", f"SOURCE_DATE_EPOCH={source_date_epoch}",
            *(["--entrypoint", entrypoint] if entrypoint else []), tool_ref, *args]
    tail: collections.deque[str] = collections.deque(maxlen=12)
    failures: list[BaseException] = []

    def feed(stdin: BinaryIO) -> None:
        try:
            with tarfile.open(fileobj=stdin, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for member, source, mode in members:
                    info = tarfile.TarInfo(member)
                    info.mtime, info.mode = source_date_epoch, mode
                    if isinstance(source, bytes):
                        info.size = len(source)
                        tar.addfile(info, io.BytesIO(source))
                        continue
                    info.size = source.stat().st_size
                    with source.open("rb") as handle:
                        tar.addfile(info, handle)
        except BrokenPipeError:
            pass  # the tool stopped reading: its exit status and messages say why
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def drain(stderr: BinaryIO) -> None:
        for raw in stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            print(f"  {line}", file=sys.stderr, flush=True)

    started = time.monotonic()
    with timed(f"docker run {TOOL_IMAGE}"), target.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        threads = [threading.Thread(target=feed, args=(proc.stdin,), daemon=True),
                   threading.Thread(target=drain, args=(proc.stderr,), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            while chunk := proc.stdout.read(1 << 20):
                out.write(chunk)
            rc = proc.wait()
            for thread in threads:
                thread.join()
        except BaseException:  # interrupted: the container goes, then its client
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=30)
            proc.kill()  # the client of a removed container has nothing left to do
            proc.wait()
            raise
        out.flush()
        os.fsync(out.fileno())
    if failures:
        raise HookError(f"could not send the boot files to {what}: {failures[0]}")
    if rc != 0:
        last = " | ".join(x for x in tail if x.strip()) or "no output"
        hint = "" if "iso_sign" in last else "; try: doit forget iso_tools, then run again"  # the key is the user's
        raise HookError(f"{what} ({tool_ref}) failed (exit {rc}) after {time.monotonic() - started:.1f}s: "
                        f"{last}{hint}")


def make_iso_file(*, tool_ref: str, kernel: Path, initrd: Path, arch: Arch, cmdline: str, target: Path,
                  source_date_epoch: int, smee: bool = True, sign: tuple[Path, Path] | None = None) -> None:
    """Run the tool image: kernel, initramfs and grub.cfg in (a tar on its stdin), the ISO out (its
    stdout, into a temporary file renamed to target when all went well). sign: a PEM key and its
    certificate; the tools sign the ISO's copy of the kernel with them (sbsign; an Authenticode
    signature is deterministic, so the ISO still has the same bytes for the same inputs). The key
    goes through the pipe only: never on a command line, in an image or in the ISO."""
    for what, path in (("kernel", kernel), ("initramfs", initrd)):
        if not path.is_file():
            raise HookError(f"{what} {path} is missing: build the OS first (doit dev_dist, dist or debug_image)")
    members: list[tuple[str, Path | bytes, int]] = [("vmlinuz", kernel, 0o644), ("initramfs", initrd, 0o644)]
    if sign is not None:
        members += [("sign.key", sign[0], 0o600), ("sign.crt", sign[1], 0o644)]
    members.append(("grub.cfg", grub_cfg(arch, encode(cmdline), smee=smee), 0o644))
    stamp = _stamp(kernel, initrd, arch)
    log_step(f"making {target.name} ({arch}) with {tool_ref}")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        run_tool(tool_ref=tool_ref, args=[arch.value, VOLUME_ID, stamp], members=members, target=partial,
                 source_date_epoch=source_date_epoch, what="the ISO tools")
        try:
            area = locate(partial)
        except HookError as exc:
            raise HookError(f"the ISO the tools made is not usable: {exc}") from None
        if area.content != encode(cmdline) or area.smee != smee_region(smee):
            raise HookError("the ISO the tools made does not hold the cmdline it was given; report this as a bug")
        if smee:
            check_smee_placeholder(partial)
        partial.chmod(0o644)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    log_step(f"{target.name}: {target.stat().st_size} bytes in {time.monotonic() - started:.1f}s; "
             f"cmdline: {mask(canonical(cmdline), cmdline_secrets(cmdline))}")
    log_step(secure_boot_line(kernel, target.name, sign[1] if sign else None))


def make_iso(settings: Settings, build: Build, arch: Arch, record: Path) -> None:
    """`iso:<arch>` (and dist_iso, debug_iso): the ISO of one build and arch, and its checksum line."""
    tool_ref = tools.recorded_ref(settings, TOOLS, "iso_tools")
    kernel, initrd = boot_files(settings, build, arch)
    target = iso_path(settings, build, arch)
    cmdline = expand(settings.iso_cmdline, arch, smee=settings.iso_smee)
    serial = serial_consoles(cmdline)
    if settings.iso_smee and serial:
        log_step(f"warning: iso_cmdline names console={serial[0]}: served by Smee, the kernel's "
                 "serial console is that one whatever Smee gives (Linux takes the first ttyS named); leave the "
                 "consoles to Smee ({consoles}), or set iso_smee=false")
    make_iso_file(tool_ref=tool_ref, kernel=kernel, initrd=initrd, arch=arch, cmdline=cmdline, target=target,
                  source_date_epoch=settings.source_date_epoch, smee=settings.iso_smee, sign=settings.iso_sign)
    record_output(target, sha512(target), record, key="iso", tool=tool_ref, config=iso_config(settings, arch))


def iso_is_current(settings: Settings, build: Build, arch: Arch) -> bool:
    """Part of the ISO task's up-to-date check: the ISO is the one recorded and checksum.txt lists it."""
    return output_is_current(iso_path(settings, build, arch), iso_record(settings, build, arch))


def clean_iso(settings: Settings, build: Build, arch: Arch) -> None:
    """`doit clean`: the ISO's line in checksum.txt goes with it."""
    clean_output(iso_path(settings, build, arch))


# --- the command line interface ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.iso",
                                     description="Show or rewrite the kernel command line of a Hook ISO in place.")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the ISO's kernel command line")
    show.add_argument("iso", type=Path)
    show.add_argument("--raw", action="store_true", help="the area's bytes as they are (GRUB syntax, padding cut)")
    change = sub.add_parser("patch", help="rewrite the ISO's kernel command line in place (no rebuild)")
    change.add_argument("iso", type=Path)
    change.add_argument("--cmdline", required=True, help="the new kernel command line (the whole of it)")
    change.add_argument("--drop-smee", action="store_true",
                        help="blank Smee's placeholder too (for an ISO that Tinkerbell's Smee will not serve)")
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            area = locate(args.iso)
            print(area.content.decode("ascii").rstrip(" ") if args.raw else area.describe())
        else:
            area = patch(args.iso, args.cmdline, drop_smee=args.drop_smee)
            print(f"patched {args.iso} ({area.size}-byte area at byte {area.offset}): {area.describe()}")
    except HookError as exc:
        message = str(exc)
        if args.command == "patch" and "nothing was changed" not in message:
            message += "; nothing was changed"
        print(f"hook: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
