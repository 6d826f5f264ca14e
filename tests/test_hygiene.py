"""A test run's disk hygiene (tests/hygiene.py): what it removes, and what it must never remove."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.hygiene import made_by_tests, other_sessions, sweep_earlier_runs
from tests.pipeline_env import LOCAL_ORG, os_manifest


def _repository(ref: str) -> str:
    """`repo:tag` -> repo (every name here has a tag)."""
    return ref.rsplit(":", 1)[0]


def test_the_cached_test_os_and_bases_are_kept_and_the_builds_go() -> None:
    """The test OS and the bases take minutes to make and are cached on purpose: the cleanup leaves
    every one of their names; the pipeline's test builds and the pushes to test registries go."""
    manifest = os_manifest()
    kept = [*manifest["packages"].values(), *manifest["arm64"]["images"].values(), manifest["tink_worker"],
            manifest["tink_agent"], manifest["action"], manifest["build_image"], "local/busybox:amd64"]
    kept += [manifest[key].format(arch=arch) for key in ("python_slim", "docker_base") for arch in ("amd64", "arm64")]
    for ref in kept:
        assert not made_by_tests(_repository(ref)), ref
    for repository in (f"{LOCAL_ORG}/hook-docker", f"{LOCAL_ORG}/hook-kernel", "127.0.0.1:45123/hooktest/tink-worker",
                       "hook-test/hook-bootkit", "hook-iso", "hook-kernel-builder"):
        assert made_by_tests(repository), repository


def test_earlier_runs_folders_go_but_a_running_ones(tmp_path: Path) -> None:
    root = tmp_path / "pytest-of-someone"
    for number in (3, 7, 8, 9, 10):
        (root / f"pytest-{number}" / "dev0").mkdir(parents=True)
    (root / "pytest-8" / ".lock").write_text(str(os.getpid()))  # a session that still runs
    (root / "pytest-7" / ".lock").write_text("999999999")  # a crashed one: no such process
    removed = sweep_earlier_runs(root / "pytest-10")
    assert sorted(p.name for p in removed) == ["pytest-3", "pytest-7", "pytest-9"]
    assert sorted(p.name for p in root.iterdir()) == ["pytest-10", "pytest-8"]


def test_a_basetemp_of_the_users_own_is_left_alone(tmp_path: Path) -> None:
    for name in ("pytest-1", "pytest-2", "mine"):
        (tmp_path / name).mkdir()
    assert sweep_earlier_runs(tmp_path / "mine") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "pytest-1", "pytest-2"]


def test_another_pytest_on_the_machine_is_seen() -> None:
    """While another session runs, its images are in use: the engine is not tidied (conftest.disk_hygiene)."""
    other = subprocess.Popen(["bash", "-c", "exec -a pytest sleep 60"])
    try:
        for _ in range(100):
            if other.pid in other_sessions():
                break
            time.sleep(0.05)
        assert other.pid in other_sessions()
    finally:
        other.kill()
        other.wait()
    assert other.pid not in other_sessions()
