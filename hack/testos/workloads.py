"""The images of the boot tests, per arch: a stand-in tink-worker (python-slim and
hack/test-os/tink-worker.py: the docker API over the socket, as tink-worker runs actions), a stand-in
tink-agent (python-slim and hack/test-os/tink-agent.py: it checks tink-agent's contract with Hook) and
an "action" (busybox and hack/test-os/action.sh).

Tags: REF-amd64 and REF-arm64 (REF = TINK_WORKER, ...) for each arch, REF itself the amd64 image, so
that a test registry can hold REF as a multi-arch index of the two (tests/conftest.py, push_worker).
"""

from __future__ import annotations

from pathlib import Path

from .common import ASSETS, Rootfs, scratch_busybox
from .engine import Image

TINK_WORKER = "hooktest/tink-worker:test"
TINK_AGENT = "hooktest/tink-agent:test"
ACTION = "hooktest/action:test"


def workload_refs(ref: str, arch: str) -> list[str]:
    """The local tags of a workload image of arch: amd64 REF and REF-amd64, arm64 REF-arm64."""
    return [ref, f"{ref}-amd64"] if arch == "amd64" else [f"{ref}-{arch}"]


def workload_images(busybox: Path, applets: list[str], python: Image) -> list[Image]:
    """hooktest/tink-worker:test, hooktest/tink-agent:test (FROM python-slim) and hooktest/action:test of
    python's arch (busybox is of that arch too)."""
    arch = python.arch
    worker = Rootfs(base=python.rootfs)
    worker.dir("tmp", 0o1777)
    worker.file("usr/bin/tink-worker.py", ASSETS / "tink-worker.py", mode=0o755)
    agent = Rootfs(base=python.rootfs)
    agent.dir("tmp", 0o1777)
    agent.file("usr/bin/tink-agent.py", ASSETS / "tink-agent.py", mode=0o755)
    action = scratch_busybox(busybox, applets)
    action.dir("tmp", 0o1777)
    action.file("usr/bin/action.sh", ASSETS / "action.sh", mode=0o755)
    return [Image(name="tink-worker", refs=workload_refs(TINK_WORKER, arch), rootfs=worker, base=python,
                  cmd=["/usr/bin/python3", "-u", "/usr/bin/tink-worker.py"], arch=arch),
            Image(name="tink-agent", refs=workload_refs(TINK_AGENT, arch), rootfs=agent, base=python,
                  cmd=["/usr/bin/python3", "-u", "/usr/bin/tink-agent.py"], arch=arch),
            Image(name="action", refs=workload_refs(ACTION, arch), rootfs=action, cmd=["/usr/bin/action.sh"],
                  arch=arch)]
