"""python -m tasks.initramfs repack|list|verify: the convert engine's command line."""

from __future__ import annotations

import argparse
import stat
import sys
import time
from pathlib import Path

from tasks.convert import cpio
from tasks.convert.engine import COMPRESSIONS, quick_check, repack, verify
from tasks.convert.read import Scanner, printable
from tasks.core.errors import HookError


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in units else ""
    try:
        value = int(text[: len(text) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 512M, 2G)") from None
    return value * units[unit]


def _list(path: Path) -> int:
    scanner = Scanner(Path(path), spool=None, limit=None)
    out = sys.stdout
    for e in scanner.entries():
        kind = e.kind
        device = kind in (stat.S_IFCHR, stat.S_IFBLK)
        size = f"{e.rdevmajor:3d}, {e.rdevminor:3d}" if device else str(e.size)
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime))
        link = f" -> {printable(e.target)}" if kind == stat.S_IFLNK else ""
        out.write(f"{cpio.filemode(e.mode)} {e.nlink:3d} {e.uid:<8d} {e.gid:<8d} {size:>8} {when} "
                  f"{printable(e.raw_name)}{link}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.initramfs",
        description="Repack, list or verify an initramfs (cpio newc/crc/odc; gzip, zstd, xz or plain).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("repack", help="rewrite INPUT as one canonical, deduplicated newc archive",
                        description="Rewrite INPUT as one sorted, validated, deduplicated newc archive "
                        "(reproducible: same input, same bytes). Duplicate names: the last one is kept, "
                        "as the kernel does. A leading uncompressed early-load archive (only kernel/...) "
                        "stays a separate uncompressed archive in front, unless --merge-early.")
    rp.add_argument("input", type=Path)
    rp.add_argument("output", type=Path)
    rp.add_argument("-c", "--compression", choices=sorted(COMPRESSIONS), default="gzip")
    rp.add_argument("-l", "--level", type=int, default=6, help="gzip 1-9, zstd 1-19 (default 6)")
    rp.add_argument("--max-output-bytes", type=_size, default=_size("4G"), metavar="SIZE",
                    help="refuse inputs that expand beyond SIZE uncompressed (default 4G; 0 = no limit)")
    rp.add_argument("--no-dedup", dest="dedup", action="store_false",
                    help="do not turn identical files into hardlinks")
    rp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="show bytes in/out while working (default: when stderr is a terminal)")
    rp.add_argument("--merge-early", action="store_true",
                    help="merge a leading uncompressed early-load archive (kernel/x86/microcode/..., "
                    "kernel/firmware/acpi/...) into the compressed one; by default it is written first, "
                    "uncompressed, where the kernel's early microcode loader and ACPI override look")
    rp.add_argument("--no-reuse", dest="reuse", action="store_false",
                    help="compress every block again; by default (gzip) the blocks of a previous OUTPUT "
                    "whose input is unchanged are copied from it (the same bytes either way)")
    ls = sub.add_parser("list", help="list the entries of INPUT, like cpio -tv (numeric ids, UTC)")
    ls.add_argument("input", type=Path)
    vf = sub.add_parser("verify", help="exit 0 only if INPUT is a complete, well-formed initramfs")
    vf.add_argument("input", type=Path)
    vf.add_argument("--quick", action="store_true",
                    help="only the cheap check of a repack output (its check record, edges and trailer)")
    args = parser.parse_args(argv)
    try:
        if args.command == "repack":
            repack(args.input, args.output, compression=args.compression, level=args.level,
                   max_output_bytes=args.max_output_bytes or None, dedup=args.dedup, progress=args.progress,
                   merge_early=args.merge_early, reuse=args.reuse)
        elif args.command == "list":
            return _list(args.input)
        elif args.quick:
            if not quick_check(args.input):
                raise HookError(f"{args.input} fails the quick check (missing, changed, truncated or not "
                                "made by repack); run verify for details or repack it again")
            print(f"ok: {args.input} passes the quick check")
        else:
            print(verify(args.input))
    except HookError as exc:
        print(f"hook: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hook: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
