#!/usr/bin/env python3
"""Make the images that boot the real Hook OS on a test machine with no registry to pull from.

LinuxKit's own package images (init, runc, containerd, getty, sshd, ...), the base images of our two
programs and the boot tests' workloads are remade from Debian packages and LinuxKit v1.8.2's Go
sources, into the local docker engine, under the names the project's linuxkit/*.yaml use with
pkg_org=hooktest/linuxkit; each for amd64 and arm64, arm64 of arm64 content (Debian's arm64 debs,
the Go programs cross-built), made without emulation. What each image holds and how it differs
from LinuxKit's real package: docs/test-os.md.

    python hack/test-os.py [--cache DIR] [--project DIR]

Cached and idempotent: every image carries the label org.hook.test-os.key, a hash of its root
filesystem and Dockerfile; an image whose key did not change is not built again, so a run with
nothing changed builds nothing. The references are written to $CACHE/test-os.json.

This file is only the command; the code is the package hack/testos/ (docs/test-os.md, "Layout"):
common.py (plumbing, arches, root filesystems, RECIPE_VERSION), engine.py (images, content keys,
docker), debs.py (DEBS, ARM64_DEBS, the Debian packages), linuxkit_pkgs.py (LinuxKit's source,
programs and package images: a builder for a new package goes there), bases.py (python-slim,
hook-docker-base), workloads.py (tink-worker, tink-agent, action), cli.py (the run).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testos.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
