"""A throw-away copy of the project, driven with the real `doit`, the real dockerd and the LinuxKit stand-in.

Used by the pipeline tests and bench/bench_incremental.py. The copy is a git repository of its own
(committed with fixed names and dates), so version and SOURCE_DATE_EPOCH come from git as for a user.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDIN = "tests/linuxkit-standin"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "hook tests", "GIT_AUTHOR_EMAIL": "tests@hook.invalid",
    "GIT_COMMITTER_NAME": "hook tests", "GIT_COMMITTER_EMAIL": "tests@hook.invalid",
    "GIT_AUTHOR_DATE": "@1700000000 +0000", "GIT_COMMITTER_DATE": "@1700000000 +0000",
}
# Local names for LinuxKit's packages and the kernel: no registry to pull the real ones from here.
LOCAL_ORG = "hooktest/tinkerbell"
LOCAL_PKG_ORG = "hooktest/linuxkit"
LOCAL_KERNEL = "hooktest/kernel:6.6.71"
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


def make_project(where: Path, *, env: dict[str, str] | None = None) -> Project:
    """Copy the project to `where`, commit it, and set the settings for local test images."""
    where.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        target = where / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    git(where, "init", "-q", "-b", "main")
    git(where, "add", "-A")
    git(where, "commit", "-qm", "test copy")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HOOK_", "SOURCE_DATE_EPOCH"))}
    settings = {
        "HOOK_ORG": LOCAL_ORG,
        "HOOK_PKG_ORG": LOCAL_PKG_ORG,
        "HOOK_KERNEL": LOCAL_KERNEL,
        "HOOK_LINUXKIT": str(ROOT / STANDIN),
        "HOOK_BOOTKIT_BASE": "local/python-base:{arch}",
        "HOOK_DOCKER_BASE": "local/python-base:{arch}",
        "HOOK_BUILD_IMAGE": "local/python-base:amd64",
        "HOOK_BUILD_CA": CA_BUNDLE,
        "HOOK_BUILD_ARGS": "PYTHON_APK=",  # the Debian test base has python3 already: no apk step
    }
    return Project(where, {**base_env, **settings, **(env or {})})


def linuxkit_package_refs(pkg_org: str, kernel: str) -> list[str]:
    """Every image hook.yaml and debug.yaml name, other than our own, with pkg_org filled in."""
    sys.path.insert(0, str(ROOT))
    from tasks import linuxkit

    values = {"serial": "ttyS0", "kernel": kernel, "pkg_org": pkg_org, "hook_docker": "x/hook-docker:x",
              "hook_bootkit": "x/hook-bootkit:x"}
    refs: list[str] = []
    for name in ("hook.yaml", "debug.yaml"):
        config = linuxkit.parse(linuxkit.render(ROOT / "linuxkit" / name, values), name)
        refs += [r for r in linuxkit.images_of(config) if not r.startswith("x/")]
    return sorted(set(refs))


def tag_local_packages(arch: str = "amd64") -> list[str]:
    """Stand-ins for LinuxKit's package images in the local engine (busybox images, renamed)."""
    refs = linuxkit_package_refs(LOCAL_PKG_ORG, LOCAL_KERNEL)
    for ref in refs:
        subprocess.run(["docker", "tag", f"local/busybox:{arch}", ref], check=True, capture_output=True)
    return refs
