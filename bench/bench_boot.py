"""The Hook OS's size, the guest memory it needs and its boot milestones, measured side by side.

    python3 bench/bench_boot.py [--memory 512,768,1024,2048] [--timeout 600]

Needs the test machine (hack/test.sh): builds the dev OS with the real LinuxKit and the test OS
(tests/pipeline_env), starts a registry with the test tink-worker on 127.0.0.1, then boots the
packaged kernel and initramfs under QEMU (TCG, 2 vCPUs) once per memory size, each until
tink-worker runs or the guest fails, and prints:
- the initramfs: LinuxKit's and ours (compressed, uncompressed cpio), and what the largest parts are;
- per memory size: the time of each boot milestone, or how the boot failed;
- ratios: the smallest memory that boots / the uncompressed root (LinuxKit's /init copies the root
  into a tmpfs of half the RAM, and expands hardlinks there).
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.boot import qemu  # noqa: E402
from tasks.core.arch import Arch  # noqa: E402
from tasks.core.errors import HookError  # noqa: E402
from tests.conftest import _start_registry, push_worker  # noqa: E402
from tests.pipeline_env import make_project, os_manifest  # noqa: E402
from tests.test_boot import MARKER, guest, packaged, tinkerbell_cmdline  # noqa: E402

MIB = 1 << 20


def uncompressed_size(path: Path) -> int:
    with gzip.open(path, "rb") as stream:
        total = 0
        while chunk := stream.read(1 << 22):
            total += len(chunk)
    return total


def largest_parts(path: Path, depth: int = 4, top: int = 10) -> list[tuple[str, int]]:
    """The biggest folders (first `depth` path parts) of an initramfs, by the bytes of their regular
    files (`python -m tasks.initramfs list`, as `cpio -tv` prints them)."""
    listing = subprocess.run([sys.executable, "-m", "tasks.initramfs", "list", str(path)], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    sizes: dict[str, int] = defaultdict(int)
    for line in listing.splitlines():
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[0].startswith("-"):
            sizes["/".join(fields[7].split("/")[:depth])] += int(fields[4])
    return sorted(sizes.items(), key=lambda item: -item[1])[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="512,768,1024,2048", help="guest memory sizes to try, MiB")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per boot")
    args = parser.parse_args()
    arch = Arch.native()
    with tempfile.TemporaryDirectory(prefix="hook-bench-boot-") as tmp:
        root = Path(tmp)
        project = make_project(root / "hook")
        print("building the dev OS (real LinuxKit, test OS packages) ...", flush=True)
        project.doit("dev_dist")
        kernel, initrd = packaged(project, "dev", "hook", root / "files")
        lk_initrd = project.out(f"linuxkit/dev/{arch}/hook-initrd.img")
        sizes = {
            "LinuxKit's initrd": (lk_initrd.stat().st_size, uncompressed_size(lk_initrd)),
            "after convert (ours)": (initrd.stat().st_size, uncompressed_size(initrd)),
        }
        parts = largest_parts(lk_initrd)  # before dedup: what the root holds in RAM
        reg = _start_registry(root / "registry", username="hook", password="pa=ss w0rd")
        try:
            push_worker(reg, os_manifest(), root / "docker-config")
            results: dict[int, dict[str, float] | str] = {}
            for memory in (int(m) for m in args.memory.split(",")):
                print(f"booting with {memory} MiB ...", flush=True)
                g = guest(kernel, initrd, root / f"console-{memory}.log", cmdline=tinkerbell_cmdline(),
                          registry_port=reg.port)
                g.argv[g.argv.index("-m") + 1] = str(memory)
                with g:
                    try:
                        g.wait_for(MARKER, timeout=args.timeout)
                        # bootkit says "running" after its --running-check (3 s) once tink-worker started
                        g.wait_for("hook-bootkit: INFO tink-worker is running", timeout=60)
                        results[memory] = dict(g.milestones)
                    except HookError:
                        tail = [line for line in g.console.splitlines() if line.strip()][-3:]
                        results[memory] = "failed: " + " | ".join(tail)[-160:]
        finally:
            reg.stop()

    print()
    print(f"{'initramfs':<24}{'compressed MiB':>16}{'cpio MiB':>10}{'ratio':>7}")
    for name, (packed, unpacked) in sizes.items():
        print(f"{name:<24}{packed / MIB:16.1f}{unpacked / MIB:10.1f}{unpacked / packed:7.2f}")
    print("\nlargest parts of the root in RAM (MiB, before dedup):")
    for name, size in parts:
        print(f"  {size / MIB:7.1f}  {name}")
    names = [name for name, _ in qemu.HOOK_MILESTONES]
    print(f"\n{'memory MiB':<12}" + "".join(f"{n[:22]:>24}" for n in names))
    for memory, result in results.items():
        if isinstance(result, str):
            print(f"{memory:<12}{result}")
        else:
            print(f"{memory:<12}" + "".join(f"{result.get(n, float('nan')):24.1f}" for n in names))
    booted = [m for m, r in results.items() if not isinstance(r, str)]
    root_mib = sizes["after convert (ours)"][1] / MIB
    if booted:
        print(f"\nsmallest memory that boots / uncompressed root: {min(booted)} / {root_mib:.0f} = "
              f"{min(booted) / root_mib:.2f}")
    return 0 if booted else 1


if __name__ == "__main__":
    sys.exit(main())
