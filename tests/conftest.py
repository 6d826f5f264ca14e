"""Shared fixtures: the real services the tests run against (started by hack/setup-test-machine.sh
or by these fixtures), never mocks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CACHE = Path(os.environ.get("HOOK_TEST_CACHE", "/var/cache/hook-test"))
SETUP = "run hack/setup-test-machine.sh first"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, *, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """The machine's dockerd must answer; the tests do not start it (the setup script does)."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail(f"dockerd is not answering: {SETUP}")


@pytest.fixture(scope="session", autouse=True)
def disk_hygiene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What the run leaves (tests/hygiene.py): an earlier run's images go at the start, this run's at
    the end, unless another pytest runs on this machine (its images are in use); LinuxKit's image cache
    lives in this run's temporary folder, not in ~/.linuxkit."""
    from tests.hygiene import other_sessions, sweep_earlier_runs, tidy_engine

    sweep_earlier_runs(tmp_path_factory.getbasetemp())
    engine = shutil.which("docker") is not None and not other_sessions()
    if engine:
        tidy_engine()
    cache = tmp_path_factory.mktemp("linuxkit-cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LINUXKIT_CACHE", str(cache))
        yield
    shutil.rmtree(cache, ignore_errors=True)
    if engine and not other_sessions():
        tidy_engine()


@pytest.fixture(scope="session")
def shipped_kernel(tmp_path_factory: pytest.TempPathFactory, test_os: dict) -> dict:
    """Our kernel image for this machine's arch, as the pipeline builds it (`doit image_load:hook-kernel-<arch>`,
    the Debian flavour from Debian's mirror): its record and its files /kernel, /kernel.tar, /kernel.json.
    The kernel every boot test boots is this one, the kernel users get."""
    from tasks.core.arch import Arch
    from tests.pipeline_env import image_files, make_project

    arch = Arch.native()
    project = make_project(tmp_path_factory.mktemp("kernel") / "hook")
    project.doit(f"image_load:hook-kernel-{arch}")
    record = json.loads(project.out(f"images/local/hook-kernel-{arch}.json").read_text())
    files = image_files(record["ref"], ["kernel", "kernel.tar", "kernel.json"], tmp_path_factory.mktemp("kernel-files"))
    return {"record": record, "ref": record["ref"], **files}


@pytest.fixture(scope="session")
def test_kernel(shipped_kernel: dict) -> Path:
    """The kernel (bzImage) of our kernel image, for QEMU boots of small test initramfs."""
    return shipped_kernel["kernel"]


@pytest.fixture(scope="session")
def busybox() -> Path:
    path = Path("/bin/busybox")
    if not path.is_file():
        pytest.fail(f"no static busybox at {path}: {SETUP}")
    return path


@pytest.fixture(scope="session")
def base_images(docker_engine: None) -> dict[str, str]:
    """Locally made base images (no registry to pull from here); '{arch}' is amd64 or arm64, each of
    its own arch's content (the arm64 ones of Debian's arm64 packages, labelled with their rootfs)."""
    images = {"busybox": "local/busybox:{arch}", "python": "local/python-base:{arch}"}
    for name in images.values():
        for arch in ("amd64", "arm64"):
            ref = name.format(arch=arch)
            done = subprocess.run(["docker", "image", "inspect", "-f",
                                   '{{.Architecture}} {{index .Config.Labels "org.hook.test.rootfs"}}', ref],
                                  capture_output=True, text=True)
            if done.returncode:
                pytest.fail(f"base image {ref} missing: {SETUP}")
            image_arch, rootfs = (done.stdout.split() + ["", ""])[:2]
            if image_arch != arch or (arch == "arm64" and rootfs in ("", "<no value>")):
                pytest.fail(f"base image {ref} is not of {arch} content (an older setup made the arm64 ones "
                            f"of the amd64 rootfs): {SETUP}")
    return images


@dataclass
class Registry:
    """A running Debian docker-registry (distribution 2.8) on 127.0.0.1."""

    port: int
    root: Path
    username: str | None = None
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def login(self, docker_config: Path) -> None:
        """docker login into a private client config dir (DOCKER_CONFIG), not the user's."""
        docker_config.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DOCKER_CONFIG": str(docker_config)}
        subprocess.run(
            ["docker", "login", "-u", self.username or "", "--password-stdin", self.addr],
            input=(self.password or "").encode(), env=env, check=True, capture_output=True,
        )


def _start_registry(root: Path, *, username: str | None, password: str | None, port: int | None = None) -> Registry:
    if not shutil.which("docker-registry"):
        pytest.fail(f"docker-registry not installed: {SETUP}")
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    auth = ""
    if username is not None:
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", username, password or ""], check=True, capture_output=True, text=True
        ).stdout.strip()
        (root / "htpasswd").write_text(htpasswd + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: hook-test\n    path: {root / 'htpasswd'}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - lives as long as the registry
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    wait_for_port(port)
    return Registry(port=port, root=root, username=username, password=password, proc=proc)


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Start registries for one test: registry_factory(username=..., password=...) adds htpasswd auth."""
    started: list[Registry] = []

    def start(*, username: str | None = None, password: str | None = None, port: int | None = None) -> Registry:
        reg = _start_registry(tmp_path / f"registry{len(started)}", username=username, password=password, port=port)
        started.append(reg)
        return reg

    yield start
    for reg in started:
        reg.stop()


# --- the real Hook OS: builds with the real LinuxKit, a registry holding the test tink-worker ------------

#: A registry password with '=' and a space: the kernel cmdline, bootkit and docker must keep it whole.
REGISTRY_USER = "hook"
REGISTRY_PASSWORD = "pa=ss w0rd"


@pytest.fixture(scope="session")
def test_os(docker_engine: None) -> dict:
    """The test OS manifest (hack/test-os.py); every image it names must be in the engine."""
    from tests.pipeline_env import linuxkit_binary, os_manifest

    try:
        manifest = os_manifest()
        linuxkit_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    if "tink_agent" not in manifest:
        pytest.fail("the test OS predates the tink-agent stand-in: run hack/test-os.py")
    for ref in (manifest["tink_worker"], manifest["tink_agent"], manifest["python_slim"].format(arch="amd64"),
                manifest["docker_base"].format(arch="amd64")):
        if subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode:
            pytest.fail(f"test OS image {ref} missing: run hack/test-os.py")
    return manifest


@pytest.fixture(scope="session")
def dev_project(tmp_path_factory: pytest.TempPathFactory, test_os: dict):  # noqa: ANN201 - Project
    """One project built with `doit dev_dist` from clean with the real LinuxKit: shared by the
    pipeline tests (which copy it before they change it) and the boot tests."""
    from tests.pipeline_env import make_project

    project = make_project(tmp_path_factory.mktemp("dev") / "hook")
    project.built = project.doit("dev_dist")
    return project


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two ed25519 key pairs: `good` goes into the debug image, `other` must be refused."""
    folder = tmp_path_factory.mktemp("ssh")
    keys = {}
    for name in ("good", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@hook-test",
                        "-f", str(folder / name)], check=True)
        keys[name] = folder / name
    return keys


@pytest.fixture(scope="session")
def debug_project(tmp_path_factory: pytest.TempPathFactory, test_os: dict, ssh_keys: dict[str, Path]):  # noqa: ANN201
    """A project built with `doit debug_image` and the `good` test key."""
    from tests.pipeline_env import make_project

    project = make_project(tmp_path_factory.mktemp("debug") / "hook")
    project.doit("debug_image", f"ssh_keys={ssh_keys['good']}.pub")
    return project


@pytest.fixture
def worker_registry(registry_factory: Callable[..., Registry], test_os: dict, tmp_path: Path) -> Registry:
    """A registry with htpasswd auth holding the test tink-worker as hooktest/tink-worker:test and the
    tink-agent stand-in as hooktest/tink-agent:test."""
    reg = registry_factory(username=REGISTRY_USER, password=REGISTRY_PASSWORD)
    push_worker(reg, test_os, tmp_path / "docker-config")
    return reg


def push_index(local: str, remote: str, config: Path) -> None:
    """The test OS's `local`-amd64 and `local`-arm64 (each of its own arch) pushed as `remote`-amd64
    and `remote`-arm64, then `remote` = the index of the two (`docker buildx imagetools create`), so
    that a build or a guest of either arch gets its own."""
    env = {**os.environ, "DOCKER_CONFIG": str(config)}
    sources = []
    for arch in ("amd64", "arm64"):
        if subprocess.run(["docker", "image", "inspect", f"{local}-{arch}"], capture_output=True).returncode:
            pytest.fail(f"test OS image {local}-{arch} missing (an older test OS had no per-arch images): "
                        "run hack/test-os.py")
        subprocess.run(["docker", "tag", f"{local}-{arch}", f"{remote}-{arch}"], check=True, capture_output=True)
        subprocess.run(["docker", "push", f"{remote}-{arch}"], check=True, capture_output=True, env=env)
        sources.append(f"{remote}-{arch}")
    subprocess.run(["docker", "buildx", "imagetools", "create", "-t", remote, *sources], check=True,
                   capture_output=True, env=env)


def push_packages(reg: Registry, test_os: dict, config: Path) -> None:
    """LinuxKit's packages of the test OS into `reg` as `<reg>/linuxkit/<name>:<tag>`, multi-arch indexes."""
    from tests.pipeline_env import linuxkit_package_refs

    reg.login(config)
    for local in linuxkit_package_refs(test_os["pkg_org"]):
        push_index(local, f"{reg.addr}/linuxkit/{local.rsplit('/', 1)[1]}", config)


def push_worker(reg: Registry, test_os: dict, config: Path) -> str:
    """Push the two stand-ins (tink-worker, tink-agent) as multi-arch indexes (push_index). The
    tink-worker's reference in that registry."""
    reg.login(config)
    for name in ("tink_agent", "tink_worker"):
        ref = f"{reg.addr}/hooktest/{name.replace('_', '-')}:test"
        push_index(test_os[name], ref, config)
        subprocess.run(["docker", "tag", test_os[name], ref], check=True, capture_output=True)  # as before: amd64
    return ref
