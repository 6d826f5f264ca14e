"""Disk hygiene of a test run: what the tests leave in the engine, and LinuxKit's cache.

The test machines are reused from run to run ("fresh-ish"), so what one run leaves, the next
starts with. A run makes several GB: images under content-hash tags that change with every commit,
tags pushed to the throw-away registries, BuildKit's cache, LinuxKit's image cache. Left alone they
filled a CI machine's disk (ENOSPC from `linuxkit build` after three earlier runs). The run now
removes its own leftovers at its start (a crashed run's) and at its end, and keeps only what
hack/test-os.py and hack/setup-test-machine.sh cache on purpose (`hooktest/linuxkit/*`, the test
bases and workloads, `local/*`). pyproject's tmp_path retention does the same for the files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.pipeline_env import LOCAL_ORG, command_lines

#: Repository prefixes of the images the tests make and nothing caches: the pipeline's builds
#: (content-hash tags), anything pushed to a test registry, and the tests' own one-off images.
MADE_BY_TESTS = (f"{LOCAL_ORG}/", "127.0.0.1:", "localhost:", "hook-test/", "hooktest/embed-", "hook-iso",
                 "hook-kernel-builder")

#: BuildKit's cache kept between runs: enough for warm rebuilds of the small images, not every
#: kernel and firmware layer of every earlier commit.
BUILD_CACHE_KEEP = "2GB"


def made_by_tests(repository: str) -> bool:
    return repository.startswith(MADE_BY_TESTS)


def leftover_tags() -> list[str]:
    """The engine's image names that a test run made (see MADE_BY_TESTS): `repo:tag`, or `repo@digest`
    where only a pull's digest names it."""
    listed = subprocess.run(["docker", "image", "ls", "--digests", "--format", "{{.Repository}} {{.Tag}} {{.Digest}}"],
                            capture_output=True, text=True)
    if listed.returncode:
        return []
    names = set()
    for line in listed.stdout.splitlines():
        repo, tag, digest = (line.split() + ["", "", ""])[:3]
        if not made_by_tests(repo):
            continue
        if tag != "<none>":
            names.add(f"{repo}:{tag}")
        elif digest.startswith("sha256:"):
            names.add(f"{repo}@{digest}")
    return sorted(names)


def other_sessions() -> list[int]:
    """The pids of other pytest processes on this machine (`pytest`, or `python -m pytest`): while one
    runs, its images are in use, so the engine is left alone."""
    mine = os.getpid()
    return [pid for pid, argv in command_lines().items()
            if pid != mine and any(Path(a).name in ("pytest", "py.test") for a in argv[:3])]


def tidy_engine() -> None:
    """Remove the containers that `docker create` left (an interrupted export), untag the tests' images,
    drop the layers nobody uses any more, cap BuildKit's cache. Best effort: nothing here fails a run."""
    created = subprocess.run(["docker", "container", "ls", "--all", "--quiet", "--filter", "status=created"],
                             capture_output=True, text=True).stdout.split()
    if created:
        subprocess.run(["docker", "container", "rm", "--force", *created], capture_output=True)
    tags = leftover_tags()
    for start in range(0, len(tags), 100):
        subprocess.run(["docker", "image", "rm", "--force", *tags[start:start + 100]], capture_output=True)
    subprocess.run(["docker", "image", "prune", "--force"], capture_output=True)
    subprocess.run(["docker", "builder", "prune", "--force", "--keep-storage", BUILD_CACHE_KEEP],
                   capture_output=True)


def _in_use(folder: Path) -> bool:
    """pytest's `.lock` in a session folder holds its pid while that session runs."""
    try:
        pid = int((folder / ".lock").read_text().strip())
        if pid <= 0:  # kill(0 or -1, 0) would ask about whole process groups, not one session
            return False
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def sweep_earlier_runs(basetemp: Path) -> list[Path]:
    """Remove the temporary folders of earlier runs, whose failed tests' folders stay for a look until the
    next run starts (pytest's own sweep misses them when a run passes: it counts from its own folder,
    which it has just removed). Only pytest's numbered folders (`/tmp/pytest-of-$USER/pytest-N`), never
    one whose session still runs. Returns those removed."""
    if not (basetemp.name.startswith("pytest-") and basetemp.parent.name.startswith("pytest-of-")):
        return []  # --basetemp: the user's folder, the user's business
    removed = []
    for folder in sorted(basetemp.parent.glob("pytest-[0-9]*")):
        if folder != basetemp and folder.name.removeprefix("pytest-").isdigit() and not _in_use(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
