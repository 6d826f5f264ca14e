"""Incremental builds, measured side by side in one run: clean, no-op, one file changed.

    python3 bench/bench_incremental.py [--runs 7]

Needs the test machine (hack/setup-test-machine.sh): dockerd, buildx, local base images. LinuxKit
itself is replaced by the test stand-in (tests/linuxkit-standin), so the linuxkit share of the time
is not LinuxKit's; what this measures is our overhead around docker and linuxkit: the time spent
outside those tools, which they report through HOOK_TIMINGS.

Targets (issue 2): no-op build under 0.3 s median; our overhead in the one-file build under 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.arch import Arch  # noqa: E402
from tests.pipeline_env import Project, make_project, tag_local_packages  # noqa: E402

NOOP_TARGET = 0.3
OVERHEAD_TARGET = 2.0


def timed_build(project: Project, timings: Path) -> tuple[float, float, list[str]]:
    """(wall seconds, seconds inside docker/linuxkit, tasks executed) of one `doit dev_dist`."""
    timings.write_text("")
    result = project.doit("dev_dist", extra_env={"HOOK_TIMINGS": str(timings)})
    external = sum(json.loads(line)["seconds"] for line in timings.read_text().splitlines() if line)
    return result.seconds, external, result.executed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="no-op builds to take the median of (default 7)")
    args = parser.parse_args()
    arch = Arch.native()
    tag_local_packages(arch.docker)
    with tempfile.TemporaryDirectory(prefix="hook-bench-") as tmp:
        project = make_project(Path(tmp) / "hook")
        timings = Path(tmp) / "timings.jsonl"
        print("clean build (images may be cached in the engine already) ...", flush=True)
        clean_wall, clean_ext, clean_tasks = timed_build(project, timings)

        noop = [timed_build(project, timings) for _ in range(args.runs)]
        noop_walls = [wall for wall, _, _ in noop]
        noop_tasks = sorted({t for _, _, tasks in noop for t in tasks})

        project.edit("containers/hook-bootkit/Dockerfile", "\n# bench: one changed line\n")
        one_wall, one_ext, one_tasks = timed_build(project, timings)

    noop_median = statistics.median(noop_walls)
    ours = one_wall - one_ext
    print()
    print(f"{'build':<22}{'wall s':>9}{'docker+linuxkit s':>19}{'ours s':>9}  tasks executed")
    print(f"{'clean':<22}{clean_wall:9.2f}{clean_ext:19.2f}{clean_wall - clean_ext:9.2f}  {len(clean_tasks)}")
    print(f"{'no-op (median of ' + str(args.runs) + ')':<22}{noop_median:9.3f}{0:19.2f}{noop_median:9.3f}  "
          f"{noop_tasks or 'none'}")
    print(f"{'one file changed':<22}{one_wall:9.2f}{one_ext:19.2f}{ours:9.2f}  {one_tasks}")
    print()
    print(f"no-op / target ({NOOP_TARGET} s):            {noop_median / NOOP_TARGET:.2f}"
          f"  {'ok' if noop_median < NOOP_TARGET else 'OVER'}")
    print(f"incremental overhead / target ({OVERHEAD_TARGET} s): {ours / OVERHEAD_TARGET:.2f}"
          f"  {'ok' if ours < OVERHEAD_TARGET else 'OVER'}")
    print(f"one-file build / clean build:         {one_wall / clean_wall:.2f}")
    print(f"no-op / clean build:                  {noop_median / clean_wall:.3f}")
    return 0 if noop_median < NOOP_TARGET and ours < OVERHEAD_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
