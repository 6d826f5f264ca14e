"""The network, set up from the kernel command line before anything needs it (hook-docker does it
before it starts dockerd). Hook latest's keys, with Hook latest's meaning:

- `ipam=<mac>:<vlan-id>:<ip>:<netmask>:<gateway>:<hostname>:<dns,...>:<search,...>:<ntp,...>`:
  a static address on the NIC with that MAC (hyphen-separated), on `<nic>.<vlan-id>` when the
  vlan field is set; the default route, /etc/resolv.conf and the host name follow it. No DHCP.
- `vlan_id=<1-4094>` + `hw_addr=<mac>`: DHCP only on `<nic>.<vlan_id>` of the NIC with that MAC.
  Without `hw_addr=` no VLAN is made (Hook latest's rule since 2025: with predictable NIC names
  there is no eth0 to guess); that is a bad value like any other (below).
- `interface=<name>`: DHCP only on that interface.
- none of them: DHCP on every interface whose name starts with "e" (Hook latest's dhcpcd
  `--allowinterfaces e*`: udev's predictable names en*, and eth*) that has no IPv4 address yet.

A lease's classless static routes (option 121, RFC 3442: the router option is then ignored), its
host name (set unless ipam= named one) and its NTP servers (hookcommon.clock) are used too.
IPv6 is the kernel's own SLAAC on every interface that is up (router advertisements); no DHCPv6.

Rule for a bad value: the keys are tried in that order (ipam=, vlan_id=, interface=). A value
that is malformed, or that names no interface, is one line (key, the bad part, the fix) on the
console and in the log, and the next key given is tried; when none is left, DHCP runs on every
"e" interface. The OS never comes up without a network because of a bad value.

DHCP is busybox udhcpc, one per interface, supervised (restarted with backoff). Its event script
(udhcpc-event.sh, next to this file) only prints the event on udhcpc's stdout, which is a pipe read
here: addresses, routes and resolv.conf are set by this module, with busybox (or iproute2) `ip`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import re
import shlex
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Union

from hookcommon.cmdline import HookConfig
from hookcommon.log import reason
from hookcommon.retry import Backoff, Stopping, StopSignal

#: udhcpc's event script: prints each event as one EVENT_PREFIX line (see udhcpc-event.sh).
DHCP_SCRIPT = Path(__file__).resolve().with_name("udhcpc-event.sh")
EVENT_PREFIX = "@hook-dhcp-event\t"
#: A udhcpc that ran this long before exiting restarts its backoff from the beginning.
HEALTHY_RUN_SECONDS = 60.0
#: The kernel's IFNAMSIZ - 1.
IFNAME_MAX = 15
#: sethostname(2) takes at most this many bytes (HOST_NAME_MAX).
HOSTNAME_MAX = 64
#: ioctls for an interface's (primary) IPv4 address and netmask: no tool needed to look
SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
IPAM_FIELDS = ("MAC address", "VLAN id", "IP address", "netmask", "gateway", "hostname", "DNS servers",
               "search domains", "NTP servers")
IPAM_FORMAT = "ipam=<mac>:<vlan-id>:<ip>:<netmask>:<gateway>:<hostname>:<dns,...>:<search,...>:<ntp,...>"
FALLBACK = "falling back to DHCP on every interface whose name starts with 'e'"

_MAC_PAIRS = re.compile(r"[0-9A-Fa-f]{2}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


# --- the values ------------------------------------------------------------------------------

class NetworkProblem(Exception):
    """A value that cannot be used: the key, what is wrong with which part, and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"{key}= {problem}: {fix}")
        self.key = key
        self.problem = problem
        self.fix = fix

    def line(self, then: str) -> str:
        """The one line for the console and the log: the problem, the fix, and what happens now."""
        return f"{self.key}= {self.problem}: {self.fix}; {then}"


def parse_mac(text: str, *, key: str, what: str = "MAC address", separators: str = "-:") -> str:
    """A MAC address in 6 hex pairs joined by one of separators, as aa:bb:cc:dd:ee:ff."""
    example = "52-54-00-12-34-56" if separators == "-" else "52:54:00:12:34:56"
    joined = "' or '".join(separators)
    for sep in separators:
        parts = text.split(sep)
        if len(parts) == 6 and all(_MAC_PAIRS.fullmatch(p) for p in parts):
            mac = ":".join(p.lower() for p in parts)
            if mac == "00:00:00:00:00:00" or int(parts[0], 16) & 1:
                raise NetworkProblem(key, f"{what} {text!r} is not a NIC's address (all zero or multicast)",
                                     f"give the NIC's own MAC, like {example}")
            return mac
    raise NetworkProblem(key, f"{what} {text!r} is not 6 hex pairs joined by '{joined}'",
                         f"write it like {example}")


def parse_vlan_id(text: str, *, key: str, what: str = "VLAN id") -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 4094:
        raise NetworkProblem(key, f"{what} {text!r} is not a number from 1 to 4094",
                             "use the VLAN's id (0 and 4095 are reserved by 802.1Q)")
    return int(text)


def parse_ipv4(text: str, *, key: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise NetworkProblem(key, f"{what} {text!r} is not an IPv4 address",
                             "write it as four numbers 0-255, like 192.168.2.10") from None


def parse_netmask(text: str, *, key: str, what: str = "netmask") -> int:
    """A netmask (255.255.255.0) or a prefix length (24, /24) as the prefix length, 1-32."""
    plain = text[1:] if text.startswith("/") else text
    if plain.isascii() and plain.isdigit() and 1 <= int(plain) <= 32:
        return int(plain)
    try:
        value = int(ipaddress.IPv4Address(text))
    except ValueError:
        value = -1
    prefix = bin(value).count("1") if value > 0 else 0
    if prefix == 0 or value != (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF:
        raise NetworkProblem(key, f"{what} {text!r} is not a netmask",
                             "write it like 255.255.255.0 (ones, then zeros) or as a prefix length like 24")
    return prefix


def parse_hostname(text: str, *, key: str, what: str = "hostname") -> str:
    labels = text.split(".")
    if len(text) > HOSTNAME_MAX or not all(_LABEL.fullmatch(label) for label in labels):
        raise NetworkProblem(key, f"{what} {text!r} is not a host name the kernel takes",
                             f"use letters, digits and '-' in dot-separated labels, at most {HOSTNAME_MAX} "
                             "characters in all")
    return text


def parse_domain(text: str, *, key: str, what: str) -> str:
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label.replace("_", "a")) for label in labels):
        raise NetworkProblem(key, f"{what} {text!r} is not a domain name",
                             "use dot-separated labels of letters, digits, '-' and '_'")
    return text.rstrip(".")


def parse_interface(text: str, *, key: str) -> str:
    """An interface name the kernel accepts (dev_valid_name)."""
    if (not text or len(text) > IFNAME_MAX or text in (".", "..")
            or any(c in "/:" or c.isspace() or not c.isprintable() for c in text)):
        raise NetworkProblem(key, f"interface name {text!r} is not one the kernel allows",
                             f"give an interface name of 1-{IFNAME_MAX} characters without '/', ':' or spaces, "
                             "like eth1")
    return text


def _items(text: str) -> list[str]:
    """A comma list; empty items (a,,b or a trailing comma) are dropped, duplicates too."""
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


@dataclass(frozen=True)
class Ipam:
    """ipam=: a static address."""

    mac: str
    vlan: int | None
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None = None
    hostname: str = ""
    dns: tuple[ipaddress.IPv4Address, ...] = ()
    search: tuple[str, ...] = ()
    ntp: tuple[ipaddress.IPv4Address, ...] = ()


def parse_ipam(value: str) -> Ipam:
    """ipam=<mac>:<vlan-id>:<ip>:<netmask>:<gateway>:<hostname>:<dns,...>:<search,...>:<ntp,...>.

    Required: MAC (hyphens), IP, netmask, DNS (Hook latest's rule); the rest may be empty, and
    fields missing at the end are empty. Raises NetworkProblem naming the first bad field.
    """
    key = "ipam"
    fields = value.split(":")
    if len(fields) > len(IPAM_FIELDS):
        raise NetworkProblem(key, f"{value!r} has {len(fields)} ':'-separated fields, at most 9 are read",
                             f"write {IPAM_FORMAT} (the MAC with '-', lists with ',')")
    fields += [""] * (len(IPAM_FIELDS) - len(fields))
    mac, vlan, ip, netmask, gateway, hostname, dns, search, ntp = (f.strip() for f in fields)

    def what(index: int) -> str:
        return f"{IPAM_FIELDS[index]} (field {index + 1})"

    for index, text in ((0, mac), (2, ip), (3, netmask), (6, dns)):
        if not text:
            raise NetworkProblem(key, f"{what(index)} is empty", f"it is required ({IPAM_FORMAT})")
    mac_addr = parse_mac(mac, key=key, what=what(0), separators="-")
    vlan_id = parse_vlan_id(vlan, key=key, what=what(1)) if vlan else None
    address = parse_ipv4(ip, key=key, what=what(2))
    prefix = parse_netmask(netmask, key=key, what=what(3))
    interface = ipaddress.IPv4Interface(f"{address}/{prefix}")
    if address.is_unspecified or address.is_multicast or address.is_loopback or address.is_reserved:
        raise NetworkProblem(key, f"{what(2)} {ip!r} cannot be a host's address",
                             "give this machine's own IPv4 address")
    if prefix <= 30 and address in (interface.network.network_address, interface.network.broadcast_address):
        raise NetworkProblem(key, f"{what(2)} {ip!r} is the network or broadcast address of {interface.network}",
                             "give this machine's own address, or the right netmask")
    gw = parse_ipv4(gateway, key=key, what=what(4)) if gateway else None
    if gw is not None and (gw == address or gw.is_unspecified or gw.is_multicast or gw.is_loopback):
        raise NetworkProblem(key, f"{what(4)} {gateway!r} cannot be the gateway", "give the router's IPv4 address")
    name = parse_hostname(hostname, key=key, what=what(5)) if hostname else ""
    servers = tuple(parse_ipv4(s, key=key, what="DNS server (field 7)") for s in _items(dns))
    if not servers:
        raise NetworkProblem(key, f"{what(6)} has no address", f"at least one is required ({IPAM_FORMAT})")
    domains = tuple(parse_domain(d, key=key, what="search domain (field 8)") for d in _items(search))
    clocks = tuple(parse_ipv4(s, key=key, what="NTP server (field 9)") for s in _items(ntp))
    return Ipam(mac=mac_addr, vlan=vlan_id, address=interface, gateway=gw, hostname=name, dns=servers,
                search=domains, ntp=clocks)


@dataclass(frozen=True)
class Vlan:
    """vlan_id= + hw_addr=: DHCP only on the VLAN interface of that NIC."""

    vlan: int
    mac: str


@dataclass(frozen=True)
class OnlyInterface:
    """interface=: DHCP only on that interface."""

    name: str


Plan = Union[Ipam, Vlan, OnlyInterface]  # noqa: UP007 - a runtime alias; the programs run on Python >= 3.9


@dataclass(frozen=True)
class Asked:
    """One network key the cmdline gives: its plan, or why its value cannot be used."""

    key: str
    plan: Plan | None = None
    problem: NetworkProblem | None = None


def asked_for(cfg: HookConfig) -> list[Asked]:
    """The network keys given (empty values count as not given), in the order they are tried."""
    asked: list[Asked] = []

    def add(key: str, make: object) -> None:
        try:
            asked.append(Asked(key, plan=make()))  # type: ignore[operator]
        except NetworkProblem as exc:
            asked.append(Asked(key, problem=exc))

    if cfg.ipam.strip():
        add("ipam", lambda: parse_ipam(cfg.ipam.strip()))
    if cfg.vlan_id.strip():
        def vlan() -> Vlan:
            vid = parse_vlan_id(cfg.vlan_id.strip(), key="vlan_id")
            if not cfg.hw_addr.strip():
                raise NetworkProblem("vlan_id", f"{vid} names no NIC: hw_addr= is not given",
                                     "give hw_addr=<the NIC's MAC> too (Smee's iPXE script gives both)")
            return Vlan(vid, parse_mac(cfg.hw_addr.strip(), key="hw_addr"))
        add("vlan_id", vlan)
    if cfg.interface.strip():
        add("interface", lambda: OnlyInterface(parse_interface(cfg.interface.strip(), key="interface")))
    return asked


def then_text(rest: Sequence[Asked]) -> str:
    """What happens after a key failed: the next key given, or the DHCP fallback."""
    return f"trying {rest[0].key}= instead" if rest else FALLBACK


def resolv_conf_text(origin: str, nameservers: Sequence[str], search: Sequence[str]) -> str:
    """/etc/resolv.conf: every nameserver in order (resolvers read the first 3), one search line."""
    lines = [f"# written by hook-docker: {origin}"]
    if search:
        lines.append("search " + " ".join(search))
    lines += [f"nameserver {ns}" for ns in dict.fromkeys(nameservers)]
    return "\n".join(lines) + "\n"


def vlan_name(nic: str, vlan: int) -> str:
    """<nic>.<vlan>, or vlan<vlan> when that is longer than the kernel allows."""
    name = f"{nic}.{vlan}"
    return name if len(name) <= IFNAME_MAX else f"vlan{vlan}"


def dashed(mac: str) -> str:
    return mac.replace(":", "-")


# --- a DHCP lease, as udhcpc's event script reports it ---------------------------------------

@dataclass(frozen=True)
class Lease:
    address: ipaddress.IPv4Interface
    routers: tuple[ipaddress.IPv4Address, ...] = ()
    dns: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    mtu: int | None = None
    server: str = ""
    seconds: str = ""
    #: option 121 (RFC 3442): (destination, gateway); given, the router option is ignored
    routes: tuple[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address], ...] = ()
    ntp: tuple[str, ...] = ()
    hostname: str = ""


def parse_event(line: str) -> tuple[str, dict[str, str]] | None:
    """(event, variables) from one line of udhcpc-event.sh; None for any other line."""
    if not line.startswith(EVENT_PREFIX):
        return None
    event, *pairs = line[len(EVENT_PREFIX):].rstrip("\n").split("\t")
    values = dict(p.split("=", 1) for p in pairs if "=" in p)
    return event, values


def lease_from(values: dict[str, str]) -> Lease:
    """The lease in udhcpc's variables; ValueError when its address or mask is unusable."""
    address = ipaddress.IPv4Interface(f"{values.get('ip', '')}/{values.get('mask') or values.get('subnet', '')}")
    routers: list[ipaddress.IPv4Address] = []
    for text in values.get("router", "").split():
        with contextlib.suppress(ValueError):
            routers.append(ipaddress.IPv4Address(text))
    dns = [str(ipaddress.IPv4Address(t)) for t in values.get("dns", "").split() if _is_ipv4(t)]
    search = values.get("search", "").split() or values.get("domain", "").split()
    mtu_text = values.get("mtu", "")
    mtu = int(mtu_text) if mtu_text.isdigit() and 576 <= int(mtu_text) <= 65535 else None
    words = values.get("staticroutes", "").split()
    routes = []
    for destination, gateway in zip(words[0::2], words[1::2], strict=False):
        with contextlib.suppress(ValueError):
            routes.append((ipaddress.IPv4Network(destination, strict=False), ipaddress.IPv4Address(gateway)))
    ntp = tuple(t for t in values.get("ntpsrv", "").split() if _is_ipv4(t))
    hostname = values.get("hostname", "").strip()
    try:
        hostname = parse_hostname(hostname, key="dhcp") if hostname else ""
    except NetworkProblem:
        hostname = ""  # a name the kernel would refuse is not used
    return Lease(address=address, routers=tuple(routers), dns=tuple(dns), search=tuple(search), mtu=mtu,
                 server=values.get("serverid", ""), seconds=values.get("lease", ""), routes=tuple(routes), ntp=ntp,
                 hostname=hostname)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


# --- the machine -----------------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkOptions:
    """Where the network set-up finds its tools and files (the defaults are the image's)."""

    ip: tuple[str, ...] = ("ip",)
    udhcpc: tuple[str, ...] = ("udhcpc",)
    modprobe: tuple[str, ...] = ("modprobe",)
    dhcp_script: Path = DHCP_SCRIPT
    resolv_conf: Path = Path("/etc/resolv.conf")
    sys_class_net: Path = Path("/sys/class/net")
    #: how long the NIC named by ipam=, hw_addr= or interface= may take to appear
    link_wait: float = 10.0
    #: how often the default mode looks for new "e" interfaces
    rescan: float = 2.0


class CommandFailed(Exception):
    """A command of ours (ip, modprobe) failed; the message has the command and its output."""


@dataclass
class _Client:
    ifname: str
    proc: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    #: why udhcpc could not be started, the last time it was tried ("" once it ran)
    cannot_run: str = ""


@dataclass
class _State:
    leases: dict[str, Lease] = field(default_factory=dict)
    announced: dict[str, ipaddress.IPv4Interface] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    #: the host name a lease set (the first one that named one)
    hostname: str = ""


class Network:
    """Sets the network up from the cmdline and supervises the DHCP clients it starts."""

    def __init__(self, cfg: HookConfig, options: NetworkOptions, *, stop: StopSignal, backoff: Backoff,
                 log: logging.Logger, lock: threading.Lock | None = None) -> None:
        self.cfg = cfg
        self.options = options
        self.stop = stop
        self.backoff = backoff
        self.log = log
        #: held while a command of ours is spawned or runs (the caller may reap orphans otherwise)
        self.lock = lock or threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._clients_lock = threading.Lock()
        self._state = _State()
        self._state_lock = threading.Lock()
        self._ipam: Ipam | None = None
        self._bound = threading.Event()
        stop.on_stop(lambda signum: self.stop_clients())

    # --- messages ----------------------------------------------------------------------------

    def say(self, level: int, message: str) -> None:
        """A line in the log and on the console (hookcommon.log's $HOOK_CONSOLE: the operator sees it)."""
        self.log.log(level, "network: %s", message, extra={"console": True})

    # --- commands ----------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float = 30) -> str:
        """Run a command of ours; its output, or CommandFailed with the command and why."""
        try:
            with self.lock:
                done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandFailed(f"`{shlex.join(argv)}` could not run: {getattr(exc, 'strerror', None) or reason(exc)}"
                                ) from None
        output = done.stdout.decode("utf-8", "replace").strip()
        if done.returncode != 0:
            last = output.splitlines()[-1] if output else f"exit status {done.returncode}"
            raise CommandFailed(f"`{shlex.join(argv)}` failed: {last}")
        return output

    def ip(self, *args: str) -> str:
        return self.run([*self.options.ip, *args])

    # --- interfaces --------------------------------------------------------------------------

    def links(self) -> list[str]:
        try:
            return sorted(p.name for p in self.options.sys_class_net.iterdir())
        except OSError:
            return []

    def _read(self, name: str, what: str) -> str:
        try:
            return (self.options.sys_class_net / name / what).read_text().strip()
        except OSError:
            return ""

    def mac_of(self, name: str) -> str:
        return self._read(name, "address").lower()

    def is_physical(self, name: str) -> bool:
        return (self.options.sys_class_net / name / "device").exists()

    def ipv4_of(self, name: str) -> list[str]:
        """The interface's (primary) IPv4 address as ['a.b.c.d/len'], [] when it has none."""
        return ipv4_address(name)

    def link_list(self) -> str:
        """'eth0 52:54:00:12:34:56, eth1 ...' for messages."""
        names = [n for n in self.links() if n != "lo"]
        return ", ".join(f"{n} {self.mac_of(n)}" for n in names) or "none"

    def find_mac(self, mac: str) -> str | None:
        """The interface with that MAC: a physical one first (VLANs and bonds copy their NIC's MAC)."""
        matches = [n for n in self.links() if self.mac_of(n) == mac]
        matches.sort(key=lambda n: (not self.is_physical(n), "." in n, n))
        return matches[0] if matches else None

    def _wait_for(self, find: Callable[[], str | None]) -> str | None:
        deadline = time.monotonic() + self.options.link_wait
        while True:
            found = find()
            if found or time.monotonic() >= deadline:
                return found
            self.stop.sleep(0.2)

    def wait_for_mac(self, mac: str, *, key: str, what: str, shown: str) -> str:
        name = self._wait_for(lambda: self.find_mac(mac))
        if name is None:
            raise NetworkProblem(key, f"{what} {shown!r} is on no interface after {self.options.link_wait:g}s "
                                 f"(there are: {self.link_list()})", "give the MAC of one of this machine's NICs")
        return name

    def wait_for_name(self, name: str, *, key: str, what: str = "",
                      fix: str = "name one of this machine's interfaces") -> str:
        found = self._wait_for(lambda: name if name in self.links() else None)
        if found is None:
            raise NetworkProblem(key, f"{what + ' ' if what else ''}{name!r} does not exist after "
                                 f"{self.options.link_wait:g}s "
                                 f"(there are: {self.link_list()})", fix)
        return found

    def add_vlan(self, nic: str, vlan: int, *, key: str) -> str:
        """<nic>.<vlan> (made if missing), up; NetworkProblem when the kernel cannot make it."""
        name = vlan_name(nic, vlan)
        with contextlib.suppress(CommandFailed):
            self.run([*self.options.modprobe, "8021q"])  # built in, or loaded already: fine
        self.ip("link", "set", "dev", nic, "up")
        if name not in self.links():
            try:
                self.ip("link", "add", "link", nic, "name", name, "type", "vlan", "id", str(vlan))
            except CommandFailed as exc:
                raise NetworkProblem(key, f"VLAN {vlan} on {nic}: cannot create {name} ({exc})",
                                     "the kernel needs 802.1Q VLAN support (CONFIG_VLAN_8021Q, module 8021q)"
                                     ) from None
        self.ip("link", "set", "dev", name, "up")
        return name

    # --- the set-up --------------------------------------------------------------------------

    def start(self) -> None:
        """Configure the network as the cmdline asks (see the module's docstring); returns at once
        in the DHCP modes (wait_ready() waits for a lease)."""
        asked = asked_for(self.cfg)
        if self.cfg.hw_addr.strip() and not self.cfg.vlan_id.strip():
            self.log.info("network: hw_addr=%s alone does nothing (it names the NIC of vlan_id=)", self.cfg.hw_addr)
        for index, one in enumerate(asked):
            rest = asked[index + 1:]
            try:
                if one.problem is not None:
                    raise one.problem
                assert one.plan is not None
                self._apply(one.key, one.plan)
            except NetworkProblem as exc:
                self.say(logging.ERROR, exc.line(then_text(rest)))
                continue
            for later in rest:
                self.log.info("network: %s= not used: %s= decides", later.key, one.key)
            return
        self._dhcp_everywhere()

    def _apply(self, key: str, plan: Plan) -> None:
        if isinstance(plan, Ipam):
            self._static(plan)
        elif isinstance(plan, Vlan):
            nic = self.wait_for_mac(plan.mac, key="hw_addr", what="MAC address", shown=self.cfg.hw_addr.strip())
            try:
                name = self.add_vlan(nic, plan.vlan, key="vlan_id")
            except CommandFailed as exc:
                raise NetworkProblem("vlan_id", f"VLAN {plan.vlan} on {nic}: {exc}", "see the log") from None
            self.say(logging.INFO, f"vlan_id={plan.vlan}: DHCP only on {name} (VLAN {plan.vlan} on {nic} "
                                   f"{self.mac_of(nic)})")
            self.start_dhcp(name)
        else:
            name = self.wait_for_name(plan.name, key="interface")
            self.say(logging.INFO, f"interface={name}: DHCP only on {name} ({self.mac_of(name)})")
            self.start_dhcp(name)

    def _static(self, ipam: Ipam) -> None:
        nic = self.wait_for_mac(ipam.mac, key="ipam", what="MAC address (field 1)", shown=dashed(ipam.mac))
        name = nic
        made_vlan = False
        try:
            if ipam.vlan is not None:
                made_vlan = vlan_name(nic, ipam.vlan) not in self.links()
                name = self.add_vlan(nic, ipam.vlan, key="ipam")
            self.ip("link", "set", "dev", name, "up")
            address = ipam.address
            brd = ["broadcast", str(address.network.broadcast_address)] if address.network.prefixlen <= 30 else []
            if address.with_prefixlen not in self.ipv4_of(name):
                self.ip("addr", "add", address.with_prefixlen, *brd, "dev", name)
            if ipam.gateway is not None:
                self._default_route(name, ipam.gateway, address)
        except (CommandFailed, NetworkProblem) as exc:
            self._undo_static(name, delete=made_vlan and name != nic)
            if isinstance(exc, NetworkProblem):
                raise
            raise NetworkProblem("ipam", f"cannot configure {name}: {exc}", "see the log") from None
        self._write_resolv_conf(f"ipam= (static, {name})", [str(s) for s in ipam.dns], list(ipam.search))
        self._ipam = ipam
        if ipam.hostname:
            self._set_hostname(ipam.hostname, "ipam=")
        on = f"{name} (VLAN {ipam.vlan} on {nic})" if ipam.vlan is not None else name
        gateway = f", gateway {ipam.gateway}" if ipam.gateway else ", no gateway"
        self.say(logging.INFO, f"ipam=: static {ipam.address.with_prefixlen} on {on} {ipam.mac}{gateway}, "
                               f"DNS {', '.join(map(str, ipam.dns))}"
                               + (f", hostname {ipam.hostname}" if ipam.hostname else "") + "; no DHCP")
        self._bound.set()

    def _undo_static(self, name: str, *, delete: bool) -> None:
        """After a failed ipam=: no half-made address (or VLAN made for it) stays for the fallback."""
        with contextlib.suppress(CommandFailed):
            self.ip("-4", "addr", "flush", "dev", name)
        if delete:
            with contextlib.suppress(CommandFailed):
                self.ip("link", "del", "dev", name)

    def _default_route(self, name: str, gateway: ipaddress.IPv4Address, address: ipaddress.IPv4Interface,
                       metric: int | None = None) -> None:
        if gateway not in address.network:  # a gateway off the subnet is reached on the link
            self.ip("route", "replace", str(gateway), "dev", name)
        extra = ["metric", str(metric)] if metric is not None else []
        self.ip("route", "replace", "default", "via", str(gateway), "dev", name, *extra)

    def _write_resolv_conf(self, origin: str, nameservers: Sequence[str], search: Sequence[str]) -> None:
        """Write resolv.conf in place: it is a bind mount (of LinuxKit's /run/resolvconf/resolv.conf),
        so a rename over it would fail."""
        text = resolv_conf_text(origin, nameservers, search)
        try:
            with open(self.options.resolv_conf, "w", encoding="utf-8") as out:
                out.write(text)
        except OSError as exc:
            self.say(logging.ERROR, f"cannot write {self.options.resolv_conf}: {exc.strerror or reason(exc)}")
            return
        self.log.info("network: wrote %s: %s", self.options.resolv_conf, " | ".join(text.splitlines()[1:]) or
                      "no DNS server")

    def _set_hostname(self, name: str, origin: str) -> None:
        try:
            socket.sethostname(name)
        except OSError as exc:
            self.say(logging.ERROR, f"{origin} cannot set the host name {name!r}: {exc.strerror or reason(exc)}")
            return
        self.log.info("network: host name set to %s (%s)", name, origin)

    # --- DHCP --------------------------------------------------------------------------------

    def _dhcp_candidates(self) -> list[str]:
        """The default mode's interfaces: named e* (Hook latest's dhcpcd `--allowinterfaces e*`), not VLANs."""
        return [n for n in self.links() if n.startswith("e") and "." not in n]

    def _dhcp_everywhere(self) -> None:
        # No wait for interfaces here: the NIC drivers loaded onboot, a late one (USB) is found by
        # the rescan below, and a machine with no NIC at all (air-gapped, embedded images) should
        # not hold dockerd back.
        names = self._dhcp_candidates()
        started = self._start_unaddressed(names)
        if started:
            self.say(logging.INFO, f"DHCP on {', '.join(started)} (every interface whose name starts with 'e')")
        elif not names:
            self.say(logging.WARNING, f"no interface whose name starts with 'e' (there are: {self.link_list()}); "
                                      "DHCP starts on each one that appears")
        threading.Thread(target=self._stoppable, args=(self._rescan,), name="dhcp-rescan", daemon=True).start()

    def _start_unaddressed(self, names: Sequence[str]) -> list[str]:
        """DHCP on each of names not seen before; one with an IPv4 address (another tool's) is left alone."""
        started = []
        for name in names:
            with self._clients_lock:
                if name in self._clients:
                    continue
            addresses = self.ipv4_of(name)
            if addresses:
                self.log.info("network: %s already has %s: left alone (no DHCP there)", name, ", ".join(addresses))
                with self._clients_lock:
                    self._clients.setdefault(name, _Client(name))  # never looked at again
                continue
            self.start_dhcp(name)
            started.append(name)
        return started

    def _rescan(self) -> None:
        while True:
            self.stop.sleep(self.options.rescan)
            for name in self._start_unaddressed(self._dhcp_candidates()):
                self.say(logging.INFO, f"{name} appeared: DHCP on it")

    def _stoppable(self, target: Callable[[], None]) -> None:
        with contextlib.suppress(Stopping):
            target()

    def start_dhcp(self, name: str) -> None:
        """A supervised udhcpc on the interface (up first)."""
        with contextlib.suppress(CommandFailed):
            self.ip("link", "set", "dev", name, "up")
        client = _Client(name)
        with self._clients_lock:
            self._clients[name] = client
        client.thread = threading.Thread(target=self._stoppable, args=(lambda: self._supervise(client),),
                                         name=f"udhcpc-{name}", daemon=True)
        client.thread.start()

    def udhcpc_command(self, name: str) -> list[str]:
        # foreground, our script; 3 discovers 3 s apart, then a pause of 10 s, for ever; ask for MTU,
        # the domain search list, classless static routes (option 121), NTP servers, the host name
        return [*self.options.udhcpc, "-f", "-i", name, "-s", str(self.options.dhcp_script),
                "-t", "3", "-T", "3", "-A", "10", "-O", "mtu", "-O", "search", "-O", "staticroutes",
                "-O", "ntpsrv", "-O", "hostname"]

    def _supervise(self, client: _Client) -> None:
        command = self.udhcpc_command(client.ifname)
        delays = self.backoff.delays()
        while not self.stop.stopping:
            started = time.monotonic()
            try:
                with self.lock:
                    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT)
                    client.proc = proc
            except OSError as exc:
                client.cannot_run = exc.strerror or reason(exc)
                delay = next(delays)
                self.log.error("network: cannot run the DHCP client (%s): %s; retrying in %.1fs", command[0],
                               client.cannot_run, delay)
                self.stop.sleep(delay)
                continue
            client.cannot_run = ""
            self.log.info("network: started udhcpc on %s (pid %d): %s", client.ifname, proc.pid, shlex.join(command))
            if self.stop.stopping:
                proc.terminate()
            assert proc.stdout is not None
            for raw in _lines(proc.stdout):
                self._on_output(client.ifname, raw.decode("utf-8", "replace").rstrip("\n"))
            code = proc.wait()
            ran = time.monotonic() - started
            if self.stop.stopping:
                return
            if ran >= HEALTHY_RUN_SECONDS:
                delays = self.backoff.delays()
            delay = next(delays)
            self.log.error("network: udhcpc on %s exited after %.0fs (%s); restarting it in %.1fs", client.ifname,
                           ran, f"exit status {code}" if code >= 0 else f"signal {-code}", delay)
            self.stop.sleep(delay)

    def _on_output(self, name: str, line: str) -> None:
        event = parse_event(line)
        if event is None:
            if line.strip():
                self.log.info("udhcpc %s: %s", name, line.strip())
            return
        try:
            self.handle_event(name, *event)
        except Exception as exc:  # never let one event stop reading udhcpc's output
            self.log.error("network: DHCP event %s on %s not applied: %s", event[0], name, reason(exc))

    def handle_event(self, name: str, event: str, values: dict[str, str]) -> None:
        """Apply one udhcpc event: deconfig, bound, renew, leasefail, nak."""
        with self._state_lock:
            if event == "deconfig":
                had = self._state.leases.pop(name, None)
                self._state.announced.pop(name, None)
                with contextlib.suppress(CommandFailed):
                    self.ip("-4", "addr", "flush", "dev", name)
                with contextlib.suppress(CommandFailed):
                    self.ip("link", "set", "dev", name, "up")
                if had is not None:
                    self.say(logging.WARNING, f"{name} lost its lease of {had.address.with_prefixlen}")
                    self._dhcp_resolv_conf()
            elif event in ("bound", "renew"):
                self._bound_event(name, event, lease_from(values))
            elif event == "leasefail":
                # on the console once per interface until a lease comes (udhcpc says it every ~20 s)
                failed = self._state.failures.get(name, 0) + 1
                self._state.failures[name] = failed
                self.log.log(logging.WARNING if failed == 1 else logging.INFO,
                             "network: no DHCP answer on %s yet (round %d of DISCOVERs); udhcpc keeps asking",
                             name, failed)
            elif event == "nak":
                self.log.warning("network: DHCP server %s refused (NAK) on %s", values.get("serverid", "?"), name)
            else:
                self.log.info("network: DHCP event %s on %s ignored", event, name)

    def _bound_event(self, name: str, event: str, lease: Lease) -> None:
        old = self._state.leases.get(name)
        if lease.mtu is not None and self._read(name, "mtu") != str(lease.mtu):
            try:
                self.ip("link", "set", "dev", name, "mtu", str(lease.mtu))
            except CommandFailed as exc:
                self.log.warning("network: MTU %d from DHCP not set on %s: %s", lease.mtu, name, exc)
        if old is None or old.address != lease.address:
            if old is not None:
                self.ip("-4", "addr", "flush", "dev", name)
            net = lease.address.network
            brd = ["broadcast", str(net.broadcast_address)] if net.prefixlen <= 30 else []
            if lease.address.with_prefixlen not in self.ipv4_of(name):
                self.ip("addr", "add", lease.address.with_prefixlen, *brd, "dev", name)
        ifindex = self._read(name, "ifindex")
        metric = 1000 + int(ifindex) if ifindex.isdigit() else None
        changed = old is None or old.address != lease.address
        if lease.routes and (changed or old.routes != lease.routes):
            self._static_routes(name, lease, metric)
        elif lease.routers and (changed or old.routers[:1] != lease.routers[:1]):
            try:
                self._default_route(name, lease.routers[0], lease.address, metric)
            except CommandFailed as exc:
                self.log.error("network: default route via %s on %s not set: %s", lease.routers[0], name, exc)
        if lease.hostname and not self._state.hostname:
            self._state.hostname = lease.hostname
            self._set_hostname(lease.hostname, f"DHCP on {name}")
        self._state.leases[name] = lease
        self._state.failures.pop(name, None)
        self._dhcp_resolv_conf()
        if self._state.announced.get(name) != lease.address:
            self._state.announced[name] = lease.address
            router = f"router {lease.routers[0]}" if lease.routers else "no router"
            dns = f"DNS {', '.join(lease.dns)}" if lease.dns else "no DNS server"
            self.say(logging.INFO, f"{name} leased {lease.address.with_prefixlen} from {lease.server or '?'} "
                                   f"({router}, {dns}, {lease.seconds or '?'}s)")
        else:
            self.log.info("network: %s %s %s (lease %ss)", name, event, lease.address.with_prefixlen, lease.seconds)
        self._bound.set()

    def _static_routes(self, name: str, lease: Lease, metric: int | None) -> None:
        """Option 121's routes (RFC 3442: then the router option is not used), each one on its own:
        a route the kernel refuses is logged, the others stay."""
        extra = ["metric", str(metric)] if metric is not None else []
        for destination, gateway in lease.routes:
            try:
                if gateway.is_unspecified:  # 0.0.0.0: the destination is on the link
                    self.ip("route", "replace", str(destination), "dev", name, *extra)
                else:
                    if gateway not in lease.address.network:
                        self.ip("route", "replace", str(gateway), "dev", name)
                    self.ip("route", "replace", str(destination), "via", str(gateway), "dev", name, *extra)
            except CommandFailed as exc:
                self.log.error("network: route %s via %s on %s not set: %s", destination, gateway, name, exc)
        self.log.info("network: %s: classless static routes %s (option 121; the router option is not used)", name,
                      ", ".join(f"{d} via {g}" for d, g in lease.routes))

    def _dhcp_resolv_conf(self) -> None:
        leases = sorted(self._state.leases.items())
        origin = "DHCP on " + (", ".join(n for n, _ in leases) or "no interface yet")
        nameservers = [ns for _, lease in leases for ns in lease.dns]
        search = list(dict.fromkeys(d for _, lease in leases for d in lease.search))
        self._write_resolv_conf(origin, nameservers, search)

    # --- for hook-docker ---------------------------------------------------------------------

    def ntp_servers(self) -> tuple[list[str], str]:
        """(the NTP servers ipam= or the DHCP leases named, where they come from)."""
        if self._ipam is not None:
            return [str(s) for s in self._ipam.ntp], "ipam="
        with self._state_lock:
            servers = [s for _, lease in sorted(self._state.leases.items()) for s in lease.ntp]
        return list(dict.fromkeys(servers)), "DHCP"

    @property
    def dhcp_interfaces(self) -> list[str]:
        with self._clients_lock:
            return sorted(n for n, c in self._clients.items() if c.thread is not None)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until an address is configured (static, or a first lease), at most timeout seconds.

        True at once when there is no DHCP client to wait for; False (logged) after the timeout:
        the clients keep running, and whatever waits on this goes on without a lease."""
        waiting = self.dhcp_interfaces
        if self._bound.is_set() or not waiting:
            return self._bound.is_set() or not waiting
        started = time.monotonic()
        deadline = started + timeout
        while not self._bound.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                self.say(logging.WARNING, f"no DHCP lease on {', '.join(waiting)} after {timeout:g}s: going on "
                                          "without one; the DHCP client keeps asking")
                return False
            with self._clients_lock:
                broken = [c.cannot_run for c in self._clients.values() if c.thread is not None]
            if broken and all(broken):
                self.say(logging.ERROR, f"the DHCP client cannot run ({broken[0]}): going on without a lease")
                return False
            self.stop.sleep(min(left, 0.2))
        self.log.info("network: ready after %.1fs", time.monotonic() - started)
        return True

    def child_pids(self) -> set[int]:
        """The DHCP clients' pids (a subreaper must leave them to us)."""
        with self._clients_lock:
            return {c.proc.pid for c in self._clients.values() if c.proc is not None and c.proc.returncode is None}

    def stop_clients(self) -> None:
        with self._clients_lock:
            procs = [c.proc for c in self._clients.values() if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()


def ipv4_address(name: str) -> list[str]:
    """An interface's primary IPv4 address as ['a.b.c.d/len'] (SIOCGIFADDR), [] when it has none
    (or there is no such interface): asked of the kernel, so it works where no `ip` does."""
    request = struct.pack("256s", name.encode()[:IFNAME_MAX])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            address = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24]
            netmask = fcntl.ioctl(sock.fileno(), SIOCGIFNETMASK, request)[20:24]
    except OSError:
        return []
    prefix = bin(int.from_bytes(netmask, "big")).count("1")
    return [f"{socket.inet_ntoa(address)}/{prefix}"]


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        line = stream.readline()
        if not line:
            return
        yield line
