"""A throw-away copy of the project, driven with the real `doit`, dockerd, buildx and LinuxKit v1.8.2.

Used by the pipeline and boot tests and by bench/bench_incremental.py. The copy is a git repository
of its own (committed with fixed names and dates), so version and SOURCE_DATE_EPOCH come from git as
for a user. LinuxKit's package images and the kernel are the test OS's (hack/test-os.py: made from
Debian parts and LinuxKit's own Go sources, named under hooktest/; read from its manifest).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HOOK_TEST_CACHE", "/var/cache/hook-test"))
TEST_OS_MANIFEST = CACHE / "test-os.json"
LINUXKIT = CACHE / "bin" / "linuxkit"
SETUP = "run hack/test.sh (or hack/setup-test-machine.sh, then hack/test-os.py) first"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "hook tests", "GIT_AUTHOR_EMAIL": "tests@hook.invalid",
    "GIT_COMMITTER_NAME": "hook tests", "GIT_COMMITTER_EMAIL": "tests@hook.invalid",
    "GIT_AUTHOR_DATE": "@1700000000 +0000", "GIT_COMMITTER_DATE": "@1700000000 +0000",
}
LOCAL_ORG = "hooktest/tinkerbell"
_EXECUTED = re.compile(r"^\.  (\S+)$", re.M)


@dataclass
class DoitResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    executed: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def project_files() -> list[str]:
    """The files of the project as git sees them (tracked, plus new files not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")
    return sorted(f for f in listed if f and (ROOT / f).is_file())


def git(root: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@dataclass
class Project:
    """A copy of the project with its own git history and its own settings environment."""

    root: Path
    env: dict[str, str]
    #: the first build of a shared fixture project (its log: the size report, milestones)
    built: DoitResult | None = None

    def doit(self, *args: str, check: bool = True, extra_env: dict[str, str] | None = None,
             timeout: float = 1800) -> DoitResult:
        env = {**self.env, **(extra_env or {})}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "doit", *args], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=timeout)
        result = DoitResult(done.returncode, done.stdout, done.stderr, time.monotonic() - started,
                            _EXECUTED.findall(done.stdout))
        if check and done.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({done.returncode}):\n{result.output[-6000:]}")
        return result

    def edit(self, relative: str, append: str) -> None:
        path = self.root / relative
        path.write_text(path.read_text() + append)

    def replace(self, relative: str, old: str, new: str) -> None:
        path = self.root / relative
        text = path.read_text()
        assert old in text, f"{old!r} not in {relative}"
        path.write_text(text.replace(old, new, 1))

    def commit(self, message: str = "change") -> None:
        git(self.root, "add", "-A")
        git(self.root, "commit", "-qm", message)

    def out(self, relative: str) -> Path:
        return self.root / "out" / relative


@functools.cache
def os_manifest() -> dict[str, Any]:
    """The test OS manifest (hack/test-os.py): the references of LinuxKit's packages, the kernel,
    the base images and the test tink-worker, as made on this machine."""
    try:
        return json.loads(TEST_OS_MANIFEST.read_text())
    except (OSError, ValueError):
        raise RuntimeError(f"no test OS manifest at {TEST_OS_MANIFEST}: {SETUP}") from None


def linuxkit_binary() -> Path:
    """The real LinuxKit v1.8.2, built on this machine from ../shared/linuxkit/src."""
    if not os.access(LINUXKIT, os.X_OK):
        raise RuntimeError(f"no LinuxKit binary at {LINUXKIT}: {SETUP}")
    return LINUXKIT


def project_settings() -> dict[str, str]:
    """The settings of a test build: the real LinuxKit, the test OS's packages and bases."""
    manifest = os_manifest()
    return {
        "HOOK_ORG": LOCAL_ORG,
        "HOOK_PKG_ORG": manifest["pkg_org"],
        "HOOK_DEBIAN_BUILDER": manifest["build_image"],  # a Debian with apt: our kernel image is made in it
        "HOOK_LINUXKIT": str(linuxkit_binary()),
        "HOOK_BOOTKIT_BASE": manifest["python_slim"],
        "HOOK_DOCKER_BASE": manifest["docker_base"],
        "HOOK_BUILD_IMAGE": manifest["build_image"],
        "HOOK_BUILD_CA": CA_BUNDLE,
        "HOOK_BUILD_ARGS": "APK_PACKAGES=",  # the Debian test bases have python3 already: no apk step
    }


def make_project(where: Path, *, env: dict[str, str] | None = None) -> Project:
    """Copy the project to `where`, commit it, and set the settings for the test OS."""
    where.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        target = where / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    git(where, "init", "-q", "-b", "main")
    git(where, "add", "-A")
    git(where, "commit", "-qm", "test copy")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HOOK_", "SOURCE_DATE_EPOCH"))}
    return Project(where, {**base_env, **project_settings(), **(env or {})})


def copy_out(source: Project, target: Project) -> None:
    """Give target a copy of source's out/ (doit state included): a build that is already done."""
    shutil.rmtree(target.root / "out", ignore_errors=True)
    subprocess.run(["cp", "-a", str(source.root / "out"), str(target.root / "out")], check=True)


def linuxkit_package_refs(pkg_org: str) -> list[str]:
    """Every image hook.yaml and debug.yaml name, other than our own (the programs, the kernel), with
    pkg_org filled in."""
    sys.path.insert(0, str(ROOT))
    from tasks.hookos import config as linuxkit

    values = {"serial": "ttyS0", "kernel": "x/hook-kernel:x", "pkg_org": pkg_org, "hook_docker": "x/hook-docker:x",
              "hook_bootkit": "x/hook-bootkit:x", "hook_events": "x/hook-events:x"}
    refs: list[str] = []
    for name in ("hook.yaml", "debug.yaml"):
        config = linuxkit.parse(linuxkit.render(ROOT / "linuxkit" / name, values), name)
        refs += [r for r in linuxkit.images_of(config) if not r.startswith("x/")]
    return sorted(set(refs))


def image_files(ref: str, names: list[str], dest: Path) -> dict[str, Path]:
    """Copy files out of a local image without running it (docker create + docker cp)."""
    dest.mkdir(parents=True, exist_ok=True)
    created = subprocess.run(["docker", "create", ref, "/none"], check=True, capture_output=True, text=True)
    container = created.stdout.strip()
    try:
        for name in names:
            subprocess.run(["docker", "cp", f"{container}:/{name}", str(dest / name)], check=True, capture_output=True)
    finally:
        subprocess.run(["docker", "rm", container], capture_output=True)
    return {name: dest / name for name in names}


def command_lines() -> dict[int, list[str]]:
    """{pid: argv} of the live processes on this machine, from /proc (one that ends meanwhile is skipped)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        found[int(entry.name)] = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return found
