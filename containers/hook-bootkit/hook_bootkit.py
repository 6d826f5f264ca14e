"""hook-bootkit: pull tink-worker and run it, configured from the kernel command line.

Waits for the docker engine, pulls the tink-worker image (with the registry credentials when the
image lives on docker_registry), replaces any old 'tink-worker' container with a new one
(privileged, host network, /worker, the docker socket, /dev and the host's /run bound in) and checks
that it runs.
Every failure is logged with its reason and retried with capped backoff.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import docker
import docker.errors
import requests
from docker.auth import resolve_repository_name
from docker.utils import parse_repository_tag
from hookcommon import http
from hookcommon.cmdline import DEFAULT_CMDLINE_FILE, KEYS, HookConfig, load_config, registry_host
from hookcommon.log import reason, setup_logging
from hookcommon.retry import Backoff, GaveUp, StepError, Stopping, StopSignal, add_backoff_options, backoff_from, retry

PROGRAM = "hook-bootkit"
CONTAINER_NAME = "tink-worker"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
#: Paths (as the docker engine sees them, in hook-docker's mount namespace) bound into tink-worker at
#: the same place: /worker, the docker socket, /dev. And the host's /run (--host-run: hook-docker has
#: the host's / at /host_root) as /run, with udev's database (/run/udev), which tink-agent's hardware
#: detection (ghw) reads.
WORKER_BINDS = ("/worker:/worker", "/var/run/docker.sock:/var/run/docker.sock", "/dev:/dev")
HOST_RUN = "/host_root/run"
METADATA_PORT = 50061
EXIT_CONFIG = 2
EXIT_GAVE_UP = 1

log = logging.getLogger(PROGRAM)
T = TypeVar("T")

#: Names of Docker Hub's registry that mean the same as the 'docker.io' of a short image name.
_DOCKER_HUB = {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}


@contextlib.contextmanager
def engine_errors(doing: str) -> Iterator[None]:
    """Turn the docker SDK's errors into a StepError that says what was being done and why."""
    try:
        yield
    except docker.errors.APIError as exc:
        raise StepError(f"{doing}: {reason(Exception(exc.explanation or exc))}") from None
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise StepError(f"{doing}: lost the docker engine: {reason(exc)}") from None


def _registry_key(registry: str) -> str:
    registry = registry.lower()
    return _DOCKER_HUB.get(registry, registry)


def worker_image(cfg: HookConfig) -> str:
    """tink_worker_image, else <docker_registry>/tink-worker:latest; StepError when neither is set."""
    if cfg.tink_worker_image:
        return cfg.tink_worker_image
    if cfg.docker_registry:
        return f"{registry_host(cfg.docker_registry)}/tink-worker:latest"
    raise StepError("no tink-worker image: set tink_worker_image=IMAGE or docker_registry=HOST[:PORT] "
                    "on the kernel command line")


def pull_auth(cfg: HookConfig, image: str) -> dict[str, str] | None:
    """Registry credentials for image: only when it lives on docker_registry and a user is given."""
    if not cfg.docker_registry or not (cfg.registry_username or cfg.registry_password):
        return None
    repository, _ = parse_repository_tag(image)
    image_registry, _ = resolve_repository_name(repository)
    if _registry_key(image_registry) != _registry_key(registry_host(cfg.docker_registry)):
        return None
    return {"username": cfg.registry_username, "password": cfg.registry_password}


def worker_env(cfg: HookConfig, container_uuid: str | None) -> list[str]:
    """tink-worker's environment: every variable is set, empty when its key is absent."""
    env = {
        "DOCKER_REGISTRY": cfg.docker_registry,
        "REGISTRY_USERNAME": cfg.registry_username,
        "REGISTRY_PASSWORD": cfg.registry_password,
        "TINKERBELL_GRPC_AUTHORITY": cfg.grpc_authority,
        "TINKERBELL_TLS": cfg.tinkerbell_tls,
        "TINKERBELL_INSECURE_TLS": cfg.tinkerbell_insecure_tls,
        "WORKER_ID": cfg.worker_id,
        "ID": cfg.worker_id,
        "HTTP_PROXY": cfg.http_proxy,
        "HTTPS_PROXY": cfg.https_proxy,
        "NO_PROXY": cfg.no_proxy,
    }
    if cfg.grpc_cert_url:
        env["TINKERBELL_CERT_URL"] = cfg.grpc_cert_url
    if container_uuid:
        env["container_uuid"] = container_uuid
    return [f"{key}={value}" for key, value in env.items()]


def metadata_url(tinkerbell: str) -> str:
    """<tinkerbell>:50061/metadata; http:// when no scheme is given, a port given is kept."""
    base = tinkerbell.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    parts = urlsplit(base)
    if parts.port is None:
        base = f"{parts.scheme}://{parts.netloc}:{METADATA_PORT}{parts.path}"
    return f"{base}/metadata"


@dataclass(frozen=True)
class Options:
    cmdline_file: Path
    docker_host: str
    docker_timeout: float
    attempts: int
    backoff: Backoff
    metadata_attempts: int
    running_check: float
    test_only_capabilities: tuple[str, ...] | None
    host_run: str = HOST_RUN


class Bootkit:
    """One run: engine, machine id, pull, replace and start tink-worker."""

    def __init__(self, options: Options, cfg: HookConfig, stop: StopSignal) -> None:
        self.options = options
        self.cfg = cfg
        self.stop = stop
        if cfg.docker_registry:
            registry_host(cfg.docker_registry)  # a ValueError here is a configuration error
        self.image = worker_image(cfg)
        self.client: docker.DockerClient | None = None

    def _retry(self, action: Callable[[], T], what: str, attempts: int | None = None,
               level: int = logging.ERROR) -> T:
        return retry(action, what=what, log=log, stop=self.stop, backoff=self.options.backoff,
                     attempts=self.options.attempts if attempts is None else attempts, level=level)

    def run(self) -> str:
        """Do everything; returns the running container's id."""
        log.info("tink-worker image: %s", self.image)
        self.client = self._retry(self.connect, "waiting for the docker engine")
        container_uuid = self.machine_id() if self.cfg.tinkerbell else None
        self._retry(self.pull, f"pulling {self.image}")
        return self._retry(lambda: self.start_worker(container_uuid), "starting tink-worker")

    # --- the engine --------------------------------------------------------------------------

    def connect(self) -> docker.DockerClient:
        """Poll the engine until it answers or --docker-timeout passes."""
        host = self.options.docker_host
        socket = Path(host[len("unix://"):]) if host.startswith("unix://") else None
        deadline = time.monotonic() + self.options.docker_timeout
        log.info("waiting for the docker engine at %s (up to %.0fs)", host, self.options.docker_timeout)
        last_report = time.monotonic()
        why = ""
        while True:
            if socket is not None and not socket.exists():
                why = f"socket {socket} does not exist yet"
            else:
                try:
                    client = docker.DockerClient(base_url=host, version="auto", timeout=60)
                    version = client.version()
                except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
                    why = reason(exc)
                else:
                    log.info("docker engine %s answers at %s (API %s)", version.get("Version", "?"),
                             host, client.api.api_version)
                    return client
            now = time.monotonic()
            if now >= deadline:
                raise StepError(f"the docker engine at {host} did not answer within "
                                f"{self.options.docker_timeout:.0f}s: {why}")
            if now - last_report >= 10:
                log.info("still waiting for the docker engine at %s: %s", host, why)
                last_report = now
            self.stop.sleep(0.5)

    # --- 2021 mode: the machine id from the metadata service ---------------------------------

    def machine_id(self) -> str | None:
        """The id from <tinkerbell>:50061/metadata, or None (with a warning) when it stays down."""
        url = metadata_url(self.cfg.tinkerbell)

        def query() -> str:
            try:
                answer = http.get(url, self.cfg, user_agent=PROGRAM).json()
            except requests.RequestException as exc:
                raise StepError(f"metadata service {url}: {http.describe(exc)}") from None
            except ValueError:
                raise StepError(f"metadata service {url} did not answer JSON") from None
            machine = answer.get("id") if isinstance(answer, dict) else None
            if not isinstance(machine, str) or not machine:
                raise StepError(f"metadata from {url} has no 'id'")
            return machine

        try:
            machine = self._retry(query, "asking the metadata service for the machine id",
                                  attempts=self.options.metadata_attempts, level=logging.WARNING)
        except GaveUp as exc:
            log.warning("starting tink-worker without container_uuid: %s", exc)
            return None
        log.info("machine id from %s: %s", url, machine)
        return machine

    # --- the image ---------------------------------------------------------------------------

    def _image_present(self) -> bool:
        assert self.client is not None
        try:
            self.client.images.get(self.image)
        except docker.errors.ImageNotFound:
            return False
        return True

    def pull(self) -> None:
        """Pull the image; when that fails but the image is already here (embedded), go on."""
        try:
            self._pull()
        except StepError as exc:
            with engine_errors("looking for an embedded copy"):
                present = self._image_present()
            if not present:
                raise
            log.warning("%s; using the copy of %s already present (embedded)", exc, self.image)

    def _pull(self) -> None:
        assert self.client is not None
        auth = pull_auth(self.cfg, self.image)
        repository, tag = parse_repository_tag(self.image)
        log.info("pulling %s (%s)", self.image,
                 f"as user {self.cfg.registry_username!r}" if auth else "no credentials")
        seen: set[str] = set()
        with engine_errors("pull failed"):
            for event in self.client.api.pull(repository, tag=tag or "latest", stream=True,
                                              decode=True, auth_config=auth):
                if "error" in event:
                    raise StepError(f"pull failed: {reason(Exception(event['error']))}")
                status = str(event.get("status", ""))
                # Progress events repeat for every chunk: log each layer's state changes once.
                line = f"{event.get('id', '')} {status}".strip()
                if status and not event.get("progressDetail") and line not in seen:
                    seen.add(line)
                    log.info("pull: %s", line)
            present = self._image_present()
        if not present:
            raise StepError(f"pull finished but {self.image} is not in the engine")

    # --- the container -----------------------------------------------------------------------

    def _remove_old(self) -> None:
        assert self.client is not None
        try:
            old = self.client.containers.get(CONTAINER_NAME)
        except docker.errors.NotFound:
            return
        log.info("removing the old %s container %s (%s)", CONTAINER_NAME, old.short_id, old.status)
        with contextlib.suppress(docker.errors.NotFound):
            old.remove(force=True)

    def host_config(self) -> dict[str, Any]:
        assert self.client is not None
        caps = self.options.test_only_capabilities
        extra: dict[str, Any] = {"privileged": True} if caps is None else {"cap_add": list(caps) or None}
        binds = [*WORKER_BINDS, f"{self.options.host_run}:/run"]
        return self.client.api.create_host_config(binds=binds, network_mode="host", **extra)

    def start_worker(self, container_uuid: str | None) -> str:
        """Replace the tink-worker container and check that the new one keeps running."""
        assert self.client is not None
        api = self.client.api
        with engine_errors(f"removing the old {CONTAINER_NAME} container"):
            self._remove_old()
        with engine_errors(f"creating the {CONTAINER_NAME} container"):
            created = api.create_container(self.image, name=CONTAINER_NAME,
                                           environment=worker_env(self.cfg, container_uuid),
                                           host_config=self.host_config())
        cid: str = created["Id"]
        log.info("created container %s (%s) from %s", CONTAINER_NAME, cid[:12], self.image)
        with engine_errors(f"starting the {CONTAINER_NAME} container {cid[:12]}"):
            api.start(cid)
        with engine_errors(f"checking the {CONTAINER_NAME} container {cid[:12]}"):
            self._check_running(cid)
        log.info("%s is running (container %s, image %s)", CONTAINER_NAME, cid[:12], self.image,
                 extra={"console": True})
        return cid

    def _check_running(self, cid: str) -> None:
        """The container must still run --running-check seconds after its start."""
        assert self.client is not None
        deadline = time.monotonic() + self.options.running_check
        while True:
            state = self.client.api.inspect_container(cid)["State"]
            if not state.get("Running"):
                tail = self.client.api.logs(cid, tail=5).decode("utf-8", "replace").strip()
                output = f"; its last output: {' | '.join(tail.splitlines())}" if tail else ""
                raise StepError(f"{CONTAINER_NAME} stopped right after its start "
                                f"({state.get('Status')}, exit code {state.get('ExitCode')}){output}")
            if time.monotonic() >= deadline:
                return
            self.stop.sleep(0.25)


def parse_args(argv: Sequence[str] | None) -> Options:
    keys = "\n".join(f"  {key:24} {text}" for key, text in KEYS.items())
    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start tink-worker on the docker engine, configured from the kernel command line.",
        epilog=f"kernel command line keys:\n{keys}\n\nexit status: 0 tink-worker runs (or stopped by "
               f"SIGTERM/SIGINT), 1 gave up after --attempts, 2 configuration error",
    )
    parser.add_argument("--cmdline-file", type=Path, metavar="PATH", default=DEFAULT_CMDLINE_FILE,
                        help="kernel command line to read (default: %(default)s)")
    parser.add_argument("--docker-host", default=DEFAULT_DOCKER_HOST, metavar="URL",
                        help="docker engine address (default: %(default)s)")
    parser.add_argument("--docker-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long one wait for the engine lasts before it counts as a failed "
                             "attempt (default: %(default)s)")
    parser.add_argument("--attempts", type=int, default=0, metavar="N",
                        help="attempts per step before giving up; 0 retries for ever (default: %(default)s)")
    add_backoff_options(parser)
    parser.add_argument("--metadata-attempts", type=int, default=5, metavar="N",
                        help="2021 mode: metadata queries before going on without container_uuid "
                             "(default: %(default)s)")
    parser.add_argument("--running-check", type=float, default=3.0, metavar="SECONDS",
                        help="how long tink-worker must keep running after its start (default: %(default)s)")
    parser.add_argument("--host-run", default=HOST_RUN, metavar="PATH",
                        help="the host's /run as the docker engine sees it, bound into tink-worker as /run "
                             "(udev's database; default: %(default)s)")
    parser.add_argument("--test-only-capabilities", metavar="CAP,CAP", default=None,
                        help="TEST ONLY, never in production: run tink-worker unprivileged with these "
                             "capabilities (may be empty) instead of --privileged, for machines that "
                             "cannot start privileged containers")
    args = parser.parse_args(argv)
    if args.attempts < 0 or args.metadata_attempts < 1 or args.docker_timeout <= 0:
        parser.error("--attempts must be >= 0, --metadata-attempts >= 1, --docker-timeout > 0")
    caps = None
    if args.test_only_capabilities is not None:
        caps = tuple(c.strip().upper() for c in args.test_only_capabilities.split(",") if c.strip())
    return Options(
        cmdline_file=args.cmdline_file, docker_host=args.docker_host, docker_timeout=args.docker_timeout,
        attempts=args.attempts, backoff=backoff_from(args, parser),
        metadata_attempts=args.metadata_attempts, running_check=args.running_check,
        test_only_capabilities=caps, host_run=args.host_run,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    setup_logging(PROGRAM)
    stop = StopSignal(raise_in_main=True)
    stop.install()
    try:
        cfg = load_config(options.cmdline_file, log)
        if cfg is None:
            return EXIT_CONFIG
        if options.test_only_capabilities is not None:
            log.warning("TEST ONLY: tink-worker runs unprivileged with capabilities [%s]",
                        ",".join(options.test_only_capabilities))
        try:
            bootkit = Bootkit(options, cfg, stop)
        except (StepError, ValueError) as exc:
            log.error("%s", reason(exc))
            return EXIT_CONFIG
        bootkit.run()
        return 0
    except Stopping as exc:
        log.info("stopping on %s", exc)
        return 0
    except GaveUp:
        log.error("giving up: tink-worker is not running (exit status %d)", EXIT_GAVE_UP)
        return EXIT_GAVE_UP


if __name__ == "__main__":
    sys.exit(main())
