"""cpio headers as the Linux kernel reads them: newc (070701), crc (070702) and odc (070707) in,
newc out. Pure functions on bytes; the streaming and validation live in tasks.convert.read and tasks.convert.write."""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

NEWC = b"070701"
CRC = b"070702"
ODC = b"070707"
MAGICS = (NEWC, CRC, ODC)
NEWC_HEADER = 110
ODC_HEADER = 76
TRAILER = b"TRAILER!!!"
#: The kernel skips names and symlink targets longer than this (init/initramfs.c).
PATH_MAX = 4096

#: File types an initramfs may hold; anything else in c_mode is refused.
TYPES = {
    stat.S_IFREG: "-",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}

#: What each type is called in messages.
TYPE_NAMES = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symlink",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}

_NEWC_FIELDS = struct.Struct(">13I")


@dataclass(slots=True)
class Header:
    """The fields of one cpio header, whatever its format (odc device numbers are split)."""

    magic: bytes
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    filesize: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    namesize: int
    check: int

    @property
    def aligned(self) -> bool:
        """newc and crc pad header+name and data to 4 bytes; odc does not pad."""
        return self.magic != ODC


def parse_newc(buf: bytes) -> Header:
    """Parse a 110-byte newc/crc header; ValueError names a field that is not 8 hex digits."""
    try:
        fields = _NEWC_FIELDS.unpack(bytes.fromhex(buf[6:NEWC_HEADER].decode("ascii")))
    except (ValueError, UnicodeDecodeError, struct.error):
        raise ValueError(f"header fields are not hex: {bytes(buf[6:NEWC_HEADER])!r}") from None
    ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin, namesize, check = fields
    return Header(bytes(buf[:6]), ino, mode, uid, gid, nlink, mtime, size, dmaj, dmin, rmaj, rmin,
                  namesize, check)


def _octal(buf: bytes, start: int, width: int) -> int:
    text = buf[start:start + width]
    if len(text) != width or not all(0x30 <= c <= 0x37 for c in text):
        raise ValueError(f"header field {bytes(text)!r} is not {width} octal digits")
    return int(text, 8)


def parse_odc(buf: bytes) -> Header:
    """Parse a 76-byte odc header (octal fields; dev and rdev are whole dev_t values)."""
    dev = _octal(buf, 6, 6)
    rdev = _octal(buf, 42, 6)
    return Header(
        magic=bytes(buf[:6]),
        ino=_octal(buf, 12, 6),
        mode=_octal(buf, 18, 6),
        uid=_octal(buf, 24, 6),
        gid=_octal(buf, 30, 6),
        nlink=_octal(buf, 36, 6),
        mtime=_octal(buf, 48, 11),
        filesize=_octal(buf, 65, 11),
        devmajor=os.major(dev),
        devminor=os.minor(dev),
        rdevmajor=os.major(rdev),
        rdevminor=os.minor(rdev),
        namesize=_octal(buf, 59, 6),
        check=0,
    )


def pad4(n: int) -> int:
    """Bytes of zero padding after n bytes to reach a multiple of 4."""
    return -n & 3


def newc_entry_header(
    name: bytes,
    *,
    ino: int,
    mode: int,
    uid: int,
    gid: int,
    nlink: int,
    mtime: int,
    filesize: int,
    rdevmajor: int = 0,
    rdevminor: int = 0,
) -> bytes:
    """Header, NUL-terminated name and padding of one newc entry that starts 4-aligned.

    devmajor/devminor are 0 and c_check is 0: inodes are renumbered per archive, so (0, 0, ino)
    is what the kernel and cpio use to find hardlinks.
    """
    namesize = len(name) + 1
    head = b"%s%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X" % (
        NEWC, ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdevmajor, rdevminor, namesize, 0,
    )
    return head + name + b"\0" * (1 + pad4(NEWC_HEADER + namesize))


def trailer() -> bytes:
    """The TRAILER!!! entry that ends a newc archive (all fields 0 but nlink 1, as GNU cpio)."""
    return newc_entry_header(TRAILER, ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, filesize=0)


def filemode(mode: int) -> str:
    """ls-style mode string, 'drwxr-xr-x'."""
    return stat.filemode(mode)
