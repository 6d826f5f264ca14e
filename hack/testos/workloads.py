"""The two tiny images of the boot tests: a stand-in tink-worker and an "action", each busybox and
a script from hack/test-os/.
"""

from __future__ import annotations

from pathlib import Path

from .common import ASSETS, scratch_busybox
from .engine import Image

TINK_WORKER = "hooktest/tink-worker:test"
ACTION = "hooktest/action:test"


def workload_images(busybox: Path, applets: list[str]) -> list[Image]:
    """hooktest/tink-worker:test and hooktest/action:test (amd64 only)."""
    images: list[Image] = []
    for ref, script in ((TINK_WORKER, "tink-worker.sh"), (ACTION, "action.sh")):
        fs = scratch_busybox(busybox, applets)
        fs.dir("tmp", 0o1777)
        fs.file(f"usr/bin/{script}", ASSETS / script, mode=0o755)
        images.append(Image(name=ref.split("/")[-1].split(":")[0], refs=[ref], rootfs=fs,
                            cmd=[f"/usr/bin/{script}"]))
    return images
