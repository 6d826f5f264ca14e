"""Benchmark of the initramfs convert engine, all measured in one run on this machine.

Builds a ~256 MiB initramfs (many small text-like files, some large binary-like ones, firmware-like
blobs present two or three times, as LinuxKit makes it: gzip of an unsorted newc cpio), then times:
  (a) the old Makefile convert: gunzip | cpio -idm into a directory, find | cpio -o -H newc | gzip -6
  (b) tasks.convert.engine.repack at level 6
  (c) the floor: decompress the input and recompress the same bytes with repack's compressor
and prints both ratios and the output sizes. Target: (a)/(b) >= 2 with (b) no larger than (a),
and (b)/(c) <= 1.3.

    python bench/bench_repack.py [--size-mib 256] [--work out/bench] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zlib_ng import zlib_ng  # noqa: E402

from tasks.convert import engine as initramfs  # noqa: E402

MTIME = 1492533000
WORDS = [
    "the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "kernel", "module", "firmware",
    "driver", "device", "config", "init", "service", "mount", "network", "socket", "path", "root", "user",
    "group", "error", "warning", "option", "value", "true", "false", "load", "start", "stop", "return",
    "include", "define", "struct", "static", "const", "void", "int", "char", "unsigned", "long",
]


def corpus_text(rng: random.Random, size: int) -> bytes:
    lines = []
    total = 0
    while total < size:
        line = " ".join(rng.choices(WORDS, k=rng.randint(3, 14))) + f" {rng.randint(0, 99999)}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


def corpus_binary(rng: random.Random, size: int) -> bytes:
    """Machine-code-like: random runs mixed with repeated tables and zero padding (~2x compressible)."""
    parts = []
    total = 0
    tables = [rng.randbytes(64) for _ in range(32)]
    while total < size:
        pick = rng.random()
        if pick < 0.45:
            part = rng.randbytes(rng.randint(16, 256))
        elif pick < 0.9:
            part = rng.choice(tables) * rng.randint(1, 4)
        else:
            part = bytes(rng.randint(16, 512))
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def build_tree(root: Path, size_mib: int, seed: int = 3) -> int:
    """Write the tree; return its byte count. Proportions: 30% text, 35% binaries, 20% unique
    firmware, 15% duplicated firmware."""
    rng = random.Random(seed)
    budget = size_mib << 20
    text = corpus_text(rng, 8 << 20)
    binary = corpus_binary(rng, 16 << 20)
    written = 0

    def put(rel: str, data: bytes, mode: int = 0o644) -> None:
        nonlocal written
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
        os.utime(path, (MTIME, MTIME))
        written += len(data)

    n = 0
    while written < budget * 0.30:
        length = int(rng.lognormvariate(8, 1.2)) + 1  # median ~3 KiB
        start = rng.randrange(0, len(text) - length) if length < len(text) else 0
        put(f"usr/share/pkg{n % 97}/file{n}.conf", text[start:start + length])
        n += 1
    while written < budget * 0.65:
        length = rng.randint(32 << 10, 2 << 20)
        start = rng.randrange(0, len(binary) - length)
        put(f"usr/lib/bin{n % 13}/prog{n}", binary[start:start + length], 0o755)
        n += 1
    blobs = []
    while written < budget * 0.85:
        blob = rng.randbytes(rng.randint(256 << 10, 3 << 20)) + bytes(rng.randint(0, 64 << 10))
        blobs.append(blob)
        put(f"lib/firmware/vendor{len(blobs) % 7}/fw{len(blobs)}.bin", blob)
    copies = 0
    while written < budget:
        blob = blobs[copies % len(blobs)]
        put(f"lib/firmware/compat{copies % 3}/fw{copies}.bin", blob)
        copies += 1
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (MTIME, MTIME))
    return written


def sh(cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, shell=True, check=True, cwd=cwd)


def timed(fn: object) -> float:
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - started


def floor(src: Path, dst: Path, level: int) -> None:
    """Decompress src and compress the same bytes with repack's gzip writer: no cpio work at all."""
    threads = len(os.sched_getaffinity(0))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        writer = initramfs.GzipWriter(fout, level, threads)
        d = zlib_ng.decompressobj(31)
        while chunk := fin.read(1 << 20):
            writer.write(d.decompress(chunk))
        writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    tree, old_dir = work / "tree", work / "old"
    tree.mkdir(parents=True)
    src, out_a, out_b, out_c = work / "initrd.img", work / "old.img", work / "repack.img", work / "floor.img"

    t = time.perf_counter()
    size = build_tree(tree, args.size_mib)
    sh(f"find . | cpio -o -H newc --quiet | pigz -6 > {src}", cwd=tree)
    files = sum(len(f) for _, _, f in os.walk(tree))
    shutil.rmtree(tree)
    print(f"input: {files} files, {size / 2**20:.0f} MiB of data, {src.stat().st_size / 2**20:.1f} MiB gzip "
          f"(made in {time.perf_counter() - t:.0f}s)")
    sh("sync")

    def old() -> None:
        old_dir.mkdir()
        sh(f"gzip -dc {src} | cpio -idm --quiet", cwd=old_dir)
        sh(f"find . | cpio -o -H newc --quiet | gzip -6 > {out_a}", cwd=old_dir)

    a = timed(old)
    shutil.rmtree(old_dir)
    b = timed(lambda: initramfs.repack(src, out_b, level=6, progress=False))
    b_plain = timed(lambda: initramfs.repack(src, out_c, level=6, dedup=False, progress=False))
    size_b_plain = out_c.stat().st_size
    c = timed(lambda: floor(src, out_c, 6))
    size_a, size_b, size_c = (p.stat().st_size for p in (out_a, out_b, out_c))
    print(f"(a) old gunzip|cpio -id + find|cpio -o|gzip -6: {a:6.2f}s  {size_a / 2**20:7.1f} MiB")
    print(f"(b) tasks.convert.engine.repack, level 6:     {b:6.2f}s  {size_b / 2**20:7.1f} MiB")
    print(f"    the same without dedup (--no-dedup):       {b_plain:6.2f}s  {size_b_plain / 2**20:7.1f} MiB"
          f"  ({b_plain / c:.2f} of (c))")
    print(f"(c) floor, gunzip + repack's gzip -6, no cpio:  {c:6.2f}s  {size_c / 2**20:7.1f} MiB")
    print(f"(a)/(b) = {a / b:.2f}x faster (target >= 2), output {size_b / size_a:.3f} of (a) (target <= 1)")
    print(f"(b)/(c) = {b / c:.2f} (target <= 1.3)")
    ok = a / b >= 2 and size_b <= size_a and b / c <= 1.3
    print("targets met" if ok else "TARGETS MISSED")
    if not args.keep:
        shutil.rmtree(work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
