"""`doit dist` against a real local registry with htpasswd auth: per-arch pushes, multi-arch indexes,
and the real LinuxKit pulling every image of the release build from that registry (--mirror)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import Registry, push_packages
from tests.pipeline_env import Project, make_project

pytestmark = pytest.mark.slow
PASSWORD = "s3cr=t pass"


def _docker(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], env={**os.environ, "DOCKER_CONFIG": str(config)},
                          check=True, capture_output=True, text=True)


@pytest.fixture
def registry(registry_factory, tmp_path: Path, test_os: dict) -> tuple[Registry, Path]:  # noqa: ANN001
    """A registry with auth, logged in, holding the test OS's packages as multi-arch indexes.

    The arm64 halves are the test OS's arm64 package images (`<ref>-arm64`: real arm64 content, made
    from Debian's arm64 debs and cross-built LinuxKit programs; nothing arm64 boots here).
    """
    reg = registry_factory(username="hook", password=PASSWORD)
    config = tmp_path / "docker-config"
    push_packages(reg, test_os, config)
    return reg, config


def _project(tmp_path: Path, reg: Registry, config: Path) -> Project:
    return make_project(tmp_path / "hook", env={
        "HOOK_ORG": f"{reg.addr}/hooktest",
        "HOOK_PKG_ORG": f"{reg.addr}/linuxkit",
        "DOCKER_CONFIG": str(config),
    })


def _platforms(ref: str, config: Path) -> set[str]:
    raw = json.loads(_docker("buildx", "imagetools", "inspect", "--raw", ref, config=config).stdout)
    return {f"{m['platform']['os']}/{m['platform']['architecture']}" for m in raw.get("manifests", [])}


def test_dist_pushes_multi_arch_indexes_and_packages_every_arch(
    registry: tuple[Registry, Path], tmp_path: Path
) -> None:
    reg, config = registry
    project = _project(tmp_path, reg, config)
    result = project.doit("dist")
    for image in ("hook-bootkit", "hook-docker", "hook-kernel"):
        for arch in ("x86_64", "aarch64"):
            assert f"image_push:{image}-{arch}" in result.executed
        assert f"image_index:{image}" in result.executed
        index = json.loads(project.out(f"images/registry/{image}.json").read_text())["ref"]
        assert _platforms(index, config) == {"linux/amd64", "linux/arm64"}
        assert f"{reg.addr}/hooktest/{image}:" in index
    rendered = project.out("linuxkit/release/aarch64/hook.yaml").read_text()
    assert f"image: {index}\n" in rendered  # the index, not a per-arch tag (our kernel's, the last of the loop)
    # the real LinuxKit took every image from this registry (not Docker Hub), with our credentials
    assert f"--mirror {reg.addr}=http://{reg.addr}" in result.stderr
    assert "index.docker.io" not in result.output

    dist = project.out("dist/release")
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    combined = next(dist.glob("hook-*.tar.gz"))
    with tarfile.open(combined) as tar:
        assert tar.getnames() == ["./initramfs-aarch64", "./initramfs-x86_64", "./vmlinuz-aarch64", "./vmlinuz-x86_64"]
    assert (dist / "hook_aarch64.tar.gz").is_file() and (dist / "hook_x86_64.tar.gz").is_file()

    assert project.doit("dist").executed == []

    # A lost local state must not rebuild or push what the registry already has.
    project.doit("forget", "image_push", "image_index")
    again = project.doit("dist")
    assert "is in the registry already: not rebuilt or pushed" in again.stderr
    assert "docker buildx build" not in again.stderr


def test_registry_refusing_credentials(registry: tuple[Registry, Path], tmp_path: Path) -> None:
    reg, _ = registry
    wrong = tmp_path / "wrong-config"
    wrong.mkdir()
    auth = base64.b64encode(b"hook:not-the-password").decode()
    (wrong / "config.json").write_text(json.dumps({"auths": {reg.addr: {"auth": auth}}}))
    project = _project(tmp_path, reg, wrong)
    result = project.doit("dist", check=False)
    assert result.returncode != 0
    failures = [line for line in result.stderr.splitlines() if line.startswith("hook: image_push:")]
    assert failures and f"try: docker login {reg.addr}" in failures[0], result.output[-3000:]
    assert "Traceback" not in result.output
    assert not any(project.out("images/registry").glob("*.json"))
    assert not project.out("dist/release").exists()
