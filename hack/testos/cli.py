"""The command (hack/test-os.py): the options, and the run that puts the parts together in order
(LinuxKit's source; per arch, amd64 then arm64: the programs, the debs, python's rootfs; the images,
the manifest) under the cache's lock.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bases import DOCKER_BASE, PYTHON_SLIM, base_images, python_root
from .common import (
    AMD64,
    ARCHES,
    HACK,
    Arch,
    Digests,
    TestOsError,
    atomic_write,
    busybox_applets,
    human,
    locked,
    run,
    step,
)
from .debs import debs, libraries
from .engine import BUILD_IMAGE, Engine, Image
from .linuxkit_pkgs import (
    LINUXKIT_PATCH,
    LINUXKIT_TARBALL,
    PKG_ORG,
    linuxkit_src,
    package_images,
    package_tags,
    programs,
)
from .workloads import ACTION, TINK_AGENT, TINK_WORKER, workload_images

DEFAULT_PROJECT = HACK.parent
DEFAULT_CACHE = "/var/cache/hook-test"
DEFAULT_LINUXKIT_SRC_DIR = "/work/shared/linuxkit/src"
DEFAULT_GO = "/usr/lib/go-1.24/bin/go"

ARM64_SCHEME = (
    "Every image exists per arch, each of its own arch's content (arm64: Debian's arm64 debs, LinuxKit's Go "
    "programs cross-built with GOARCH=arm64, python from python-rootfs-arm64.tar). LinuxKit packages and "
    "the workloads (tink_worker, tink_agent, action): <ref>-arm64 and <ref>-amd64 (<ref> itself is the amd64 "
    "image), as `linuxkit pkg` tags per-arch images, so a registry holds <ref> as the index of the two; "
    "python-slim and hook-docker-base: {arch} in the tag")


@dataclasses.dataclass
class Parts:
    """What one arch's images are made of: LinuxKit's programs, the extracted debs, python's root."""

    arch: Arch
    bins: dict[str, Path]
    x: dict[str, Path]
    pyroot: Path


class TestOs:
    def __init__(self, cache: Path, project: Path, linuxkit_src_dir: Path, go: Path, force: bool) -> None:
        self.cache = cache
        self.project = project
        self.src_dir = linuxkit_src_dir
        self.go = go
        self.work = cache / "test-os"
        self.digests = Digests(self.work / "digests.json")
        self.engine = Engine(force)

    # 0. preflight
    def preflight(self) -> None:
        if not (self.project / "linuxkit" / "hook.yaml").is_file():
            raise TestOsError(f"{self.project}/linuxkit/hook.yaml not found: pass --project DIR, the hook checkout")
        for tool, fix in (("docker", "install docker.io (hack/setup-test-machine.sh)"),
                          ("dpkg-deb", "run this on Debian"), ("apt-get", "run this on Debian"),
                          ("patch", "apt-get install patch")):
            if shutil.which(tool) is None:
                raise TestOsError(f"{tool} not found: {fix}")
        run(["docker", "version", "--format", "{{.Server.Version}}"], what="docker engine",
            fix="start dockerd (hack/setup-test-machine.sh does) and check `docker info`")
        run(["docker", "buildx", "version"], what="docker buildx",
            fix="install docker-buildx (hack/setup-test-machine.sh does)")
        if not os.access(self.cache, os.W_OK):
            raise TestOsError(f"cache {self.cache} is not writable: run as root or pass --cache DIR")

    def remove_leftovers(self) -> None:
        """Temporary directories of a run that was killed (this run holds the lock: none is in use)."""
        for parent in (self.work, self.work / "debx", self.work / "debx-arm64", self.cache / "linuxkit-src",
                       self.cache / "debs", self.cache / "debs-arm64"):
            with contextlib.suppress(OSError):
                for p in parent.iterdir():
                    if p.name.startswith((".x-", ".py-", ".bin-", ".stage-", ".download-", ".unpack-", ".linuxkit-")) \
                            or re.match(r"\..*\.old-\d+$", p.name):
                        shutil.rmtree(p, ignore_errors=True)

    # 1-3. one arch's programs, debs and python root
    def parts(self, src: Path, arch: Arch) -> Parts:
        return Parts(arch, programs(src, self.go, self.cache, self.work, self.digests, arch),
                     debs(self.cache, self.work, arch), python_root(self.cache, self.work, self.digests, arch))

    # 4. the images, per arch (amd64 first) in this order: the packages, python-slim, hook-docker-base,
    # the workloads
    def images(self, src: Path, every: list[Parts]) -> list[Image]:
        tags = package_tags(self.project)
        images: list[Image] = []
        amd64_applets: tuple[str, list[str]] | None = None
        for p in every:
            libs = libraries(p.x, p.arch)
            busybox = p.x["busybox-static"] / "bin" / "busybox"
            if p.arch == AMD64:
                applets = busybox_applets(busybox, self.work, self.digests)
                amd64_applets = (deb_version(p.x["busybox-static"]), applets)
            else:
                applets = foreign_applets(p, amd64_applets)
            images += package_images(src, tags, p.bins, p.x, libs, busybox, applets, p.pyroot)
            bases = base_images(p.pyroot, p.x, libs, busybox, applets)
            images += bases
            images += workload_images(busybox, applets, bases[0])
        return images

    # 5. the manifest
    def manifest(self, src: Path, images: list[Image], now: dict[str, dict[str, Any]]) -> dict[str, Any]:
        packages = {i.name: plain_refs(i) for i in images if i.ref.startswith(PKG_ORG) and i.arch == "amd64"}
        arm64 = {i.name: i for i in images if i.arch == "arm64"}
        pairs = {r: a for i in images if i.arch == "amd64" and i.name in arm64
                 for r, a in zip(plain_refs(i), arm64[i.name].refs, strict=False)}
        sizes: dict[str, int] = {}
        for image in images:
            sizes[image.ref] = now[image.ref]["size"]
        manifest = {
            "pkg_org": PKG_ORG,
            "python_slim": PYTHON_SLIM,
            "docker_base": DOCKER_BASE,
            "build_image": BUILD_IMAGE,
            "tink_worker": TINK_WORKER,
            "tink_agent": TINK_AGENT,
            "action": ACTION,
            "linuxkit_src": str(src),
            "packages": {k: v[0] if len(v) == 1 else v for k, v in sorted(packages.items())},
            "arm64": {
                "scheme": ARM64_SCHEME,
                "per_arch": "{ref}-{arch}",
                "images": pairs,
            },
            "sizes": sizes,
            "keys": {i.ref: i.key for i in images},
        }
        atomic_write(self.cache / "test-os.json", (json.dumps(manifest, indent=2) + "\n").encode())
        return manifest

    def main(self) -> int:
        started = time.monotonic()
        self.preflight()
        self.work.mkdir(parents=True, exist_ok=True)
        with locked(self.work / ".lock", f"waiting for another run of test-os.py on {self.cache}"):
            try:
                self.remove_leftovers()
                src = linuxkit_src(self.cache, self.src_dir, self.digests)
                every = [self.parts(src, arch) for arch in ARCHES]
                step("images: computing content keys")
                images = self.images(src, every)
                now = self.engine.make_images(images, self.digests)
                self.engine.untag_stale(PKG_ORG, {r for i in images for r in i.refs})
                manifest = self.manifest(src, images, now)
            finally:
                self.digests.save()
        for image in images:
            own = f", {human(image.rootfs.size())} of its own" if image.base else ""
            step(f"  {image.ref} ({image.arch}): {human(manifest['sizes'][image.ref])}{own}")
        step(f"manifest: {self.cache / 'test-os.json'} ({len(self.engine.built)} builds, "
             f"{time.monotonic() - started:.1f}s)")
        return 0


def plain_refs(image: Image) -> list[str]:
    """An amd64 image's references without the per-arch -amd64 tags."""
    return [r for r in image.refs if not r.endswith("-amd64")]


def deb_version(extracted: Path) -> str:
    """The version of an extracted deb (its directory is named as the .deb: NAME_VERSION_ARCH), epoch colon
    restored."""
    return extracted.name.split("_")[1].replace("%3a", ":")


def foreign_applets(p: Parts, amd64: tuple[str, list[str]] | None) -> list[str]:
    """The applets of a foreign arch's busybox, which is never run here: those of the amd64 busybox of the
    same Debian source version (Debian builds busybox-static with one configuration for every arch)."""
    if amd64 is None:
        raise TestOsError("the amd64 parts must come first: a bug in hack/testos/cli.py")
    theirs = deb_version(p.x["busybox-static"])
    if re.sub(r"\+b\d+$", "", theirs) != re.sub(r"\+b\d+$", "", amd64[0]):
        raise TestOsError(f"busybox-static is {amd64[0]} for amd64 but {theirs} for {p.arch.name} (the applet "
                          f"links of the {p.arch.name} one are those of the amd64 one): run `apt-get update`, so "
                          "both arches' lists are of the same state of the mirror")
    return amd64[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/test-os.py",
        description="Make, in the local docker engine, LinuxKit's package images (org hooktest/linuxkit), the "
                    "python-slim, hook-docker-base, tink-worker, tink-agent and action test images, amd64 and "
                    "arm64, from Debian packages and LinuxKit's sources, so that `doit dev_dist` with the real "
                    "LinuxKit builds a Hook OS that boots here. Cached: a run with nothing changed builds "
                    "nothing. Writes $CACHE/test-os.json. See docs/test-os.md.")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("HOOK_TEST_CACHE") or DEFAULT_CACHE),
                        help="cache directory (default: $HOOK_TEST_CACHE or %(default)s)")
    parser.add_argument("--project", type=Path, default=DEFAULT_PROJECT,
                        help="the hook checkout whose linuxkit/*.yaml name the package tags (default: %(default)s)")
    parser.add_argument("--linuxkit-src-dir", type=Path,
                        default=Path(os.environ.get("HOOK_LINUXKIT_SRC_DIR") or DEFAULT_LINUXKIT_SRC_DIR),
                        help=f"directory with {LINUXKIT_TARBALL} and {LINUXKIT_PATCH} "
                             "(default: $HOOK_LINUXKIT_SRC_DIR or %(default)s)")
    parser.add_argument("--go", type=Path, default=Path(DEFAULT_GO), help="the go binary (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="build every image again, whatever its key")
    args = parser.parse_args(argv)
    try:
        try:
            args.cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TestOsError(f"cannot create the cache directory {args.cache} ({exc.strerror}): "
                              "pass --cache DIR or set HOOK_TEST_CACHE") from exc
        return TestOs(args.cache.resolve(), args.project.resolve(), args.linuxkit_src_dir, args.go,
                      args.force).main()
    except TestOsError as exc:
        print(f"test-os: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"test-os: error: {exc.filename or ''}: {exc.strerror or exc}: check the path and its permissions",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("test-os: interrupted", file=sys.stderr)
        return 130
