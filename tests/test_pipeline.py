"""The whole graph, driven with `doit` itself: real dockerd and buildx, the LinuxKit stand-in, QEMU.

LinuxKit cannot run here; `tests/linuxkit-standin` accepts exactly its v1.8.2 CLI, validates the
config against its schema, checks the images exist, and writes a real kernel and initrd.
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.arch import Arch
from tests.pipeline_env import Project, make_project, tag_local_packages

pytestmark = pytest.mark.slow
ARCH = Arch.native()
BOOTKIT_FILE = "containers/hook-bootkit/Dockerfile"


@pytest.fixture(scope="module")
def local_packages(docker_engine: None, base_images: dict[str, str]) -> Iterator[list[str]]:
    refs = tag_local_packages(ARCH.docker)
    yield refs
    subprocess.run(["docker", "rmi", *refs], capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, local_packages: list[str]) -> Project:
    """One project built with `doit dev_dist` from clean; tests that change it make their own copy."""
    project = make_project(tmp_path_factory.mktemp("built") / "hook")
    first = project.doit("dev_dist")
    assert f"image_load:hook-bootkit-{ARCH}" in first.executed
    assert f"linuxkit:dev-{ARCH}" in first.executed
    assert "package:dev" in first.executed
    return project


def _checksums(project: Project, build: str = "dev") -> str:
    return project.out(f"dist/{build}/checksum.txt").read_text()


def test_dev_dist_outputs(built: Project) -> None:
    dist = built.out("dist/dev")
    version = subprocess.run(["git", "-C", str(built.root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert sorted(p.name for p in dist.iterdir()) == sorted(
        ["checksum.txt", f"hook-{version}.tar.gz", f"hook_{ARCH}.tar.gz"])
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    with tarfile.open(dist / f"hook_{ARCH}.tar.gz") as tar:
        assert tar.getnames() == [f"./initramfs-{ARCH}", f"./vmlinuz-{ARCH}"]
    rendered = built.out(f"linuxkit/dev/{ARCH}/hook.yaml").read_text()
    assert "hooktest/tinkerbell/hook-bootkit:" in rendered and f"-{ARCH.docker}\n" in rendered


def test_noop_rebuild_executes_nothing(built: Project) -> None:
    again = built.doit("dev_dist")
    assert again.executed == []


def test_packaged_image_boots_in_qemu(built: Project, tmp_path: Path) -> None:
    with tarfile.open(built.out(f"dist/dev/hook_{ARCH}.tar.gz")) as tar:
        tar.extractall(tmp_path, filter="data")
    for name in (f"vmlinuz-{ARCH}", f"initramfs-{ARCH}"):  # `doit boot` boots exactly what is packaged
        assert (tmp_path / name).read_bytes() == built.out(f"dev/{ARCH}/{name}").read_bytes()
    result = built.doit("boot", "--build", "dev", "--expect", "HOOK-STANDIN-INIT: booted", "--timeout", "240")
    assert "saw 'HOOK-STANDIN-INIT: booted' on the console" in result.stderr


def test_one_file_change_rebuilds_only_what_it_touches(built: Project, tmp_path: Path) -> None:
    project = make_project(tmp_path / "hook")
    project.out("").parent.mkdir(exist_ok=True)
    subprocess.run(["cp", "-a", str(built.root / "out"), str(project.root / "out")], check=True)
    assert project.doit("dev_dist").executed == []  # a copied out/ with the same inputs is current

    project.edit(BOOTKIT_FILE, "\n# a comment: the image's content hash changes\n")
    changed = project.doit("dev_dist")
    assert sorted(changed.executed) == sorted(
        [f"image_load:hook-bootkit-{ARCH}", f"linuxkit:dev-{ARCH}", "package:dev"])

    project.replace("linuxkit/hook.yaml", "Welcome to HookOS", "Welcome to this HookOS")
    config_change = project.doit("dev_dist")
    assert sorted(config_change.executed) == sorted([f"linuxkit:dev-{ARCH}", "package:dev"])
    assert project.doit("dev_dist").executed == []

    # Our own code is an input too: a change to the convert engine re-makes the OS, not the images.
    project.edit("tasks/initramfs.py", "\n# a comment in the convert engine\n")
    assert project.doit("dev_dist").executed == [f"linuxkit:dev-{ARCH}"]

    # A comment changes the config file but not the OS: linuxkit runs, its output is the same bytes,
    # so packaging (whose inputs are those bytes) has nothing to do.
    project.edit("linuxkit/hook.yaml", "# a comment in the OS config\n")
    assert project.doit("dev_dist").executed == [f"linuxkit:dev-{ARCH}"]


def test_reproducible_from_two_clean_copies(built: Project, tmp_path: Path) -> None:
    other = make_project(tmp_path / "elsewhere" / "hook-copy")
    result = other.doit("dev_dist")
    assert "is in the local engine already: not rebuilt" in result.stderr
    assert _checksums(other) == _checksums(built)


def test_convert_alone_remakes_a_broken_initramfs(built: Project, tmp_path: Path) -> None:
    project = make_project(tmp_path / "hook")
    subprocess.run(["cp", "-a", str(built.root / "out"), str(project.root / "out")], check=True)
    initramfs = project.out(f"dev/{ARCH}/initramfs-{ARCH}")
    good = initramfs.read_bytes()
    assert project.doit("convert").executed == []
    initramfs.write_bytes(good[: len(good) // 2])
    project.edit(BOOTKIT_FILE, "\n# changed: convert must not rebuild images or run linuxkit\n")
    again = project.doit("convert")
    assert again.executed == [f"convert:dev-{ARCH}"]
    assert initramfs.read_bytes() == good


def _initramfs_file(initramfs: Path, member: str) -> bytes:
    """One file's bytes from a gzip newc initramfs, read with GNU cpio (not our own reader)."""
    done = subprocess.run(f"zcat {initramfs} | cpio -i --quiet --to-stdout {member}", shell=True,
                          capture_output=True, check=True)
    return done.stdout


def test_debug_image_adds_sshd_and_the_users_keys(built: Project, tmp_path: Path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHookTestKeyHookTestKeyHookTestKey00 tester@hook"
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id_test.pub").write_text(key + "\n")
    project = make_project(tmp_path / "hook")
    result = project.doit("debug_image", f"ssh_keys={tmp_path}/keys/*.pub")
    assert "package:debug" in result.executed
    assert not any(name.startswith("image_push") for name in result.executed)
    dist = project.out("dist/debug")
    assert (dist / f"hook-debug_{ARCH}.tar.gz").is_file()
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    initramfs = project.out(f"debug/{ARCH}/initramfs-{ARCH}")
    assert _initramfs_file(initramfs, "root/.ssh/authorized_keys").decode().strip() == key
    assert b"sshd:" in _initramfs_file(initramfs, "containers/services/sshd/image")
