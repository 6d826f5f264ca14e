"""Bad input gets one clear line, a non-zero exit, and no target doit would take as up to date."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from tasks.core.arch import Arch
from tests.pipeline_env import Project, copy_out, make_project

pytestmark = pytest.mark.slow
ARCH = Arch.native()
BOOTKIT_FILE = "containers/hook-bootkit/Dockerfile"


@pytest.fixture
def project(tmp_path: Path, dev_project: Project) -> Project:
    """A copy of the built dev project whose OS is stale (hook.yaml changed): the next build runs linuxkit."""
    copy = make_project(tmp_path / "hook")
    copy_out(dev_project, copy)
    copy.replace("linuxkit/hook.yaml", "Welcome to HookOS", "Welcome to a changed HookOS")
    for path in (copy.out(f"dist/dev/hook_{ARCH}.tar.gz"), copy.out(f"dev/{ARCH}/initramfs-{ARCH}")):
        path.unlink()
    return copy


def _failure(result) -> str:  # noqa: ANN001 - DoitResult
    lines = [line for line in result.stderr.splitlines() if " failed: " in line and line.startswith("hook: ")]
    assert lines, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    return lines[-1]


def _no_finished_outputs(project: Project) -> None:
    assert not project.out(f"dist/dev/hook_{ARCH}.tar.gz").exists()
    assert not project.out(f"dev/{ARCH}/initramfs-{ARCH}").exists()
    assert not list(project.out(f"linuxkit/dev/{ARCH}").glob(".linuxkit-*"))


def test_unknown_setting_value_stops_before_any_work(project: Project) -> None:
    result = project.doit("dev_dist", "compression=lz4", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "hook: setting compression='lz4' is not one of gzip, zstd"
    assert result.executed == []
    assert not list(project.out(f"linuxkit/dev/{ARCH}").glob(".linuxkit-*"))


def test_unknown_setting_name_is_refused(project: Project) -> None:
    result = project.doit("dev_dist", "archs=x86_64", check=False)
    assert result.returncode != 0
    assert "hook: unknown setting 'archs' (did you mean arches?)" in result.stderr


def test_malformed_hook_yaml_names_file_and_key(project: Project) -> None:
    text = (project.root / "linuxkit/hook.yaml").read_text()
    services = re.findall(r"^  - name: (\S+)$", text.split("\nservices:\n", 1)[1], re.M)
    project.replace("linuxkit/hook.yaml", "  - name: hook-docker\n", "  - name: hook-docker\n    capabilites: [all]\n")
    result = project.doit("dev_dist", check=False)
    assert result.returncode != 0
    line = _failure(result)
    index = services.index("hook-docker")  # the misspelt key names the service it is in, by its place
    assert line.startswith(f"hook: linuxkit:dev-{ARCH} failed: linuxkit/hook.yaml: services[{index}]: "), line
    assert "'capabilites' was unexpected" in line
    _no_finished_outputs(project)
    again = project.doit("dev_dist", check=False)
    assert f"linuxkit:dev-{ARCH}" in again.executed  # a failed step is never taken as done


def test_linuxkit_missing(project: Project) -> None:
    result = project.doit("dev_dist", "linuxkit=/nonexistent/linuxkit", check=False)
    assert result.returncode != 0
    assert "/nonexistent/linuxkit not found: install linuxkit v1.8.2" in _failure(result)
    _no_finished_outputs(project)


def test_linuxkit_failing_leaves_nothing_finished(project: Project) -> None:
    """The real LinuxKit fails on a package image that neither the engine nor a registry has."""
    initrd = project.out(f"linuxkit/dev/{ARCH}/hook-initrd.img")
    before = initrd.read_bytes()
    result = project.doit("dev_dist", "pkg_org=hooktest/no-such-org", check=False)
    assert result.returncode != 0
    line = _failure(result)
    assert "linuxkit build failed (exit 1)" in line and "hooktest/no-such-org/init:" in line, line
    assert "try: check the image names in the config" in line
    _no_finished_outputs(project)
    assert initrd.read_bytes() == before  # the last good output was not touched


def test_docker_not_running(project: Project, tmp_path: Path) -> None:
    result = project.doit("dev_dist", check=False, extra_env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert result.returncode != 0
    assert "docker daemon not reachable" in _failure(result)
    _no_finished_outputs(project)


def test_buildx_missing(project: Project, tmp_path: Path) -> None:
    # A docker CLI without the buildx plugin: a wrapper that answers as docker does for a missing plugin.
    real = os.popen("command -v docker").read().strip()
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nif [ "$1" = buildx ]; then echo "docker: \'buildx\' is not a docker command." >&2;'
                    f' exit 1; fi\nexec {real} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    project.edit(BOOTKIT_FILE, "\n# changed: the image must be built\n")
    result = project.doit("dev_dist", check=False,
                          extra_env={"PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert result.returncode != 0
    assert "docker buildx not installed" in _failure(result)


def test_debug_image_without_ssh_key(project: Project, tmp_path: Path) -> None:
    result = project.doit("debug_image", f"ssh_keys={tmp_path}/none/*.pub", check=False)
    assert result.returncode != 0
    assert "no ssh public key found" in _failure(result)
    assert not project.out(f"dist/debug/hook-debug_{ARCH}.tar.gz").exists()


def test_unknown_buildx_builder(project: Project) -> None:
    project.edit(BOOTKIT_FILE, "\n# changed: the image must be built\n")
    result = project.doit("dev_dist", "builder=no-such-builder", check=False)
    assert result.returncode != 0
    assert "buildx builder 'no-such-builder' not found: `docker buildx ls` lists them" in _failure(result)


def test_a_step_error_is_what_the_step_printed_not_the_script_buildkit_echoes(tmp_path: Path) -> None:
    """BuildKit's plain progress repeats each RUN step's script in the step's header, cached or not, and
    our scripts hold `echo "hook: error: ..."`: the failure is what a step printed, or else the tool's
    own last lines (here: a registry that refused the push)."""
    from tasks.core.errors import HookError
    from tasks.core.run import run

    header = '#8 [build 3/4] RUN apt-get update || { echo "hook: error: apt-get update failed" >&2; exit 1; }'
    refused = tmp_path / "refused.sh"
    refused.write_text(f"echo '{header}'\necho '#8 CACHED'\necho 'ERROR: unauthorized: authentication required'\n"
                       "exit 1\n")
    with pytest.raises(HookError) as caught:
        run(["sh", str(refused)], tool="buildx", quiet=True, fix="docker login")
    assert "unauthorized: authentication required" in str(caught.value)
    assert "try: docker login" in str(caught.value)

    said = tmp_path / "said.sh"
    said.write_text(f"echo '{header}'\necho '#8 0.532 hook: error: apt-get update failed in local/debian'\n"
                    "echo '------'\nexit 1\n")
    with pytest.raises(HookError, match=r"^apt-get update failed in local/debian$"):
        run(["sh", str(said)], tool="buildx", quiet=True)
