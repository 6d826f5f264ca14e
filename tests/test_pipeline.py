"""The whole graph, driven with `doit` itself: real dockerd and buildx, the real LinuxKit v1.8.2 and
the test OS's packages (hack/test-os.py). What the OS does when it boots: tests/test_boot.py."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from tasks.core.arch import Arch
from tests.pipeline_env import Project, command_lines, copy_out, make_project

pytestmark = pytest.mark.slow
ARCH = Arch.native()
BOOTKIT_FILE = "containers/hook-bootkit/Dockerfile"


def _checksums(project: Project, build: str = "dev") -> str:
    return project.out(f"dist/{build}/checksum.txt").read_text()


def _copy(built: Project, where: Path, **env: str) -> Project:
    project = make_project(where, env=env or None)
    copy_out(built, project)
    return project


def test_dev_dist_outputs(dev_project: Project, test_os: dict) -> None:
    dist = dev_project.out("dist/dev")
    version = subprocess.run(["git", "-C", str(dev_project.root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert sorted(p.name for p in dist.iterdir()) == sorted(
        ["checksum.txt", f"hook-{version}.tar.gz", f"hook_{ARCH}.tar.gz"])
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    with tarfile.open(dist / f"hook_{ARCH}.tar.gz") as tar:
        assert tar.getnames() == [f"./initramfs-{ARCH}", f"./vmlinuz-{ARCH}"]
    rendered = dev_project.out(f"linuxkit/dev/{ARCH}/hook.yaml").read_text()
    assert "hooktest/tinkerbell/hook-bootkit:" in rendered and f"-{ARCH.docker}\n" in rendered
    kernel = json.loads(dev_project.out(f"images/local/hook-kernel-{ARCH}.json").read_text())
    assert f"image: {kernel['ref']}\n" in rendered  # our kernel image: hooktest/tinkerbell/hook-kernel:<hash>-amd64
    assert kernel["ref"].startswith("hooktest/tinkerbell/hook-kernel:")
    # what the real LinuxKit made: our services and the kernel's modules are in the initramfs
    initramfs = dev_project.out(f"dev/{ARCH}/initramfs-{ARCH}")
    listing = subprocess.run([sys.executable, "-m", "tasks.initramfs", "list", str(initramfs)],
                             cwd=dev_project.root, capture_output=True, text=True, check=True).stdout
    for path in ("containers/services/hook-docker/config.json", "containers/services/hook-bootkit/config.json",
                 "usr/bin/containerd", "etc/motd", f"lib/modules/{kernel['report']['version']}/modules.dep",
                 "lib/firmware/tigon/tg3.bin"):
        assert path in listing


def test_noop_rebuild_executes_nothing(dev_project: Project) -> None:
    again = dev_project.doit("dev_dist")
    assert again.executed == []


def test_one_file_change_rebuilds_only_what_it_touches(dev_project: Project, tmp_path: Path) -> None:
    project = _copy(dev_project, tmp_path / "hook")
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
    project.edit("tasks/convert/engine.py", "\n# a comment in the convert engine\n")
    assert project.doit("dev_dist").executed == [f"linuxkit:dev-{ARCH}"]

    # A comment changes the config file but not the OS: linuxkit runs, its output is the same bytes,
    # so packaging (whose inputs are those bytes) has nothing to do.
    project.edit("linuxkit/hook.yaml", "# a comment in the OS config\n")
    assert project.doit("dev_dist").executed == [f"linuxkit:dev-{ARCH}"]


def test_changed_base_image_rebuilds_the_images_built_on_it(dev_project: Project, test_os: dict,
                                                            tmp_path: Path) -> None:
    """A base re-tagged to other content under the same name: hook-docker (built on it) is rebuilt,
    hook-bootkit (another base) is not; with the base as before, nothing runs."""
    base = f"hooktest/moving-base:{ARCH.docker}"
    original = test_os["docker_base"].format(arch=ARCH.docker)
    subprocess.run(["docker", "tag", original, base], check=True)
    try:
        project = _copy(dev_project, tmp_path / "hook", HOOK_DOCKER_BASE="hooktest/moving-base:{arch}")
        first = project.doit("dev_dist")
        assert f"image_load:hook-docker-{ARCH}" in first.executed
        assert f"image_load:hook-bootkit-{ARCH}" not in first.executed
        assert project.doit("dev_dist").executed == []

        (tmp_path / "ctx").mkdir()
        # New content each run: an image built from the same bytes on an earlier run would still be in
        # the engine under the tag this content hashes to, and would rightly not be rebuilt.
        (tmp_path / "ctx" / "moved").write_text(f"the base moved ({uuid.uuid4()})\n")
        (tmp_path / "ctx" / "Dockerfile").write_text(f"FROM {original}\nCOPY moved /etc/hook-base-moved\n")
        subprocess.run(["docker", "build", "-q", "-t", base, str(tmp_path / "ctx")], check=True, capture_output=True)
        moved = project.doit("dev_dist")
        assert sorted(moved.executed) == sorted(
            [f"image_load:hook-docker-{ARCH}", f"linuxkit:dev-{ARCH}", "package:dev"])
        assert "hook: building hooktest/tinkerbell/hook-docker:" in moved.stderr  # really rebuilt, under a new tag
        assert project.doit("dev_dist").executed == []
    finally:
        subprocess.run(["docker", "rmi", base], capture_output=True)


def test_reproducible_from_two_clean_copies(dev_project: Project, tmp_path: Path) -> None:
    other = make_project(tmp_path / "elsewhere" / "hook-copy")
    result = other.doit("dev_dist")
    assert "is in the local engine already: not rebuilt" in result.stderr
    assert _checksums(other) == _checksums(dev_project)


def test_convert_alone_remakes_a_broken_initramfs(dev_project: Project, tmp_path: Path) -> None:
    project = _copy(dev_project, tmp_path / "hook")
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


def test_debug_image_adds_sshd_and_the_users_keys(debug_project: Project, ssh_keys: dict[str, Path]) -> None:
    dist = debug_project.out("dist/debug")
    assert (dist / f"hook-debug_{ARCH}.tar.gz").is_file()
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    initramfs = debug_project.out(f"debug/{ARCH}/initramfs-{ARCH}")
    key = Path(f"{ssh_keys['good']}.pub").read_text().strip()
    assert _initramfs_file(initramfs, "root/.ssh/authorized_keys").decode().strip() == key
    assert _initramfs_file(initramfs, "containers/services/sshd/config.json")


# --- interrupts: the real tools are stopped, nothing half-made stays, the next run redoes the task ----


def _processes_under(root: Path) -> list[str]:
    """Command lines of live processes that name a path inside root (our tools run with it)."""
    lines = (" ".join(argv) for argv in command_lines().values())
    return [line for line in lines if str(root) in line and "pytest" not in line]


def _interrupt_when(project: Project, seen: str, sig: int, *, timeout: float = 600) -> tuple[int, str]:
    """Run `doit dev_dist`, send sig when `seen` shows in its output; return (exit code, output)."""
    log = project.root / "doit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "doit", "dev_dist"], cwd=project.root, env=project.env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while seen not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"doit ended before {seen!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {seen!r} after {timeout}s"
        time.sleep(0.2)
    time.sleep(1.5)  # let the tool get going
    proc.send_signal(sig)
    code = proc.wait(120)
    return code, log.read_text(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_linuxkit_build_is_stopped_and_redone(dev_project: Project, tmp_path: Path, sig: int) -> None:
    project = _copy(dev_project, tmp_path / "hook")
    project.replace("linuxkit/hook.yaml", "Welcome to HookOS", "Welcome to the interrupted HookOS")
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    project.env["TMPDIR"] = str(scratch)
    code, output = _interrupt_when(project, "linuxkit build --format", sig)
    assert code != 0
    assert f"hook: linuxkit:dev-{ARCH} failed: interrupted" in output, output[-3000:]
    assert "Traceback" not in output
    time.sleep(0.5)
    assert _processes_under(project.root) == []  # linuxkit stopped with doit
    assert not list(project.out(f"linuxkit/dev/{ARCH}").glob(".linuxkit-*"))
    assert list(scratch.iterdir()) == []  # linuxkit's image tar went with our folder, not left in $TMPDIR
    again = project.doit("dev_dist")
    assert f"linuxkit:dev-{ARCH}" in again.executed
    assert "Welcome to the interrupted HookOS" in _initramfs_file(project.out(f"dev/{ARCH}/initramfs-{ARCH}"),
                                                                    "etc/motd").decode()


def test_interrupted_image_build_is_stopped_and_redone(dev_project: Project, tmp_path: Path) -> None:
    project = _copy(dev_project, tmp_path / "hook")
    # A build step that surely lasts while the signal comes (pip alone can take 1 s from a warm cache),
    # new each time: BuildKit's cache would skip a step it has seen. This copy's Dockerfile only.
    marker = f"interrupt-me-{uuid.uuid4().hex[:12]}"
    # Long: BuildKit's plain output may show a step's lines only once another step it was showing is
    # done (CI: the marker came with the 8 s step's end, and the signal then hit linuxkit). The signal
    # stops the step, so its length costs nothing.
    project.replace("containers/hook-bootkit/Dockerfile", "FROM ${BASE_IMAGE}\n",
                    f"RUN echo {marker} && sleep 120\n\nFROM ${{BASE_IMAGE}}\n")
    code, output = _interrupt_when(project, marker, signal.SIGTERM)
    assert code != 0
    assert re.search(rf"hook: image_load:hook-bootkit-{ARCH} failed: interrupted \(stopped \S*docker buildx build\)",
                     output), output[-3000:]
    time.sleep(0.5)
    assert _processes_under(project.root) == []  # docker buildx stopped with doit
    again = project.doit("dev_dist")
    assert f"image_load:hook-bootkit-{ARCH}" in again.executed
