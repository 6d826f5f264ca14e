"""Bootable media: a hybrid ISO (BIOS and UEFI) of a build's kernel and initramfs, with a kernel
command line that can be rewritten in place after the build.

- `doit iso` (dev), `doit dist_iso` (release), `doit debug_iso`: out/dist/<build>/<name>-<arch>.iso
  and its sha512 in checksum.txt. The ISO tools (GRUB, xorriso, mtools) run in the `hook-iso`
  image, built from containers/hook-iso/ on a Debian base (setting iso_base); only Docker is needed.
- The command line sits in a fixed-size area of /boot/grub/grub.cfg, the one file BIOS and UEFI
  GRUB both read. `python -m tasks.iso patch ISO --cmdline '...'` rewrites it in place;
  `python -m tasks.iso show ISO` prints it. Layout, marker and encoding: docs/iso.md.

The area (v1), as bytes in the ISO:

    b"# hook-cmdline-area v1 size=1024\\nlinux /boot/vmlinuz "   MARKER: where the area starts
    1024 bytes                                                   the command line, in GRUB's word
                                                                 syntax (encode()), ASCII, padded
                                                                 with spaces (0x20)
    b"\\n# hook-cmdline-area end\\n"                             END: right after the area

MARKER occurs exactly once in the whole ISO, inside the data of /boot/grub/grub.cfg (ISO 9660
files are stored contiguously, so an in-place rewrite changes what GRUB reads and nothing else).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
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
from tasks.core.files import atomic_write_text
from tasks.core.run import find_tool, log_step, timed
from tasks.images import tools
from tasks.images.specs import ImageSpec
from tasks.media.package import sha512, update_checksums
from tasks.settings.builds import boot_files
from tasks.settings.cmdline import AREA_SIZE, canonical, decode, encode, expand, kernel_words

if TYPE_CHECKING:
    from tasks.settings import Settings
    from tasks.settings.builds import Build

__all__ = ["AREA_SIZE", "canonical", "decode", "encode", "expand", "kernel_words"]  # the area's grammar, read here too

AREA_VERSION = 1
MARKER = b"# hook-cmdline-area v1 size=1024\nlinux /boot/vmlinuz "
END = b"\n# hook-cmdline-area end\n"
#: What every version of the marker starts with: a file with two of these is refused.
MARKER_PREFIX = b"# hook-cmdline-area v"
_MARKER_LINE = re.compile(rb"# hook-cmdline-area v(\d+) size=(\d+)\n")
VOLUME_ID = "HOOK"
GRUB_CFG = ("boot", "grub", "grub.cfg")
DEFAULT_CMDLINE = "console=tty0 console={serial}"
TOOL_IMAGE = "hook-iso"
SECTOR = 2048

# --- the boot configuration ------------------------------------------------------------------------


def grub_cfg(arch: Arch, area: bytes) -> bytes:
    """/boot/grub/grub.cfg: the one configuration BIOS and UEFI GRUB read, with the cmdline area."""
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
        "# The kernel command line is the fixed-size area after the `linux /boot/vmlinuz ` below;\n"
        "# rewrite it in place (python -m tasks.iso patch ISO --cmdline ...; layout: hook's docs/iso.md).\n"
        "set timeout=0\n"
        "set default=hook\n"
        f"{serial}"
        f'menuentry "Hook ({arch})" --id hook {{\n'
        f'\techo "Hook: loading the kernel and the initramfs ({arch})"\n'
    )
    tail = "\tinitrd /boot/initramfs\n}\n"
    return head.encode() + MARKER + area + END + tail.encode()


# --- finding and rewriting the area in an ISO -----------------------------------------------------------


@dataclass(frozen=True)
class Area:
    """The cmdline area of one ISO: where it is and what it holds now."""

    path: Path
    offset: int
    size: int
    content: bytes

    @property
    def cmdline(self) -> str:
        return decode(self.content)


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
        if line is None or int(line.group(1)) != AREA_VERSION:
            version = line.group(1).decode() if line else "?"
            raise HookError(f"{path} has a cmdline area of version {version}; this hook writes version {AREA_VERSION} "
                            "only: use the hook that made the ISO; nothing was changed")
        at = cfg.find(MARKER)
        if at < 0:
            raise HookError(f"{path}: its cmdline area is not laid out as version {AREA_VERSION} says "
                            f"({MARKER!r} expected); nothing was changed")
        area_size = int(line.group(2))
        content = cfg[at + len(MARKER):at + len(MARKER) + area_size]
        if cfg[at + len(MARKER) + area_size:at + len(MARKER) + area_size + len(END)] != END:
            raise HookError(f"{path}: its cmdline area is damaged (no end marker after {area_size} bytes); "
                            "nothing was changed")
        if any(not 0x20 <= b <= 0x7E for b in content):
            raise HookError(f"{path}: its cmdline area holds bytes other than printable ASCII; nothing was changed")
        handle.seek(0)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = _count(data, MARKER_PREFIX)
        offset = start + at + len(MARKER)
        if found != [start + at]:
            raise HookError(f"{path} holds {len(found)} hook cmdline areas, not one (in /boot/grub/grub.cfg): "
                            "not an ISO that `doit iso` made; nothing was changed")
    return Area(path, offset, area_size, content)


def patch(path: Path, cmdline: str) -> Area:
    """Rewrite the cmdline area of a Hook ISO in place. Everything is checked first (the file, the
    area, the cmdline); a refusal leaves the file as it was."""
    area = locate(path)
    data = encode(cmdline, area.size)
    with open(area.path, "r+b") as handle:
        handle.seek(area.offset)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    done = locate(path)
    if done.content != data:
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
    return {"cmdline": expand(settings.iso_cmdline, arch), "source_date_epoch": settings.source_date_epoch,
            "volume_id": VOLUME_ID, "area": [AREA_VERSION, AREA_SIZE]}


def _stamp(kernel: Path, initrd: Path, arch: Arch) -> str:
    """The file GRUB finds its own volume by: unique to these boot files."""
    digest = hashlib.sha256(arch.value.encode())
    for path in (kernel, initrd):
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return f"hook-{digest.hexdigest()[:20]}.id"


def make_iso_file(*, tool_ref: str, kernel: Path, initrd: Path, arch: Arch, cmdline: str, target: Path,
                  source_date_epoch: int) -> None:
    """Run the tool image: kernel, initramfs and grub.cfg in (a tar on its stdin), the ISO out (its
    stdout, into a temporary file renamed to target when all went well)."""
    for what, path in (("kernel", kernel), ("initramfs", initrd)):
        if not path.is_file():
            raise HookError(f"{what} {path} is missing: build the OS first (doit dev_dist, dist or debug_image)")
    config = grub_cfg(arch, encode(cmdline))
    stamp = _stamp(kernel, initrd, arch)
    docker = find_tool("docker")
    name = f"hook-iso-{uuid.uuid4().hex[:12]}"
    argv = [docker, "run", "--rm", "-i", "--init", "--name", name, "--network", "none", "--pull", "never",
            "-e", f"SOURCE_DATE_EPOCH={source_date_epoch}", tool_ref, arch.value, VOLUME_ID, stamp]
    log_step(f"making {target.name} ({arch}) with {tool_ref}")
    tail: collections.deque[str] = collections.deque(maxlen=12)
    failures: list[BaseException] = []

    def feed(stdin: BinaryIO) -> None:
        try:
            with tarfile.open(fileobj=stdin, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for member, source in (("vmlinuz", kernel), ("initramfs", initrd)):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = source.stat().st_size, source_date_epoch, 0o644
                    with source.open("rb") as handle:
                        tar.addfile(info, handle)
                info = tarfile.TarInfo("grub.cfg")
                info.size, info.mtime, info.mode = len(config), source_date_epoch, 0o644
                tar.addfile(info, io.BytesIO(config))
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
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with timed("docker run hook-iso"), partial.open("wb") as out:
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
            raise HookError(f"could not send the boot files to the ISO tools: {failures[0]}")
        if rc != 0:
            last = " | ".join(x for x in tail if x.strip()) or "no output"
            raise HookError(f"the ISO tools ({tool_ref}) failed (exit {rc}) after {time.monotonic() - started:.1f}s: "
                            f"{last}; try: doit forget iso_tools, then run again")
        try:
            area = locate(partial)
        except HookError as exc:
            raise HookError(f"the ISO the tools made is not usable: {exc}") from None
        if area.content != encode(cmdline):
            raise HookError("the ISO the tools made does not hold the cmdline it was given; report this as a bug")
        partial.chmod(0o644)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    log_step(f"{target.name}: {target.stat().st_size} bytes in {time.monotonic() - started:.1f}s; "
             f"cmdline: {canonical(cmdline)}")


def make_iso(settings: Settings, build: Build, arch: Arch, record: Path) -> None:
    """`iso:<arch>` (and dist_iso, debug_iso): the ISO of one build and arch, and its checksum line."""
    tool_ref = tools.recorded_ref(settings, TOOLS, "iso_tools")
    kernel, initrd = boot_files(settings, build, arch)
    target = iso_path(settings, build, arch)
    make_iso_file(tool_ref=tool_ref, kernel=kernel, initrd=initrd, arch=arch,
                  cmdline=expand(settings.iso_cmdline, arch), target=target,
                  source_date_epoch=settings.source_date_epoch)
    digest = sha512(target)
    update_checksums(target.parent, {target.name: digest})
    stat = target.stat()
    atomic_write_text(record, json.dumps({"iso": target.name, "sha512": digest, "size": stat.st_size,
                                          "mtime_ns": stat.st_mtime_ns, "tool": tool_ref,
                                          "config": iso_config(settings, arch)}, indent=2, sort_keys=True) + "\n")


def iso_is_current(settings: Settings, build: Build, arch: Arch) -> bool:
    """Part of the ISO task's up-to-date check (file_dep and config_changed do the rest): the ISO is
    the one recorded (size, mtime: not patched or replaced since) and checksum.txt lists it."""
    target = iso_path(settings, build, arch)
    try:
        data = json.loads(iso_record(settings, build, arch).read_text())
        stat = target.stat()
        sums = (target.parent / "checksum.txt").read_text().splitlines()
    except (OSError, ValueError):
        return False
    return (stat.st_size, stat.st_mtime_ns) == (data.get("size"), data.get("mtime_ns")) and \
        f"{data.get('sha512')}  {target.name}" in sums


def clean_iso(settings: Settings, build: Build, arch: Arch) -> None:
    """`doit clean`: the ISO's line in checksum.txt goes with it."""
    target = iso_path(settings, build, arch)
    if target.parent.is_dir():
        update_checksums(target.parent, {target.name: None})


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
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            area = locate(args.iso)
            print(area.content.decode("ascii").rstrip(" ") if args.raw else area.cmdline)
        else:
            area = patch(args.iso, args.cmdline)
            print(f"patched {args.iso} ({area.size}-byte area at byte {area.offset}): {area.cmdline}")
    except HookError as exc:
        message = str(exc)
        if args.command == "patch" and "nothing was changed" not in message:
            message += "; nothing was changed"
        print(f"hook: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
