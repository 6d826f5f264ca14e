"""The images and the docker engine: an Image (its Dockerfile, labels and content key), and the
Engine that inspects what the local engine has and builds, with buildx, what is missing or stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from typing import Any

from .common import MTIME, RECIPE_VERSION, Digests, Rootfs, TestOsError, run, step

BUILD_IMAGE = "local/python-base:amd64"
KEY_LABEL = "org.hook.test-os.key"
CONFIG_LABEL = "org.mobyproject.config"


@dataclasses.dataclass
class Image:
    """One image to make, of one arch, under `refs`. The amd64 and arm64 images of a part share a `name`;
    each has its own root filesystem (and base image) of its own arch."""

    name: str
    refs: list[str]
    rootfs: Rootfs
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] | None = None
    base: Image | None = None
    arch: str = "amd64"
    key: str = ""

    @property
    def ref(self) -> str:
        return self.refs[0]

    def dockerfile(self) -> str:
        if self.base is None:
            lines = ["FROM scratch"]
        else:
            if self.base.arch != self.arch:
                raise TestOsError(f"{self.ref} ({self.arch}) cannot be built on {self.base.ref} ({self.base.arch}): "
                                  "a bug in hack/testos/ (give it the base of its own arch)")
            lines = [f"FROM {self.base.ref}"]
        lines.append("COPY rootfs/ /")
        lines.append("WORKDIR /")
        for k, v in sorted(self.env.items()):
            lines.append(f"ENV {k}={json.dumps(v)}")
        if self.entrypoint is not None:
            lines.append(f"ENTRYPOINT {json.dumps(self.entrypoint)}")
        if self.cmd is not None:
            lines.append(f"CMD {json.dumps(self.cmd)}")
        return "\n".join(lines) + "\n"

    def labels(self) -> dict[str, str]:
        labels = {KEY_LABEL: self.key}
        if self.config is not None:
            labels[CONFIG_LABEL] = json.dumps(self.config, separators=(",", ":"))
        return labels

    def compute_key(self, digests: Digests) -> str:
        h = hashlib.sha256()
        h.update(f"recipe {RECIPE_VERSION}\n".encode())
        if self.arch != "amd64":  # (amd64 keys stay what they were before there was an arm64 image of its own)
            h.update(f"arch {self.arch}\n".encode())
        h.update(self.dockerfile().encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        h.update(f"base {self.base.key if self.base else ''}\n".encode())
        h.update(self.rootfs.digest(digests).encode())
        self.key = h.hexdigest()[:32]
        return self.key


class Engine:
    """The local docker engine: what it has, and the builds of this run (all of them with `force`)."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.built: list[str] = []

    def inspect(self, refs: list[str]) -> dict[str, dict[str, Any]]:
        """{ref: {id, arch, key, size}} of those refs the engine has."""
        if not refs:
            return {}
        done = subprocess.run(["docker", "image", "inspect", "--format",
                               "{{json .RepoTags}}\t{{.Id}}\t{{.Architecture}}\t{{json .Config.Labels}}\t{{.Size}}",
                               *refs], capture_output=True, text=True, check=False)
        found: dict[str, dict[str, Any]] = {}
        for line in done.stdout.splitlines():
            tags_json, image_id, arch, labels_json, size = line.split("\t")
            labels = json.loads(labels_json) or {}
            for tag in json.loads(tags_json) or []:
                found[tag] = {"id": image_id, "arch": arch, "key": labels.get(KEY_LABEL), "size": int(size)}
        return found

    def build(self, image: Image) -> None:
        started = time.monotonic()
        arch, tags = image.arch, image.refs
        argv = ["docker", "buildx", "build", "--builder", "default", "--platform", f"linux/{arch}", "--load",
                "--progress", "plain"]
        for tag in tags:
            argv += ["-t", tag]
        for k, v in image.labels().items():
            argv += ["--label", f"{k}={v}"]
        argv.append("-")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdin is not None and proc.stdout is not None
        output: list[bytes] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
        reader.start()
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                data = image.dockerfile().encode()
                info = tarfile.TarInfo("Dockerfile")
                info.size, info.mtime, info.mode = len(data), MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))
                root = tarfile.TarInfo("rootfs")
                root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, MTIME
                tar.addfile(root)
                image.rootfs.write_tar(tar, "rootfs")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        code = proc.wait()
        reader.join()
        if code != 0:
            for line in b"".join(output).decode(errors="replace").strip().splitlines()[-20:]:
                print(f"  | {line}", file=sys.stderr)
            raise TestOsError(f"docker buildx build of {tags[0]} ({arch}) failed (exit {code}): see its output above")
        self.built.append(f"{tags[0]} ({arch})")
        step(f"image: built {tags[0]} ({arch}) in {time.monotonic() - started:.1f}s")

    def make_images(self, images: list[Image], digests: Digests) -> dict[str, dict[str, Any]]:
        """Build each image whose content key the engine's copy does not carry; {ref: inspect} of them all."""
        for image in images:
            image.compute_key(digests)
        every = [r for i in images for r in i.refs]
        have = self.inspect(every + [BUILD_IMAGE])
        if BUILD_IMAGE not in have:
            raise TestOsError(f"{BUILD_IMAGE} not in the docker engine: run hack/setup-test-machine.sh (it makes it)")
        old_ids: set[str] = set()
        for image in images:
            main = have.get(image.ref)
            fresh = (not self.force and main is not None and main["key"] == image.key and main["arch"] == image.arch)
            if not fresh:
                old_ids.update(have[r]["id"] for r in image.refs if r in have)
                self.build(image)
            else:
                for r in image.refs[1:]:
                    if have.get(r, {}).get("id") != main["id"]:
                        run(["docker", "tag", image.ref, r], what=f"docker tag {r}", fix="check the docker engine")
        if not self.built:
            arches = sorted({i.arch for i in images})
            step(f"images: all {len(images)} up to date ({', '.join(arches)})")
        now = self.inspect(every)
        live = {v["id"] for v in now.values()}
        for stale in sorted(old_ids - live):
            subprocess.run(["docker", "image", "rm", stale], capture_output=True, check=False)
        missing = [r for r in every if r not in now]
        if missing:
            raise TestOsError(f"{missing[0]} is not in the docker engine after its build: check `docker images`")
        return now

    def untag_stale(self, org: str, current: set[str]) -> list[str]:
        """Remove the tags under `org/` (tagged by content, so a changed recipe or pin makes new ones) that this
        run's images do not carry: on a machine reused from run to run they would pile up. Returns them."""
        listed = subprocess.run(["docker", "image", "ls", "--filter", f"reference={org}/*", "--format",
                                 "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True, check=False)
        stale = sorted({t for t in listed.stdout.split() if not t.endswith(":<none>") and t not in current})
        if stale:
            subprocess.run(["docker", "image", "rm", *stale], capture_output=True, check=False)
            step(f"images: untagged {len(stale)} of an earlier recipe under {org}/")
        return stale
