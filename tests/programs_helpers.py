"""Helpers for the tests of the in-image programs (hook-bootkit, hook-docker): run them on the
host as the image would, build their images, serve HTTP on loopback."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS = ROOT / "containers"
COMMON = CONTAINERS / "common"
BOOTKIT = CONTAINERS / "hook-bootkit" / "hook_bootkit.py"
HOOK_DOCKER = CONTAINERS / "hook-docker" / "hook_docker.py"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# Every file under containers/ goes into an image tag's hash: never leave bytecode there.
sys.dont_write_bytecode = True
for _path in (COMMON, BOOTKIT.parent, HOOK_DOCKER.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def program(name: str) -> ModuleType:
    """A program's module (hook_bootkit, hook_docker), imported from containers/ for unit tests."""
    return importlib.import_module(name)


def program_env(**extra: str) -> dict[str, str]:
    """The environment a program runs with on the host: our modules first, no bytecode written."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "PYTHONPATH")}
    env.update(PYTHONPATH=str(COMMON), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_program(program: Path, *args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a program to its end; stdout and stderr together in .stdout."""
    return subprocess.run(
        [sys.executable, str(program), *map(str, args)], env=program_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )


class Running:
    """A program running in the background with all its output in a log file."""

    def __init__(self, program: Path, args: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(program), *args], env=program_env(), stdin=subprocess.DEVNULL,
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, *, timeout: float = 30) -> str:
        """Wait until text is in the output; fail with the output when it does not come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output
            if text in out:
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the output (exit {self.proc.poll()}):\n{self.output[-4000:]}")

    def stop(self, *, timeout: float = 30) -> int:
        """SIGTERM it (if it still runs) and return its exit status; SIGKILL its group if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)
            raise
        finally:
            self._out.close()


def wait_until(predicate: Callable[[], bool], *, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


Responder = Callable[[str], tuple[int, str, bytes]]


@contextmanager
def http_server(respond: Responder) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 only: respond(path) -> (status, content type, body).

    Yields (base URL, list of requested paths)."""
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requested.append(self.path)
            status, ctype, body = respond(self.path)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def build_image(dockerfile: Path, tag: str, *, build_args: dict[str, str], platform: str = "linux/amd64",
                context: Path = CONTAINERS) -> None:
    """docker buildx build --load, the way the pipeline builds (the host CA as the 'ca' secret)."""
    cmd = ["docker", "buildx", "build", "--platform", platform, "--load", "-t", tag, "-f", str(dockerfile),
           "--secret", f"id=ca,src={HOST_CA_BUNDLE}"]
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    done = subprocess.run([*cmd, str(context)], capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"build of {tag} failed:\n{done.stderr[-4000:]}")


def docker_cli(*args: str, check: bool = True, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", *(["--config", str(config)] if config else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done


def image_size(ref: str) -> int:
    return int(docker_cli("image", "inspect", "-f", "{{.Size}}", ref).stdout.strip())
