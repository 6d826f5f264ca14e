"""hook-bootkit against the real dockerd and Debian's docker-registry with htpasswd auth.

The program runs on the host as it runs in its image (and once in its image, built from a locally
made base). Privileged containers cannot start on the test machine (TEST-MACHINE.md): one test
checks the privileged configuration and the clearly reported start failure; the tests that need
tink-worker running use bootkit's --test-only-capabilities, which swaps --privileged for an explicit
capability list and changes nothing else.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import programs_helpers  # first: puts containers/ on sys.path
import pytest
from hookcommon.cmdline import HookConfig
from hookcommon.retry import StepError
from programs_helpers import (
    BOOTKIT,
    CONTAINERS,
    Running,
    build_image,
    docker_cli,
    http_server,
    image_size,
    run_program,
)

hook_bootkit = programs_helpers.program("hook_bootkit")

USER = "tinkuser"
PASSWORD = "tink=s3cret pw"  # '=' and a space: the cmdline must quote it, the parser keep it whole
WORKER = "tink-worker"
# On the machine here the host's /run is /run (in the OS: /host_root/run, hook-docker's view of it)
BINDS = ["/worker:/worker", "/var/run/docker.sock:/var/run/docker.sock", "/dev:/dev", "/run:/run"]
TEST_CAPS = ("--test-only-capabilities", "NET_ADMIN,SYS_ADMIN")
FAST = ("--backoff-initial", "0.2", "--backoff-max", "0.5", "--running-check", "1", "--host-run", "/run")
SLEEPER = "hook-test/tink-worker:sleeps"
CRASHER = "hook-test/tink-worker:crashes"
BOOTKIT_IMAGE = "hook-test/hook-bootkit:session"
TEST_BUILD_ARGS = {"BASE_IMAGE": "local/python-base:amd64", "BUILD_IMAGE": "local/python-base:amd64"}


# --- pure functions --------------------------------------------------------------------------

def test_tink_worker_gets_the_hosts_run_as_hook_docker_sees_it() -> None:
    """In the OS, dockerd runs in hook-docker, which has the host's / at /host_root: the host's /run
    (udev's database, for tink-agent) is /host_root/run there."""
    assert hook_bootkit.parse_args([]).host_run == "/host_root/run"


def test_worker_image_choice() -> None:
    assert hook_bootkit.worker_image(HookConfig(docker_registry="reg:5000")) == "reg:5000/tink-worker:latest"
    assert hook_bootkit.worker_image(HookConfig(docker_registry="https://reg/", tink_worker_image="x/y:1")) \
        == "x/y:1"
    with pytest.raises(StepError, match="set tink_worker_image=IMAGE or docker_registry=HOST"):
        hook_bootkit.worker_image(HookConfig())


@pytest.mark.parametrize(
    ("registry", "image", "auth"),
    [
        ("reg:5000", "reg:5000/tink-worker:latest", True),
        ("http://REG:5000/", "reg:5000/tink-worker@sha256:" + "a" * 64, True),
        ("reg:5000", "other:5000/tink-worker:latest", False),
        ("reg:5000", "quay.io/tinkerbell/tink-worker:v1", False),
        ("reg:5000", "tink-worker", False),
        ("index.docker.io", "tinkerbell/tink-worker", True),
    ],
)
def test_auth_only_for_docker_registry(registry: str, image: str, auth: bool) -> None:
    cfg = HookConfig(docker_registry=registry, registry_username=USER, registry_password=PASSWORD)
    expected = {"username": USER, "password": PASSWORD} if auth else None
    assert hook_bootkit.pull_auth(cfg, image) == expected


def test_no_auth_without_credentials() -> None:
    assert hook_bootkit.pull_auth(HookConfig(docker_registry="reg"), "reg/tink-worker") is None


def test_worker_env() -> None:
    cfg = HookConfig(docker_registry="reg", registry_username="u", registry_password="p", worker_id="w",
                     grpc_authority="g:1", grpc_cert_url="http://c/cert", no_proxy="n")
    assert hook_bootkit.worker_env(cfg, "uuid-1") == [
        "DOCKER_REGISTRY=reg", "REGISTRY_USERNAME=u", "REGISTRY_PASSWORD=p", "TINKERBELL_GRPC_AUTHORITY=g:1",
        "TINKERBELL_TLS=", "TINKERBELL_INSECURE_TLS=", "WORKER_ID=w", "ID=w", "HTTP_PROXY=", "HTTPS_PROXY=",
        "NO_PROXY=n", "TINKERBELL_CERT_URL=http://c/cert", "container_uuid=uuid-1",
    ]


@pytest.mark.parametrize(
    ("tinkerbell", "url"),
    [("10.0.0.1", "http://10.0.0.1:50061/metadata"), ("http://10.0.0.1/", "http://10.0.0.1:50061/metadata"),
     ("http://127.0.0.1:8080", "http://127.0.0.1:8080/metadata"),
     ("https://tink.lan", "https://tink.lan:50061/metadata")],
)
def test_metadata_url(tinkerbell: str, url: str) -> None:
    assert hook_bootkit.metadata_url(tinkerbell) == url


def test_help() -> None:
    done = run_program(BOOTKIT, "--help")
    assert done.returncode == 0
    for text in ("--cmdline-file", "--test-only-capabilities", "TEST ONLY", "registry_password", "exit status"):
        assert text in done.stdout


# --- fixtures: tiny tink-worker images, a registry holding one -------------------------------

@pytest.fixture(scope="session")
def engine(docker_engine: None) -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock", version="auto")


@pytest.fixture(scope="session")
def worker_images(base_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two tink-worker stand-ins from the local busybox: one keeps running, one prints and dies."""
    commands = {SLEEPER: '["sleep", "3600"]',
                CRASHER: '["sh", "-c", "echo \\"boom $REGISTRY_PASSWORD\\"; exit 3"]'}
    for tag, command in commands.items():
        context = tmp_path_factory.mktemp("worker")
        (context / "Dockerfile").write_text(f"FROM local/busybox:amd64\nCMD {command}\n")
        build_image(context / "Dockerfile", tag, build_args={}, context=context)


@pytest.fixture(scope="session")
def privileged_starts(base_images: dict[str, str]) -> bool:
    """Whether this machine can start a privileged container at all (this test VM cannot)."""
    return docker_cli("run", "--rm", "--privileged", "local/busybox:amd64", "true", check=False).returncode == 0


@pytest.fixture(autouse=True)
def no_worker_container(docker_engine: None) -> Iterator[None]:
    docker_cli("rm", "-f", WORKER, check=False)
    yield
    docker_cli("rm", "-f", WORKER, check=False)


@dataclass(frozen=True)
class Pushed:
    registry: str  # host:port
    image: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pushed_worker(registry_factory: Callable[..., Any], worker_images: None, tmp_path: Path) -> Iterator[Pushed]:
    """The running tink-worker stand-in pushed (with auth) to a fresh registry, and not in the engine."""
    reg = registry_factory(username=USER, password=PASSWORD)
    config = tmp_path / "docker-config"
    reg.login(config)
    image = f"{reg.addr}/tink-worker:latest"
    docker_cli("tag", SLEEPER, image)
    docker_cli("push", image, config=config)
    docker_cli("rmi", image)
    yield Pushed(reg.addr, image)
    docker_cli("rmi", "-f", image, check=False)


def write_cmdline(path: Path, **keys: str) -> Path:
    """A kernel command line as a boot loader writes it: values quoted, init arguments after '--'."""
    params = " ".join(f'{key}="{value}"' for key, value in keys.items())
    path.write_text(f"BOOT_IMAGE=/vmlinuz console=ttyS0 quiet {params} -- registry_password=not-for-us\n")
    return path


def credentials(pushed: Pushed, password: str = PASSWORD) -> dict[str, str]:
    return {"docker_registry": pushed.registry, "registry_username": USER, "registry_password": password}


def bootkit(cmdline: Path, *extra: str, attempts: int = 3) -> subprocess.CompletedProcess[str]:
    return run_program(BOOTKIT, "--cmdline-file", cmdline, "--attempts", str(attempts), *FAST, *extra)


def assert_no_secret(output: str, *secrets: str) -> None:
    for secret in (PASSWORD, *secrets):
        assert secret not in output, "a password leaked into the output"
    assert "not-for-us" not in output


def worker(engine: docker.DockerClient) -> dict[str, Any]:
    return engine.api.inspect_container(WORKER)


def our_env(attrs: dict[str, Any]) -> list[str]:
    return [e for e in attrs["Config"]["Env"] if not e.startswith("PATH=")]


def expected_env(pushed: Pushed, **extra: str) -> list[str]:
    env = {"DOCKER_REGISTRY": pushed.registry, "REGISTRY_USERNAME": USER, "REGISTRY_PASSWORD": PASSWORD,
           "TINKERBELL_GRPC_AUTHORITY": "tink.example:42113", "TINKERBELL_TLS": "false",
           "TINKERBELL_INSECURE_TLS": "true", "WORKER_ID": "de:ad:be:ef:00:01", "ID": "de:ad:be:ef:00:01",
           "HTTP_PROXY": "http://proxy.example:3128", "HTTPS_PROXY": "http://proxy.example:3129",
           "NO_PROXY": "127.0.0.1,.example"}
    env.update(extra)
    return [f"{k}={v}" for k, v in env.items()]


def worker_keys(pushed: Pushed, **extra: str) -> dict[str, str]:
    return {**credentials(pushed), "grpc_authority": "tink.example:42113", "worker_id": "de:ad:be:ef:00:01",
            "tinkerbell_tls": "false", "tinkerbell_insecure_tls": "true",
            "HTTP_PROXY": "http://proxy.example:3128", "HTTPS_PROXY": "http://proxy.example:3129",
            "NO_PROXY": "127.0.0.1,.example", **extra}


# --- against the real engine and registry ----------------------------------------------------

def test_pulls_with_credentials_and_runs_tink_worker(engine: docker.DockerClient, pushed_worker: Pushed,
                                                     tmp_path: Path) -> None:
    cmdline = write_cmdline(tmp_path / "cmdline", **worker_keys(pushed_worker))
    first = bootkit(cmdline, *TEST_CAPS)
    assert first.returncode == 0, first.stdout
    assert f"pulling {pushed_worker.image} (as user '{USER}')" in first.stdout
    assert "tink-worker is running" in first.stdout
    assert_no_secret(first.stdout)

    attrs = worker(engine)
    assert attrs["State"]["Running"] is True
    assert attrs["Config"]["Image"] == pushed_worker.image
    host = attrs["HostConfig"]
    assert host["Privileged"] is False  # only because of --test-only-capabilities
    assert host["CapAdd"] == ["NET_ADMIN", "SYS_ADMIN"]
    assert host["NetworkMode"] == "host"
    assert host["Binds"] == BINDS
    assert our_env(attrs) == expected_env(pushed_worker)
    engine.images.get(pushed_worker.image)  # the pull put the tag back

    second = bootkit(cmdline, *TEST_CAPS)
    assert second.returncode == 0, second.stdout
    assert f"removing the old tink-worker container {attrs['Id'][:10]}" in second.stdout
    replaced = worker(engine)
    assert replaced["Id"] != attrs["Id"] and replaced["State"]["Running"] is True
    with pytest.raises(docker.errors.NotFound):
        engine.api.inspect_container(attrs["Id"])
    assert_no_secret(second.stdout)


def test_tink_worker_is_privileged(engine: docker.DockerClient, pushed_worker: Pushed, tmp_path: Path,
                                   privileged_starts: bool) -> None:
    cmdline = write_cmdline(tmp_path / "cmdline", **worker_keys(pushed_worker))
    done = bootkit(cmdline, attempts=2)
    assert_no_secret(done.stdout)
    attrs = worker(engine)
    host = attrs["HostConfig"]
    assert host["Privileged"] is True and not host["CapAdd"]
    assert host["NetworkMode"] == "host"
    assert host["Binds"] == BINDS
    assert our_env(attrs) == expected_env(pushed_worker)
    if privileged_starts:
        assert done.returncode == 0, done.stdout
        assert attrs["State"]["Running"] is True
    else:  # this VM: the start fails; bootkit says so, retries, gives up after --attempts
        assert done.returncode == 1, done.stdout
        assert re.search(r"starting tink-worker failed \(attempt 1/2\): starting the tink-worker container "
                         r"\w+: .*unable to apply caps.*; retrying in", done.stdout), done.stdout
        assert "starting tink-worker failed (attempt 2/2)" in done.stdout
        assert "giving up" in done.stdout
        assert "Traceback" not in done.stdout


def test_wrong_credentials_are_retried_and_reported(engine: docker.DockerClient, pushed_worker: Pushed,
                                                    tmp_path: Path) -> None:
    wrong = "wrong=pass word"
    cmdline = write_cmdline(tmp_path / "cmdline", **credentials(pushed_worker, wrong))
    done = bootkit(cmdline, *TEST_CAPS, attempts=2)
    assert done.returncode == 1, done.stdout
    assert re.search(rf"pulling {re.escape(pushed_worker.image)} failed \(attempt 1/2\): pull failed: .*"
                     r"(unauthorized|authentication required|no basic auth).*; retrying in", done.stdout), done.stdout
    assert "failed (attempt 2/2)" in done.stdout and "giving up" in done.stdout
    assert "Traceback" not in done.stdout
    assert_no_secret(done.stdout, wrong)
    with pytest.raises(docker.errors.NotFound):
        worker(engine)


def test_dead_registry_is_retried_and_reported(engine: docker.DockerClient, tmp_path: Path) -> None:
    registry = f"127.0.0.1:{free_port()}"
    cmdline = write_cmdline(tmp_path / "cmdline", docker_registry=registry, registry_username=USER,
                            registry_password=PASSWORD)
    done = bootkit(cmdline, *TEST_CAPS, attempts=2)
    assert done.returncode == 1, done.stdout
    assert re.search(rf"pulling {registry}/tink-worker:latest failed \(attempt 1/2\): pull failed: .*"
                     r"connection refused.*; retrying in 0\.\d+s", done.stdout), done.stdout
    assert_no_secret(done.stdout)


def test_embedded_image_is_used_when_the_pull_fails(engine: docker.DockerClient, worker_images: None,
                                                    tmp_path: Path) -> None:
    image = f"127.0.0.1:{free_port()}/tink-worker:embedded"
    docker_cli("tag", SLEEPER, image)
    try:
        cmdline = write_cmdline(tmp_path / "cmdline", tink_worker_image=image, registry_password=PASSWORD)
        done = bootkit(cmdline, *TEST_CAPS)
        assert done.returncode == 0, done.stdout
        assert f"using the copy of {image} already present (embedded)" in done.stdout
        assert worker(engine)["State"]["Running"] is True
        assert_no_secret(done.stdout)
    finally:
        docker_cli("rmi", image, check=False)


def test_worker_that_dies_is_reported_with_its_output_masked(worker_images: None, tmp_path: Path) -> None:
    image = f"127.0.0.1:{free_port()}/tink-worker:crashes"
    docker_cli("tag", CRASHER, image)
    try:
        cmdline = write_cmdline(tmp_path / "cmdline", tink_worker_image=image, registry_password=PASSWORD)
        done = bootkit(cmdline, *TEST_CAPS, attempts=2)
        assert done.returncode == 1, done.stdout
        assert ("tink-worker stopped right after its start (exited, exit code 3); "
                "its last output: boom ***; retrying in") in done.stdout
        assert_no_secret(done.stdout)
    finally:
        docker_cli("rmi", image, check=False)


def test_no_image_configured_is_a_clear_error(tmp_path: Path) -> None:
    done = bootkit(write_cmdline(tmp_path / "cmdline", worker_id="x"))
    assert done.returncode == 2
    assert "no tink-worker image: set tink_worker_image=IMAGE or docker_registry=HOST[:PORT]" in done.stdout


def test_unreadable_cmdline_is_a_clear_error(tmp_path: Path) -> None:
    done = bootkit(tmp_path / "missing")
    assert done.returncode == 2
    assert f"cannot read the kernel command line {tmp_path / 'missing'}: No such file or directory" in done.stdout


def test_waits_for_the_docker_socket_with_a_deadline(tmp_path: Path) -> None:
    sock = tmp_path / "docker.sock"
    cmdline = write_cmdline(tmp_path / "cmdline", docker_registry="reg:5000")
    done = bootkit(cmdline, "--docker-host", f"unix://{sock}", "--docker-timeout", "1", attempts=2)
    assert done.returncode == 1
    assert f"waiting for the docker engine at unix://{sock} (up to 1s)" in done.stdout
    assert (f"waiting for the docker engine failed (attempt 1/2): the docker engine at unix://{sock} did not "
            f"answer within 1s: socket {sock} does not exist yet; retrying in") in done.stdout


def test_sigterm_stops_it_cleanly(tmp_path: Path) -> None:
    cmdline = write_cmdline(tmp_path / "cmdline", docker_registry="reg:5000")
    running = Running(BOOTKIT, ["--cmdline-file", str(cmdline), "--docker-host", f"unix://{tmp_path}/no.sock"],
                      tmp_path / "log")
    running.wait_for("waiting for the docker engine at")
    started = time.monotonic()
    assert running.stop() == 0
    assert time.monotonic() - started < 5
    assert "stopping on SIGTERM" in running.output
    assert "Traceback" not in running.output


def test_2021_machine_id_from_the_metadata_service(engine: docker.DockerClient, pushed_worker: Pushed,
                                                   tmp_path: Path) -> None:
    def respond(path: str) -> tuple[int, str, bytes]:
        return (200, "application/json", b'{"id": "0f3b-machine"}') if path == "/metadata" else (404, "", b"")

    with http_server(respond) as (url, requested):
        cmdline = write_cmdline(tmp_path / "cmdline", **worker_keys(pushed_worker, tinkerbell=url,
                                                                     grpc_cert_url=f"{url}/cert"))
        done = bootkit(cmdline, *TEST_CAPS)
    assert done.returncode == 0, done.stdout
    assert requested == ["/metadata"]
    assert our_env(worker(engine)) == expected_env(pushed_worker, TINKERBELL_CERT_URL=f"{url}/cert",
                                                   container_uuid="0f3b-machine")


def test_2021_metadata_service_down_is_retried_then_skipped(engine: docker.DockerClient, pushed_worker: Pushed,
                                                            tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    cmdline = write_cmdline(tmp_path / "cmdline", **worker_keys(pushed_worker, tinkerbell=url))
    done = bootkit(cmdline, *TEST_CAPS, "--metadata-attempts", "2")
    assert done.returncode == 0, done.stdout
    assert f"asking the metadata service for the machine id failed (attempt 1/2): metadata service {url}/metadata:"\
        in done.stdout
    assert "starting tink-worker without container_uuid" in done.stdout
    assert our_env(worker(engine)) == expected_env(pushed_worker)


# --- the image -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bootkit_image(base_images: dict[str, str]) -> str:
    build_image(CONTAINERS / "hook-bootkit" / "Dockerfile", BOOTKIT_IMAGE, build_args=TEST_BUILD_ARGS)
    return BOOTKIT_IMAGE


def test_dockerfile_final_stage_has_no_run_and_real_defaults() -> None:
    text = (CONTAINERS / "hook-bootkit" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    assert stages[1].startswith("--platform=$BUILDPLATFORM ${BUILD_IMAGE}")
    assert not re.search(r"^RUN ", stages[-1], flags=re.M)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-alpine", text, flags=re.M)
    assert re.search(r"^ARG BUILD_IMAGE=python:3\.\d+-alpine", text, flags=re.M)
    assert "--mount=type=secret,id=ca" in text


def test_image_builds_for_arm64_without_running_arm64_code(base_images: dict[str, str]) -> None:
    tag = "hook-test/hook-bootkit:session-arm64"
    build_image(CONTAINERS / "hook-bootkit" / "Dockerfile", tag, platform="linux/arm64",
                build_args={**TEST_BUILD_ARGS, "BASE_IMAGE": "local/python-base:arm64"})
    assert docker_cli("image", "inspect", "-f", "{{.Architecture}}", tag).stdout.strip() == "arm64"


def test_image_starts_tink_worker_through_the_socket(engine: docker.DockerClient, bootkit_image: str,
                                                     pushed_worker: Pushed, tmp_path: Path) -> None:
    cmdline = write_cmdline(tmp_path / "cmdline", **worker_keys(pushed_worker))
    done = docker_cli(
        "run", "--rm", "--network", "host", "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{cmdline}:/cmdline:ro", bootkit_image, "--cmdline-file", "/cmdline", *TEST_CAPS, *FAST,
        "--attempts", "3", check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "tink-worker is running" in output
    assert_no_secret(output)
    attrs = worker(engine)
    assert attrs["State"]["Running"] is True and attrs["HostConfig"]["Binds"] == BINDS
    assert our_env(attrs) == expected_env(pushed_worker)


def test_image_adds_little_to_its_base(bootkit_image: str) -> None:
    added = image_size(bootkit_image) - image_size("local/python-base:amd64")
    print(f"hook-bootkit adds {added / 1e6:.2f} MB to its base")
    assert added < 4_000_000
    files = docker_cli("run", "--rm", "--entrypoint", "find", bootkit_image, "/opt/hook").stdout
    assert "__pycache__" not in files and "/opt/hook/bin" not in files and "pip" not in files.split("/")
