"""The clock, set once from NTP before anything speaks TLS (hook-docker does it before dockerd).

A server without a battery-backed clock boots in 1970, and then every certificate (the registry's,
Tinkerbell's gRPC) looks not yet valid. So, once, with a short timeout: an SNTP query (RFC 4330) to
the NTP servers that DHCP or ipam= gave, else to a pool; the first good answer sets the clock.
A failure is one line on the console and in the log, never fatal. Standard library only.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

NTP_PORT = 123
#: Seconds from the NTP era (1900) to the Unix epoch (1970).
NTP_EPOCH = 2208988800
DEFAULT_SERVERS = ("pool.ntp.org",)


@dataclass(frozen=True)
class Answer:
    server: str
    address: str
    stratum: int
    #: seconds to add to this machine's clock
    offset: float
    delay: float


class NoAnswer(Exception):
    """Why a server gave no usable time (one line)."""


def _ntp_time(value: float) -> bytes:
    seconds = value + NTP_EPOCH
    return struct.pack("!II", int(seconds), int((seconds % 1) * 2**32))


def _from_ntp(data: bytes) -> float:
    seconds, fraction = struct.unpack("!II", data)
    return seconds - NTP_EPOCH + fraction / 2**32


def _resolve(server: str, port: int, timeout: float) -> list[tuple[int, str]]:
    """(family, address) of server, within timeout (getaddrinfo has no timeout of its own)."""
    found: list[tuple[int, str]] = []
    error: list[BaseException] = []

    def look() -> None:
        try:
            for family, _, _, _, sockaddr in socket.getaddrinfo(server, port, type=socket.SOCK_DGRAM):
                if family in (socket.AF_INET, socket.AF_INET6):
                    found.append((family, str(sockaddr[0])))
        except OSError as exc:
            error.append(exc)

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NoAnswer(f"{server}: no DNS answer within {timeout:g}s")
    if error or not found:
        raise NoAnswer(f"{server}: cannot be resolved ({error[0] if error else 'no address'})")
    return found


def query(server: str, *, timeout: float, port: int = NTP_PORT) -> Answer:
    """One SNTP request to server; NoAnswer when none comes in time, or it is not a usable time."""
    deadline = time.monotonic() + timeout
    family, address = _resolve(server, port, timeout)[0]
    request = bytearray(48)
    request[0] = (0 << 6) | (4 << 3) | 3  # no leap warning, version 4, client
    sent = time.time()
    request[40:48] = _ntp_time(sent)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock.sendto(bytes(request), (address, port))
            while True:
                data, peer = sock.recvfrom(512)
                if data[24:32] == bytes(request[40:48]):  # the answer to this request, not a stray one
                    break
        except TimeoutError:
            raise NoAnswer(f"{server} ({address}): no answer within {timeout:g}s") from None
        except OSError as exc:
            raise NoAnswer(f"{server} ({address}): {exc.strerror or exc}") from None
    received = time.time()
    if len(data) < 48:
        raise NoAnswer(f"{server} ({address}): a short answer ({len(data)} bytes)")
    leap, mode, stratum = data[0] >> 6, data[0] & 7, data[1]
    if mode != 4 or leap == 3 or not 1 <= stratum <= 15:
        raise NoAnswer(f"{server} ({address}): not synchronised itself (stratum {stratum}, leap {leap})")
    server_received, server_sent = _from_ntp(data[32:40]), _from_ntp(data[40:48])
    offset = ((server_received - sent) + (server_sent - received)) / 2
    delay = (received - sent) - (server_sent - server_received)
    return Answer(server, address, stratum, offset, delay)


def set_once(servers: Sequence[str], *, timeout: float, log: logging.Logger, origin: str) -> Answer | None:
    """Try each server once (timeout seconds each); set the clock from the first that answers.

    Returns the answer, or None when none answered or the clock could not be set (said on the
    console: TLS may fail while the clock is wrong; the OS goes on)."""
    problems = []
    for server in servers:
        try:
            answer = query(server, timeout=timeout)
        except NoAnswer as exc:
            problems.append(str(exc))
            continue
        try:
            time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) + answer.offset)
        except OSError as exc:
            log.warning("clock: %s (stratum %d) says the clock is %+.1fs off, but it cannot be set: %s", server,
                        answer.stratum, answer.offset, exc.strerror or exc, extra={"console": True})
            return None
        log.info("clock: set from %s %s(stratum %d, %s servers): it was %+.3fs off", server,
                 f"({answer.address}) " if answer.address != server else "", answer.stratum, origin, answer.offset,
                 extra={"console": True})
        return answer
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    log.warning("clock: no NTP answer (%s); it stays at %s: TLS fails if it is far off", "; ".join(problems) or
                "no server", now, extra={"console": True})
    return None
