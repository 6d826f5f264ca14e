"""hook-docker on the host, supervising a private dockerd it starts (own data root, exec root,
pidfile, unix socket, and a bridge of its own with iptables off: the machine's dockerd and its
docker0 are left alone). The CA comes from an HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import programs_helpers  # first: puts containers/ on sys.path
import pytest
from hookcommon.cmdline import HookConfig
from programs_helpers import (
    CONTAINERS,
    HOOK_DOCKER,
    HOST_CA_BUNDLE,
    Running,
    build_image,
    docker_cli,
    http_server,
    image_size,
    run_program,
    wait_until,
)

from tests.pipeline_env import command_lines

hook_docker = programs_helpers.program("hook_docker")

PASSWORD = "dind=s3cret pw"
HOOK_DOCKER_IMAGE = "hook-test/hook-docker:session"
TEST_BUILD_ARGS = {"BASE_IMAGE": "local/python-base:amd64", "BUILD_IMAGE": "local/python-base:amd64",
                   "APK_PACKAGES": ""}
# --no-network: the host's network is not ours to set up (tests/test_network.py runs that part in
# network namespaces of its own)
FAST = ["--backoff-initial", "0.2", "--backoff-max", "1", "--reboot-poll", "0.2", "--stop-timeout", "15",
        "--no-network"]


def host_ca_pem() -> str:
    """One real certificate (PEM) from the host's bundle."""
    text = HOST_CA_BUNDLE.read_text()
    start = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    return text[start:end] + "\n"


# --- pure functions --------------------------------------------------------------------------

def test_daemon_config_merges_with_the_existing_one() -> None:
    cfg = HookConfig(insecure_registries=("b:1", "a:1"), syslog_host="10.0.0.9")
    existing = {"storage-driver": "vfs", "insecure-registries": ["a:1"], "debug": False,
                "log-driver": "json-file", "log-opts": {"max-size": "10m"}}
    assert hook_docker.daemon_config(cfg, existing) == {
        "storage-driver": "vfs", "debug": False, "insecure-registries": ["a:1", "b:1"],
        "log-driver": "syslog", "log-opts": {"syslog-address": "udp://10.0.0.9:514"},
    }
    syslog = {"log-driver": "syslog", "log-opts": {"tag": "x", "syslog-address": "udp://old:514"}}
    assert hook_docker.daemon_config(cfg, syslog)["log-opts"] == {"tag": "x", "syslog-address": "udp://10.0.0.9:514"}
    assert hook_docker.daemon_config(HookConfig(), {}) == {}  # never debug: it logs request bodies


def test_pem_is_checked() -> None:
    pem = host_ca_pem()
    assert ssl.PEM_cert_to_DER_cert(hook_docker.pem_certificates(b"junk\n" + pem.encode()).decode()) \
        == ssl.PEM_cert_to_DER_cert(pem)
    two = hook_docker.pem_certificates((pem + pem).encode())
    assert two.count(b"-----BEGIN CERTIFICATE-----") == 2
    for answer in (b"<html>Not Found</html>", b"", b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----",
                   b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----"):
        with pytest.raises(ValueError):
            hook_docker.pem_certificates(answer)


def test_describe_exit() -> None:
    assert hook_docker.describe_exit(0) == "exit status 0"
    assert hook_docker.describe_exit(-9) == "killed by SIGKILL"


def test_help() -> None:
    done = run_program(HOOK_DOCKER, "--help")
    assert done.returncode == 0
    for option in ("--cmdline-file", "--config-dir", "--certs-dir", "--worker-dir", "--dockerd",
                   "--reboot-command", "insecure_registries", "-- DOCKERD_ARG"):
        assert option in done.stdout


# --- the private dockerd ---------------------------------------------------------------------

@dataclass(frozen=True)
class Private:
    """Paths of one private dockerd and hook-docker's directories, all under a short temp dir."""

    base: Path
    bridge: str

    @property
    def sock(self) -> Path:
        return self.base / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.base / "dockerd.pid"

    @property
    def config_dir(self) -> Path:
        return self.base / "etc-docker"

    @property
    def certs_dir(self) -> Path:
        return self.base / "certs.d"

    @property
    def worker_dir(self) -> Path:
        return self.base / "worker"

    def dockerd_pid(self) -> int:
        return int(self.pidfile.read_text())

    def hook_docker_args(self, cmdline: Path, *extra: str, dockerd: str = "/usr/sbin/dockerd") -> list[str]:
        return ["--cmdline-file", str(cmdline), "--config-dir", str(self.config_dir),
                "--certs-dir", str(self.certs_dir), "--worker-dir", str(self.worker_dir), "--dockerd", dockerd,
                *FAST, *extra, "--",
                "--data-root", str(self.base / "data"), "--exec-root", str(self.base / "exec"),
                "--pidfile", str(self.pidfile), "-H", f"unix://{self.sock}", "--bridge", self.bridge,
                "--iptables=false", "--containerd-namespace", "hooktest",
                "--containerd-plugins-namespace", "hooktest-plugins"]

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"unix://{self.sock}", version="auto", timeout=10)

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001 - not up (yet)
            return False


def _processes_under(base: Path) -> list[int]:
    """PIDs of processes whose command line mentions base (the dockerd and containerd we started)."""
    return [pid for pid, argv in command_lines().items() if any(str(base) in a for a in argv)]


@pytest.fixture
def private(docker_engine: None) -> Iterator[Private]:
    base = Path(tempfile.mkdtemp(prefix="hd", dir="/tmp"))  # short: unix socket paths are limited
    bridge = f"hdbr{secrets.token_hex(3)}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    p = Private(base, bridge)
    p.worker_dir.mkdir()
    try:
        yield p
    finally:
        for pid in _processes_under(base):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(base))), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def write_cmdline(path: Path, text: str) -> Path:
    path.write_text(f"BOOT_IMAGE=/vmlinuz console=ttyS0 {text} registry_password=\"{PASSWORD}\" -- init\n")
    return path


def stop_cleanly(running: Running, private: Private) -> str:
    pid = private.dockerd_pid()
    assert running.stop() == 0, running.output
    output = running.output
    assert not Path(f"/proc/{pid}").exists(), "dockerd still runs after hook-docker stopped"
    assert "dockerd stopped (exit status 0)" in output
    assert "stopped on SIGTERM" in output
    assert PASSWORD not in output and "s3cret" not in output
    assert "Traceback" not in output
    return output


def test_configures_restarts_and_stops_dockerd(private: Private, tmp_path: Path) -> None:
    private.config_dir.mkdir()
    # An existing daemon.json: its settings stay; its json-file log options would make a syslog
    # dockerd refuse to start, so they go.
    (private.config_dir / "daemon.json").write_text(json.dumps(
        {"storage-driver": "vfs", "insecure-registries": ["old.example:5000"], "log-opts": {"max-size": "10m"}}))
    cmdline = write_cmdline(
        tmp_path / "cmdline",
        "insecure_registries=reg.example:5000,10.9.0.0/16 syslog_host=127.0.0.1 "
        "HTTP_PROXY=http://proxy.example:3128 HTTPS_PROXY=http://proxy.example:3129 NO_PROXY=.example",
    )
    running = Running(HOOK_DOCKER, private.hook_docker_args(cmdline), tmp_path / "log")
    try:
        wait_until(private.answers, what="the private dockerd")
        daemon_json = private.config_dir / "daemon.json"
        assert stat.S_IMODE(daemon_json.stat().st_mode) == 0o600
        assert json.loads(daemon_json.read_text()) == {
            "storage-driver": "vfs", "insecure-registries": ["old.example:5000", "reg.example:5000", "10.9.0.0/16"],
            "log-driver": "syslog", "log-opts": {"syslog-address": "udp://127.0.0.1:514"},
        }
        info = private.client().info()
        registries = info["RegistryConfig"]
        assert registries["IndexConfigs"]["reg.example:5000"]["Secure"] is False
        assert registries["IndexConfigs"]["old.example:5000"]["Secure"] is False
        assert "10.9.0.0/16" in registries["InsecureRegistryCIDRs"]
        assert info["LoggingDriver"] == "syslog" and info["Driver"] == "vfs" and info["Debug"] is False
        shown = subprocess.run(["docker", "-H", f"unix://{private.sock}", "info"], capture_output=True,
                               text=True).stdout
        assert re.search(r"Insecure Registries:\n(\s+.+\n)*\s+reg\.example:5000", shown), shown

        pid = private.dockerd_pid()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for var in (b"HTTP_PROXY=http://proxy.example:3128", b"HTTPS_PROXY=http://proxy.example:3129",
                    b"NO_PROXY=.example"):
            assert var in environ
        assert f"--config-file\0{daemon_json}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()

        os.kill(pid, signal.SIGKILL)  # dockerd dies: hook-docker restarts it, with backoff
        running.wait_for("(killed by SIGKILL); restarting it in")
        wait_until(lambda: private.pidfile.exists() and private.dockerd_pid() != pid and private.answers(),
                   what="the restarted dockerd", timeout=60)
        assert re.search(r"ERROR dockerd exited after \d+s \(killed by SIGKILL\); restarting it in \d\.\d+s",
                         running.output)
    finally:
        output = stop_cleanly(running, private)
    # The killed dockerd's containerd was adopted and reaped: the new dockerd did not wait for a zombie.
    assert "reaped 1 exited orphan(s)" in output
    assert output.count("started dockerd (pid") == 2
    assert "proxy variables: HTTPS_PROXY, HTTP_PROXY, NO_PROXY" in output


def test_fetches_the_registry_ca_with_retries(private: Private, tmp_path: Path) -> None:
    answers: list[tuple[int, str, bytes]] = [
        (500, "text/plain", b"oops"),
        (200, "text/html", b"<html>a captive portal, not a certificate</html>"),
        (200, "application/x-pem-file", host_ca_pem().encode()),
    ]

    def respond(path: str) -> tuple[int, str, bytes]:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    with http_server(respond) as (url, requested):
        cmdline = write_cmdline(tmp_path / "cmdline", f"packet_base_url={url}/misc/ docker_registry=10.1.2.3:5000")
        running = Running(HOOK_DOCKER, private.hook_docker_args(cmdline), tmp_path / "log")
        try:
            ca = private.certs_dir / "10.1.2.3:5000" / "ca.crt"
            running.wait_for(f"saved the CA of registry 10.1.2.3:5000 to {ca}")
            wait_until(private.answers, what="the private dockerd")
        finally:
            output = stop_cleanly(running, private)
    assert set(requested) == {"/misc/ca.pem"} and len(requested) == 3
    assert ssl.PEM_cert_to_DER_cert(ca.read_text()) == ssl.PEM_cert_to_DER_cert(host_ca_pem())
    assert f"fetching the registry CA from {url}/misc/ca.pem failed (attempt 1): HTTP 500" in output
    assert "failed (attempt 2): the answer is not a PEM certificate (it starts with '<html>a captive" in output
    assert not list(ca.parent.glob(".ca.crt.*")), "a temporary file was left behind"


def test_reboot_watcher_syncs_and_reboots(private: Private, tmp_path: Path) -> None:
    marker, count = tmp_path / "rebooted", tmp_path / "count"
    # The first reboot attempt fails, the second works: the failure is logged and retried.
    script = (f'n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}; '
              f'[ "$n" -ge 1 ] && echo rebooted > {marker}')
    command = shlex.join(["sh", "-c", script])
    cmdline = write_cmdline(tmp_path / "cmdline", "")
    running = Running(HOOK_DOCKER, private.hook_docker_args(cmdline, "--reboot-command", command), tmp_path / "log")
    try:
        running.wait_for(f"watching for {private.worker_dir / 'reboot'}")
        wait_until(private.answers, what="the private dockerd")
        time.sleep(0.5)
        assert not marker.exists(), "rebooted without a request"
        (private.worker_dir / "reboot").touch()
        wait_until(marker.exists, what="the reboot command", timeout=15)
        output = running.wait_for("finished")
        assert (f"{private.worker_dir / 'reboot'} appeared: tink-worker asked for a reboot; syncing and running sh -c"
                in output)
        assert re.search(r"rebooting with sh -c .* failed \(attempt 1\): exit status 1; retrying in", output)
        assert count.read_text().strip() == "2"
    finally:
        stop_cleanly(running, private)


def test_missing_dockerd_and_broken_daemon_json_are_reported(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "daemon.json").write_text("{not json")
    cmdline = write_cmdline(tmp_path / "cmdline", "insecure_registries=r:1")
    args = ["--cmdline-file", str(cmdline), "--config-dir", str(config_dir), "--worker-dir", str(tmp_path),
            "--dockerd", str(tmp_path / "no-dockerd"), *FAST]
    running = Running(HOOK_DOCKER, args, tmp_path / "log")
    running.wait_for(f"cannot run dockerd ({tmp_path / 'no-dockerd'}): No such file or directory; "
                              "retrying in")
    wait_until(lambda: running.output.count("cannot run dockerd") >= 2, what="a second try")
    assert running.stop() == 0
    output = running.output
    assert f"{config_dir / 'daemon.json'} is not valid daemon.json" in output
    assert (config_dir / "daemon.json.invalid").read_text() == "{not json"
    assert json.loads((config_dir / "daemon.json").read_text()) == {"insecure-registries": ["r:1"]}
    assert "stopped on SIGTERM" in output and "Traceback" not in output
    assert PASSWORD not in output


# --- the image -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def hook_docker_image(base_images: dict[str, str]) -> str:
    build_image(CONTAINERS / "hook-docker" / "Dockerfile", HOOK_DOCKER_IMAGE, build_args=TEST_BUILD_ARGS)
    return HOOK_DOCKER_IMAGE


def test_dockerfile_final_stage_has_no_run_and_real_defaults() -> None:
    text = (CONTAINERS / "hook-docker" / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    assert stages[1].startswith("--platform=$BUILDPLATFORM ${BUILD_IMAGE}")
    assert not re.search(r"^RUN ", stages[-1], flags=re.M)
    assert re.search(r"^ARG BASE_IMAGE=docker:\d+\.\d+\.\d+-dind$", text, flags=re.M)
    assert re.search(r"^ARG BUILD_IMAGE=python:3\.\d+-alpine3\.\d+$", text, flags=re.M)
    assert re.search(r'^ARG APK_PACKAGES="python3 kexec-tools"$', text, flags=re.M)
    assert text.count("--mount=type=secret,id=ca") == 2


def test_image_builds_for_arm64_without_running_arm64_code(base_images: dict[str, str]) -> None:
    tag = "hook-test/hook-docker:session-arm64"
    build_image(CONTAINERS / "hook-docker" / "Dockerfile", tag, platform="linux/arm64",
                build_args={**TEST_BUILD_ARGS, "BASE_IMAGE": "local/python-base:arm64"})
    assert docker_cli("image", "inspect", "-f", "{{.Architecture}}", tag).stdout.strip() == "arm64"


def test_image_runs_the_program(hook_docker_image: str, tmp_path: Path) -> None:
    """In the image: daemon.json written, the missing dockerd (the test base has none) reported and
    retried, `docker stop` (SIGTERM) ends it with status 0."""
    etc = tmp_path / "etc-docker"
    etc.mkdir()
    cmdline = write_cmdline(tmp_path / "cmdline", "insecure_registries=reg.lan:5000")
    name = f"hook-docker-test-{secrets.token_hex(4)}"
    docker_cli("run", "-d", "--name", name, "-v", f"{etc}:/etc/docker", "-v", f"{cmdline}:/cmdline:ro",
               hook_docker_image, "--cmdline-file", "/cmdline", "--backoff-max", "1")

    def logs() -> str:
        done = docker_cli("logs", name)
        return done.stdout + done.stderr

    try:
        wait_until(lambda: "cannot run dockerd (/usr/local/bin/dockerd)" in logs(), what="hook-docker's first try")
        assert json.loads((etc / "daemon.json").read_text()) == {"insecure-registries": ["reg.lan:5000"]}
        docker_cli("stop", "-t", "10", name)
        assert docker_cli("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        output = logs()
        assert "stopped on SIGTERM" in output and PASSWORD not in output
    finally:
        docker_cli("rm", "-f", name, check=False)


def test_image_adds_little_to_its_base(hook_docker_image: str) -> None:
    added = image_size(hook_docker_image) - image_size("local/python-base:amd64")
    print(f"hook-docker adds {added / 1e6:.2f} MB to its base (without Alpine's python3)")
    assert added < 3_000_000


# --- embedded images: loaded through dockerd's own socket, then the docker socket appears ------------


def _embedded_archive(folder: Path, source: str, name: str) -> Path:
    """An archive as the pipeline embeds it (tasks/hookos/embed.py), of a local image, named `name`."""
    from tasks.core.arch import Arch
    from tasks.hookos.embed import Entry, write_archive

    spool = folder / "saved.tar"
    docker_cli("image", "save", "-o", str(spool), source)
    target = folder / "00-probe.tar"
    write_archive(spool, target, Entry(source, name), Arch.X86_64)
    spool.unlink()
    return target


def test_embedded_images_are_loaded_before_the_docker_socket_appears(private: Private, base_images: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """dockerd listens on dockerd.sock alone until the archives are loaded; then docker.sock links to it.
    A broken archive is reported (and the socket appears anyway); a restarted dockerd keeps both."""
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    name = f"hooktest/embedded-probe:{secrets.token_hex(3)}"
    _embedded_archive(embedded, base_images["busybox"].format(arch="amd64"), name)
    (embedded / "01-broken.tar").write_bytes(b"not an image archive")
    with socket.socket(socket.AF_UNIX) as stale:  # a socket left by an earlier dockerd
        stale.bind(str(private.sock))
    args = private.hook_docker_args(write_cmdline(tmp_path / "cmdline", ""), "--embedded-dir", str(embedded),
                                    "--docker-socket", str(private.sock))
    at = args.index("-H")
    del args[at:at + 2]  # dockerd's sockets are hook-docker's to choose now
    running = Running(HOOK_DOCKER, args, tmp_path / "log")
    try:
        running.wait_for("loading them into dockerd")
        assert not os.path.lexists(private.sock), "the docker socket is there before the images are loaded"
        output = running.wait_for("is ready", timeout=90)
        assert os.readlink(private.sock) == "dockerd.sock"
        assert f"-H unix://{private.base / 'dockerd.sock'}" in output
        assert f"removed the stale {private.sock}" in output
        assert output.index(f"loaded embedded image {name} from 00-probe.tar") < output.index("is ready")
        assert re.search(r"loading the embedded image archive .*01-broken.tar failed \(attempt 3/3\): .*giving up",
                         output), output
        assert "embedded image archive(s) 01-broken.tar could not be loaded" in output
        assert name in [tag for image in private.client().images.list() for tag in image.tags]

        pid = private.dockerd_pid()
        os.kill(pid, signal.SIGKILL)  # the restarted dockerd answers through the same link
        wait_until(lambda: private.pidfile.exists() and private.dockerd_pid() != pid and private.answers(),
                   what="the restarted dockerd", timeout=60)
        assert name in [tag for image in private.client().images.list() for tag in image.tags]
        assert running.output.count("embedded images loaded in") == 1  # loaded once
    finally:
        stop_cleanly(running, private)


def test_embedded_archive_names() -> None:
    folder = Path(tempfile.mkdtemp(prefix="hd-embedded-"))
    try:
        for name in ("01-b.tar", "00-a.tar", "notes.txt", ".00-a.tar.spool"):
            (folder / name).write_bytes(b"")
        (folder / "02-dir.tar").mkdir()
        assert [p.name for p in hook_docker.embedded_archives(folder)] == ["00-a.tar", "01-b.tar"]
        assert hook_docker.embedded_archives(folder / "missing") == []
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
