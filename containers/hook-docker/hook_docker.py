"""hook-docker: configure and supervise the docker engine of the installation environment.

Writes daemon.json from the kernel command line (merged with one already there), fetches the
registry's CA in the background (2021 packet_base_url), runs dockerd with the cmdline's proxies,
restarts it with capped backoff when it dies, forwards SIGTERM/SIGINT/SIGHUP to it, and reboots the
machine when tink-worker creates /worker/reboot.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import ctypes
import json
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from hookcommon import http
from hookcommon.clock import DEFAULT_SERVERS as DEFAULT_NTP_SERVERS
from hookcommon.clock import set_once
from hookcommon.cmdline import DEFAULT_CMDLINE_FILE, KEYS, HookConfig, load_config, registry_host, syslog_address
from hookcommon.log import reason, setup_logging
from hookcommon.network import Network, NetworkOptions
from hookcommon.retry import (
    Backoff,
    GaveUp,
    StepError,
    Stopping,
    StopSignal,
    add_backoff_options,
    backoff_from,
    retry,
)
from hookcommon.unixhttp import UnixHTTPConnection

PROGRAM = "hook-docker"
EXIT_CONFIG = 2
#: A dockerd that ran this long before dying starts the restart backoff from the beginning.
HEALTHY_RUN_SECONDS = 60.0

log = logging.getLogger(PROGRAM)

PR_SET_CHILD_SUBREAPER = 36

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


# --- daemon.json -----------------------------------------------------------------------------

def daemon_config(cfg: HookConfig, existing: dict[str, Any]) -> dict[str, Any]:
    """daemon.json: the existing settings with insecure registries and syslog merged in.

    No `debug: true`: dockerd's debug log records the body of every API request, and bootkit's
    container create carries tink-worker's REGISTRY_PASSWORD (seen in a boot of the Hook OS).
    """
    config = dict(existing)
    if cfg.insecure_registries:
        registries = [r for r in existing.get("insecure-registries", []) if isinstance(r, str)]
        config["insecure-registries"] = registries + [r for r in cfg.insecure_registries
                                                      if r not in registries]
    if cfg.syslog_host:
        # Options of another log driver would make dockerd refuse to start: keep only syslog's.
        opts = dict(existing.get("log-opts", {})) if existing.get("log-driver") == "syslog" else {}
        opts["syslog-address"] = syslog_address(cfg.syslog_host)
        config["log-driver"] = "syslog"
        config["log-opts"] = opts
    return config


def read_daemon_json(path: Path) -> dict[str, Any]:
    """The daemon.json already there ({} when absent); an unreadable one is set aside, with a log."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        existing = json.loads(text)
        if not isinstance(existing, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        aside = path.with_name(path.name + ".invalid")
        os.replace(path, aside)
        log.error("%s is not valid daemon.json (%s): moved it to %s and writing a new one",
                  path, reason(exc), aside)
        return {}
    return existing


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write path atomically (temporary file in the same directory, fsync, rename) with mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_daemon_json(path: Path, cfg: HookConfig) -> dict[str, Any]:
    config = daemon_config(cfg, read_daemon_json(path))
    write_file(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    log.info("wrote %s: %s", path, json.dumps(config, sort_keys=True))
    return config


# --- the registry CA (2021: packet_base_url) -------------------------------------------------

def pem_certificates(data: bytes) -> bytes:
    """The PEM certificates in data, re-joined; ValueError when there is none or one is broken."""
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        start = data[:60].decode("utf-8", "replace")
        raise ValueError(f"the answer is not a PEM certificate (it starts with {start!r})")
    certs: list[bytes] = []
    for body in blocks:
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"a PEM certificate in the answer is not base64: {exc}") from None
        if not der.startswith(b"\x30"):
            raise ValueError("a PEM certificate in the answer is not DER inside")
        encoded = base64.b64encode(der)
        lines = [encoded[i:i + 64] for i in range(0, len(encoded), 64)]
        certs.append(b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n")
    return b"".join(certs)


# --- orphans ---------------------------------------------------------------------------------

def become_subreaper() -> bool:
    """Adopt the orphans of dockerd (a killed dockerd leaves its containerd) so that they are reaped
    here, as docker-init did for the Go original; a zombie containerd makes the next dockerd wait."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(keep: Callable[[int], bool]) -> list[int]:
    """Reap exited children, except those keep(pid) says their owner waits for; peeks first
    (WNOWAIT) so that a child of ours is never taken from under its subprocess.Popen."""
    reaped: list[int] = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or keep(info.si_pid):
            return reaped
        os.waitpid(info.si_pid, 0)
        reaped.append(info.si_pid)


# --- options ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    cmdline_file: Path
    config_dir: Path
    certs_dir: Path
    worker_dir: Path
    dockerd: str
    dockerd_args: tuple[str, ...]
    reboot_command: tuple[str, ...]
    reboot_poll: float
    stop_timeout: float
    backoff: Backoff
    # the network set-up from the cmdline (hookcommon/network.py); None: leave the network alone
    network: NetworkOptions | None = None
    network_wait: float = 30.0
    # the clock, set once from NTP before dockerd (hookcommon/clock.py): servers from DHCP or ipam=, else these
    ntp_servers: tuple[str, ...] = DEFAULT_NTP_SERVERS
    ntp_timeout: float = 3.0
    # embedded images (docs/embedded.md): archives loaded before the docker socket appears
    embedded_dir: Path = Path("/usr/share/hook/embedded")
    docker_socket: Path = Path("/var/run/docker.sock")

    @property
    def daemon_json(self) -> Path:
        return self.config_dir / "daemon.json"


class HookDocker:
    """daemon.json, the CA fetcher, the reboot watcher and the dockerd supervisor."""

    network: Network | None = None

    def __init__(self, options: Options, cfg: HookConfig, stop: StopSignal) -> None:
        self.options = options
        self.cfg = cfg
        self.stop = stop
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped_proc: subprocess.Popen[bytes] | None = None
        # Held while a command of ours is spawned or runs (but dockerd): no reaping meanwhile.
        self._command_lock = threading.Lock()
        stop.on_stop(self.forward)

    def run(self) -> None:
        self.start_network()
        retry(lambda: write_daemon_json(self.options.daemon_json, self.cfg),
              what=f"writing {self.options.daemon_json}", log=log, stop=self.stop,
              backoff=self.options.backoff)
        if self.cfg.packet_base_url and self.cfg.docker_registry:
            threading.Thread(target=self._stoppable, args=(self.fetch_ca,), name="ca", daemon=True).start()
        threading.Thread(target=self._stoppable, args=(self.watch_reboot,), name="reboot",
                         daemon=True).start()
        self.start_embedded()
        self.wait_for_network()
        self.set_clock()
        self.supervise()

    def _stoppable(self, target: Callable[[], None]) -> None:
        with contextlib.suppress(Stopping):
            target()

    # --- the network (ipam=, vlan_id=, interface=, else DHCP): before dockerd ----------------

    def start_network(self) -> None:
        """Set the network up as the cmdline asks; the DHCP clients it starts run until the stop."""
        if self.options.network is None:
            log.info("network: left alone (--no-network)")
            return
        self.network = Network(self.cfg, self.options.network, stop=self.stop, backoff=self.options.backoff,
                               log=log, lock=self._command_lock)
        self.network.start()

    def wait_for_network(self) -> None:
        """dockerd waits for an address, but at most --network-wait seconds (then it starts anyway)."""
        if self.network is not None:
            self.network.wait_ready(self.options.network_wait)

    def set_clock(self) -> None:
        """Once, before dockerd (pulls speak TLS): the clock from the NTP servers the network named, else
        --ntp-server's; a failure is a console line, not fatal."""
        if self.options.ntp_timeout <= 0:
            log.info("clock: not set from NTP (--ntp-timeout 0)")
            return
        servers, origin = self.network.ntp_servers() if self.network is not None else ([], "")
        if not servers:
            servers, origin = list(self.options.ntp_servers), "default"
        set_once(servers, timeout=self.options.ntp_timeout, log=log, origin=origin)

    def _ours(self, pid: int) -> bool:
        """A child that its owner here waits for (dockerd, a DHCP client): not for the reaper."""
        proc = self._proc
        if proc is not None and proc.returncode is None and pid == proc.pid:
            return True
        return self.network is not None and pid in self.network.child_pids()

    # --- the registry CA ---------------------------------------------------------------------

    def fetch_ca(self) -> None:
        """Fetch <packet_base_url>/ca.pem into <certs-dir>/<registry>/ca.crt, retrying until it works."""
        try:
            registry = registry_host(self.cfg.docker_registry)
        except ValueError as exc:
            log.error("not fetching the registry CA: docker_registry %s", reason(exc))
            return
        url = self.cfg.packet_base_url.rstrip("/") + "/ca.pem"
        target = self.options.certs_dir / registry / "ca.crt"

        def fetch() -> None:
            try:
                answer = http.get(url, self.cfg, user_agent=PROGRAM)
            except requests.RequestException as exc:
                raise StepError(http.describe(exc)) from None
            try:
                pem = pem_certificates(answer.content)
            except ValueError as exc:
                raise StepError(str(exc)) from None
            write_file(target, pem, 0o644)

        log.info("fetching the CA of registry %s from %s", registry, url)
        retry(fetch, what=f"fetching the registry CA from {url}", log=log, stop=self.stop,
              backoff=self.options.backoff)
        log.info("saved the CA of registry %s to %s", registry, target)

    # --- the reboot watcher ------------------------------------------------------------------

    def watch_reboot(self) -> None:
        """When <worker-dir>/reboot appears: sync, then run the reboot command (retried until it works)."""
        flag = self.options.worker_dir / "reboot"
        log.info("watching for %s (tink-worker's reboot request)", flag)
        while not flag.exists():
            self.stop.sleep(self.options.reboot_poll)
        command = self.options.reboot_command

        def reboot() -> None:
            os.sync()
            try:
                with self._command_lock:
                    done = subprocess.run(command, stdin=subprocess.DEVNULL, timeout=120, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise StepError(reason(exc)) from None
            if done.returncode != 0:
                raise StepError(f"exit status {done.returncode}")

        log.warning("%s appeared: tink-worker asked for a reboot; syncing and running %s",
                    flag, shlex.join(command))
        retry(reboot, what=f"rebooting with {shlex.join(command)}", log=log, stop=self.stop,
              backoff=self.options.backoff)
        log.info("reboot command %s finished", shlex.join(command))

    # --- dockerd -----------------------------------------------------------------------------

    def dockerd_command(self) -> list[str]:
        return [self.options.dockerd, "--config-file", str(self.options.daemon_json),
                *self.options.dockerd_args, *self.embedded_dockerd_args()]

    def dockerd_env(self) -> dict[str, str]:
        return {**os.environ, **self.cfg.proxy_env()}

    def forward(self, signum: int) -> None:
        """Signal handler: pass the signal on to dockerd; on a stop, kill it if it lingers."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        stopping = signum != signal.SIGHUP and self.stop.stopping
        if stopping and self._stopped_proc is proc:
            return  # already told to stop
        proc.send_signal(signum)
        if stopping:
            self._stopped_proc = proc
            timer = threading.Timer(self.options.stop_timeout, self._kill_lingering, args=(proc,))
            timer.daemon = True
            timer.start()

    def _kill_lingering(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            log.error("dockerd (pid %d) still runs %.0fs after the stop signal: killing it",
                      proc.pid, self.options.stop_timeout)
            proc.kill()

    def supervise(self) -> None:
        """Run dockerd until a stop is requested; restart it with backoff whenever it dies."""
        command = self.dockerd_command()
        proxies = ", ".join(sorted(self.cfg.proxy_env())) or "none"
        delays = self.options.backoff.delays()
        if become_subreaper():
            threading.Thread(target=self._stoppable, args=(self._reap_forever,), name="reaper", daemon=True).start()
        while not self.stop.stopping:
            self._reap(logging.INFO)
            started = time.monotonic()
            try:
                with self._command_lock:
                    self._proc = subprocess.Popen(command, env=self.dockerd_env(), stdin=subprocess.DEVNULL)
            except OSError as exc:
                delay = next(delays)
                log.error("cannot run dockerd (%s): %s; retrying in %.1fs", command[0],
                          exc.strerror or reason(exc), delay)
                self._wait(delay)
                continue
            proc = self._proc
            log.info("started dockerd (pid %d): %s; proxy variables: %s", proc.pid, shlex.join(command),
                     proxies, extra={"console": True})
            if self.stop.stopping:  # the stop came while it was starting
                self.forward(signal.SIGTERM)
            code = proc.wait()
            ran = time.monotonic() - started
            if self.stop.stopping:
                log.info("dockerd stopped (%s)", describe_exit(code))
                return
            if ran >= HEALTHY_RUN_SECONDS:
                delays = self.options.backoff.delays()
            delay = next(delays)
            log.error("dockerd exited after %.0fs (%s); restarting it in %.1fs", ran, describe_exit(code), delay)
            self._wait(delay)

    def _reap(self, level: int) -> None:
        if not self._command_lock.acquire(blocking=False):
            return
        try:
            reaped = reap_orphans(self._ours)
        finally:
            self._command_lock.release()
        if reaped:
            log.log(level, "reaped %d exited orphan(s) (dockerd's containerd or shims): pid %s", len(reaped),
                    ", ".join(map(str, reaped)))

    def _reap_forever(self) -> None:
        """As subreaper, reap the shims and other orphans that exit while dockerd runs."""
        while True:
            self.stop.sleep(2.0)
            self._reap(logging.DEBUG)

    def _wait(self, seconds: float) -> None:
        self.stop.event.wait(seconds)

    # --- embedded images (docs/embedded.md) ---------------------------------------------------

    #: The archives found at start; while there are any, dockerd listens on dockerd_socket only.
    _embedded: tuple[Path, ...] = ()

    @property
    def dockerd_socket(self) -> Path:
        """Where dockerd listens while embedded images load; the docker socket becomes a link to it."""
        return self.options.docker_socket.parent / DOCKERD_SOCKET_NAME

    def embedded_dockerd_args(self) -> list[str]:
        return ["-H", f"unix://{self.dockerd_socket}"] if self._embedded else []

    def start_embedded(self) -> None:
        """With embedded images: dockerd gets a socket of its own, and a thread loads the images
        through it, then makes the docker socket (which bootkit waits for) appear."""
        self._embedded = tuple(embedded_archives(self.options.embedded_dir))
        if not self._embedded:
            log.info("no embedded images in %s", self.options.embedded_dir)
            return
        if any(arg in ("-H", "--host") or arg.startswith(("-H", "--host=")) for arg in self.options.dockerd_args):
            log.warning("dockerd's own -H sockets answer before the embedded images are loaded")
        remove_socket(self.options.docker_socket)
        threading.Thread(target=self._stoppable, args=(self.load_embedded,), name="embedded", daemon=True).start()

    def load_embedded(self) -> None:
        archives = self._embedded
        public, private = self.options.docker_socket, self.dockerd_socket
        started = time.monotonic()
        log.info("%d embedded image archive(s) in %s (%.1f MB): loading them into dockerd at %s before %s appears",
                 len(archives), self.options.embedded_dir, sum(_size(a) for a in archives) / 1e6, private, public)
        waited = time.monotonic()
        while not engine_answers(private):
            if time.monotonic() - waited >= 15:
                log.info("still waiting for dockerd at %s to load the embedded images", private)
                waited = time.monotonic()
            self.stop.sleep(0.2)
        loaded: list[str] = []
        failed: list[str] = []
        for archive in archives:
            try:
                loaded += retry(lambda archive=archive: self._load(archive),
                                what=f"loading the embedded image archive {archive}", log=log, stop=self.stop,
                                backoff=self.options.backoff, attempts=EMBEDDED_LOAD_ATTEMPTS)
            except GaveUp:
                failed.append(archive.name)
        retry(lambda: expose_socket(public, private), what=f"making {public} point at {private}", log=log,
              stop=self.stop, backoff=self.options.backoff)
        if failed:
            log.error("embedded image archive(s) %s could not be loaded: those images are pulled from the "
                      "registry instead", ", ".join(failed))
        log.info("embedded images loaded in %.1fs: %s; the docker socket %s -> %s is ready",
                 time.monotonic() - started, ", ".join(loaded) or "none", public, private.name)

    def _load(self, archive: Path) -> list[str]:
        """Load one archive into dockerd through its own socket (POST /images/load, what `docker load`
        does, without starting the docker CLI: seconds under emulation); the names it loaded."""
        started = time.monotonic()
        try:
            names = load_archive(self.dockerd_socket, archive, timeout=EMBEDDED_LOAD_TIMEOUT)
        except (OSError, ValueError) as exc:
            raise StepError(f"POST /images/load to {self.dockerd_socket}: {reason(exc)}") from None
        log.info("loaded embedded image %s from %s (%.1f MB) in %.1fs", ", ".join(names) or "(no name)",
                 archive.name, _size(archive) / 1e6, time.monotonic() - started)
        return names

# --- embedded images: helpers --------------------------------------------------------------------

#: dockerd's own socket, beside the docker socket, while embedded images load.
DOCKERD_SOCKET_NAME = "dockerd.sock"
EMBEDDED_LOAD_ATTEMPTS = 3
EMBEDDED_LOAD_TIMEOUT = 900.0


def embedded_archives(folder: Path) -> list[Path]:
    """The image archives (`docker load` format, `*.tar`) in folder, in name order; [] when none."""
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(".tar") and p.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        log.error("cannot list the embedded images in %s (%s): none is loaded", folder, reason(exc))
        return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def engine_answers(path: Path, timeout: float = 5.0) -> bool:
    """True when a docker engine answers GET /_ping on the unix socket at path."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except (OSError, ValueError):
        return False
    finally:
        conn.close()


def load_archive(path: Path, archive: Path, *, timeout: float) -> list[str]:
    """POST an image archive to the engine on the unix socket at path; the names it loaded.

    ValueError with the engine's message when it refuses the archive."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        with archive.open("rb") as body:
            conn.request("POST", "/images/load?quiet=1", body=body,
                         headers={"Content-Type": "application/x-tar", "Content-Length": str(_size(archive))})
            answer = conn.getresponse()
            text = answer.read().decode("utf-8", "replace")
    finally:
        conn.close()
    names: list[str] = []
    for line in filter(None, (x.strip() for x in text.splitlines())):
        try:
            event = json.loads(line)
        except ValueError:
            event = {"message": line}
        error = event.get("errorDetail", {}).get("message") or event.get("error")
        if answer.status != 200 or error:
            raise ValueError(f"HTTP {answer.status}: {error or event.get('message') or line}")
        stream = str(event.get("stream", ""))
        if stream.startswith("Loaded image"):
            names.append(stream.split(":", 1)[1].strip())
    if answer.status != 200:
        raise ValueError(f"HTTP {answer.status} {answer.reason}")
    return names


def remove_socket(path: Path) -> None:
    """Remove a stale docker socket (or our link) left at path; anything else there is left alone."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
        path.unlink(missing_ok=True)
        log.info("removed the stale %s", path)
    else:
        log.warning("%s exists and is not a socket: left alone", path)


def expose_socket(public: Path, private: Path) -> None:
    """Make public a symbolic link to private (relative when both are in one folder), atomically."""
    target = private.name if private.parent == public.parent else str(private)
    tmp = public.with_name(f".{public.name}.{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, public)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StepError(reason(exc)) from None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def add_network_options(parser: argparse.ArgumentParser) -> None:
    net = parser.add_argument_group("network (set up from ipam=, vlan_id=, interface=, else DHCP; before dockerd)")
    net.add_argument("--no-network", action="store_true",
                     help="leave the network alone (to run hook-docker on a machine whose network is set up)")
    net.add_argument("--network-wait", type=float, default=30.0, metavar="SECONDS",
                     help="dockerd waits at most this long for a DHCP lease (default: %(default)s)")
    net.add_argument("--link-wait", type=float, default=10.0, metavar="SECONDS",
                     help="how long the NIC named by ipam=, hw_addr= or interface= may take to appear "
                          "(default: %(default)s)")
    net.add_argument("--resolv-conf", type=Path, default=Path("/etc/resolv.conf"), metavar="PATH",
                     help="written in place from ipam= or the DHCP leases (default: %(default)s)")
    net.add_argument("--ntp-server", action="append", default=None, metavar="NAME",
                     help="NTP server to set the clock from when neither DHCP nor ipam= names one (repeatable; "
                          f"default: {', '.join(DEFAULT_NTP_SERVERS)})")
    net.add_argument("--ntp-timeout", type=float, default=3.0, metavar="SECONDS",
                     help="how long each NTP server may take to answer; 0: do not set the clock (default: "
                          "%(default)s)")


def network_options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if args.network_wait < 0 or args.link_wait < 0 or args.ntp_timeout < 0:
        parser.error("--network-wait, --link-wait and --ntp-timeout must be >= 0")
    clock = {"ntp_servers": tuple(args.ntp_server or DEFAULT_NTP_SERVERS), "ntp_timeout": args.ntp_timeout}
    if args.no_network:
        return {"network": None, **clock}
    return {"network": NetworkOptions(resolv_conf=args.resolv_conf, link_wait=args.link_wait),
            "network_wait": args.network_wait, **clock}


def add_embedded_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("embedded images (loaded into dockerd before the docker socket appears)")
    group.add_argument("--embedded-dir", type=Path, default=Options.embedded_dir, metavar="DIR",
                       help="image archives (*.tar, `docker load` format) to load, in name order; none there: "
                            "dockerd starts as usual (default: %(default)s)")
    group.add_argument("--docker-socket", type=Path, default=Options.docker_socket, metavar="PATH",
                       help="with embedded images: the socket bootkit and tink-worker use, made a link to "
                            f"dockerd's own {DOCKERD_SOCKET_NAME} beside it once they are loaded "
                            "(default: %(default)s)")


def parse_args(argv: Sequence[str] | None) -> Options:
    keys = "\n".join(f"  {key:24} {text}" for key, text in KEYS.items()
                     if key in ("insecure_registries", "syslog_host", "docker_registry", "packet_base_url",
                                "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ipam", "vlan_id", "hw_addr",
                                "interface"))
    parser = argparse.ArgumentParser(
        prog=PROGRAM, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [-- DOCKERD_ARG ...]",
        description="Configure and supervise dockerd from the kernel command line. Arguments after "
                    "'--' are passed on to dockerd.",
        epilog=f"kernel command line keys read:\n{keys}\n\nexit status: 0 stopped by SIGTERM/SIGINT, "
               f"2 configuration error",
    )
    parser.add_argument("--cmdline-file", type=Path, metavar="PATH", default=DEFAULT_CMDLINE_FILE,
                        help="kernel command line to read (default: %(default)s)")
    parser.add_argument("--config-dir", type=Path, metavar="DIR", default=Path("/etc/docker"),
                        help="where daemon.json is written (default: %(default)s)")
    parser.add_argument("--certs-dir", type=Path, metavar="DIR", default=Path("/etc/docker/certs.d"),
                        help="where the registry CA goes, as <dir>/<registry>/ca.crt (default: %(default)s)")
    parser.add_argument("--worker-dir", type=Path, metavar="DIR", default=Path("/worker"),
                        help="tink-worker's directory; <dir>/reboot asks for a reboot (default: %(default)s)")
    parser.add_argument("--dockerd", default="/usr/local/bin/dockerd", metavar="PATH",
                        help="the dockerd binary (default: %(default)s)")
    parser.add_argument("--reboot-command", default="/sbin/reboot", metavar="COMMAND",
                        help="command run (after a sync) to reboot, split like a shell would "
                             "(default: %(default)s)")
    parser.add_argument("--reboot-poll", type=float, default=1.0, metavar="SECONDS",
                        help="how often to look for the reboot request (default: %(default)s)")
    parser.add_argument("--stop-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="how long dockerd may take to stop before it is killed (default: %(default)s)")
    add_backoff_options(parser)
    add_network_options(parser)
    add_embedded_options(parser)
    parser.add_argument("dockerd_args", nargs="*", metavar="DOCKERD_ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    reboot_command = tuple(shlex.split(args.reboot_command))
    if not reboot_command:
        parser.error("--reboot-command must not be empty")
    if args.reboot_poll <= 0:
        parser.error("--reboot-poll must be > 0")
    return Options(
        cmdline_file=args.cmdline_file, config_dir=args.config_dir, certs_dir=args.certs_dir,
        worker_dir=args.worker_dir, dockerd=args.dockerd, dockerd_args=tuple(args.dockerd_args),
        reboot_command=reboot_command, reboot_poll=args.reboot_poll, stop_timeout=args.stop_timeout,
        backoff=backoff_from(args, parser),
        **network_options_from(args, parser),
        embedded_dir=args.embedded_dir, docker_socket=args.docker_socket,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    setup_logging(PROGRAM)
    stop = StopSignal(raise_in_main=False)
    stop.install((signal.SIGTERM, signal.SIGINT))
    cfg = load_config(options.cmdline_file, log)
    if cfg is None:
        return EXIT_CONFIG
    hook_docker = HookDocker(options, cfg, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: hook_docker.forward(signum))
    with contextlib.suppress(Stopping):
        hook_docker.run()
    log.info("stopped on %s", stop.signal_name or "request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
