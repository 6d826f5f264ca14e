"""The kernel command line, parsed the way the kernel parses it, and the keys Hook reads from it."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hookcommon.log import add_secret, reason

DEFAULT_CMDLINE_FILE = Path("/proc/cmdline")

# The kernel's isspace() on ASCII; NUL cannot be in a real cmdline, so garbage NULs separate too.
_SPACE = frozenset(" \t\n\v\f\r\0")

#: Every key Hook reads, with what it means (used in --help and the docs).
KEYS: dict[str, str] = {
    "tink_worker_image": "tink-worker image reference (default <docker_registry>/tink-worker:latest)",
    "docker_registry": "registry host[:port] of tink-worker and of the workflow actions",
    "registry_username": "user name for docker_registry",
    "registry_password": "password for docker_registry (never logged)",
    "grpc_authority": "host:port of the Tinkerbell gRPC server (TINKERBELL_GRPC_AUTHORITY)",
    "worker_id": "this machine's id for tink-worker (WORKER_ID and ID)",
    "tinkerbell_tls": "TINKERBELL_TLS for tink-worker (a bare flag means true)",
    "tinkerbell_insecure_tls": "TINKERBELL_INSECURE_TLS for tink-worker (a bare flag means true)",
    "syslog_host": "send container logs to syslog at udp://HOST:514",
    "insecure_registries": "comma list of registries dockerd reaches without TLS verification",
    "HTTP_PROXY": "proxy for http (dockerd, tink-worker)",
    "HTTPS_PROXY": "proxy for https (dockerd, tink-worker)",
    "NO_PROXY": "hosts reached without a proxy",
    "packet_base_url": "2021: base URL serving ca.pem, the CA of docker_registry",
    "tinkerbell": "2021: URL of the Tinkerbell host; <tinkerbell>:50061/metadata gives the machine id",
    "grpc_cert_url": "2021: URL of the gRPC server certificate (TINKERBELL_CERT_URL)",
    # the network (hook-docker sets it up before dockerd: hookcommon/network.py)
    "ipam": "static network: <mac-with-hyphens>:<vlan-id>:<ip>:<netmask>:<gateway>:<hostname>:<dns,...>"
            ":<search,...>:<ntp,...>; no DHCP",
    "vlan_id": "VLAN 1-4094: DHCP only on <nic>.<vlan_id>, the NIC being hw_addr's (default eth0)",
    "hw_addr": "MAC of the NIC that vlan_id= tags (aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)",
    "interface": "DHCP only on this interface (default: every interface whose name starts with 'e')",
}

#: Keys whose bare flag form means "true".
_BOOLEAN_KEYS = frozenset({"tinkerbell_tls", "tinkerbell_insecure_tls"})


def _next_arg(args: str) -> tuple[str, str | None, str]:
    """One parameter off the front of args (no leading space): a port of the kernel's next_arg().

    A double quote toggles quoting anywhere; the quotes around a whole parameter or around a
    value (right after the first '=') are removed, quotes in the middle are kept.
    """
    in_quote = quoted = False
    if args.startswith('"'):
        args = args[1:]
        in_quote = quoted = True
    equals = -1
    i = 0
    while i < len(args):
        char = args[i]
        if char in _SPACE and not in_quote:
            break
        if equals < 0 and char == "=" and i > 0:
            equals = i
        if char == '"':
            in_quote = not in_quote
        i += 1
    token, rest = args[:i], args[i + 1 :]
    strip_end = i > 0 and args[i - 1] == '"'
    if equals < 0:
        param, value = token, None
        if quoted and strip_end:
            param = param[:-1]
    else:
        param, value = token[:equals], token[equals + 1 :]
        if value.startswith('"'):
            value = value[1:]
            if strip_end and value.endswith('"'):
                value = value[:-1]
        elif quoted and strip_end and value.endswith('"'):
            value = value[:-1]
    return param, value, rest


def parse_cmdline(text: str | bytes) -> dict[str, str | None]:
    """Parse a kernel command line into {key: value}; a bare key (a flag) maps to None.

    Only the first '=' splits key from value, the last occurrence of a key wins, and nothing after
    a lone '--' is read (those arguments are for init). Bytes that are not UTF-8 become U+FFFD.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    params: dict[str, str | None] = {}
    rest = text
    while True:
        rest = rest.lstrip("".join(_SPACE))
        if not rest:
            return params
        key, value, rest = _next_arg(rest)
        if key == "--" and value is None:
            return params
        if key:
            params[key] = value


def _split_list(value: str) -> tuple[str, ...]:
    items: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if item and item not in items:
            items.append(item)
    return tuple(items)


@dataclass(frozen=True)
class HookConfig:
    """The cmdline keys Hook's programs use; a missing key is the empty string."""

    tink_worker_image: str = ""
    docker_registry: str = ""
    registry_username: str = ""
    registry_password: str = field(default="", repr=False)
    grpc_authority: str = ""
    worker_id: str = ""
    tinkerbell_tls: str = ""
    tinkerbell_insecure_tls: str = ""
    syslog_host: str = ""
    insecure_registries: tuple[str, ...] = ()
    http_proxy: str = ""
    https_proxy: str = ""
    no_proxy: str = ""
    packet_base_url: str = ""
    tinkerbell: str = ""
    grpc_cert_url: str = ""
    ipam: str = ""
    vlan_id: str = ""
    hw_addr: str = ""
    interface: str = ""

    @classmethod
    def from_params(cls, params: dict[str, str | None]) -> HookConfig:
        values: dict[str, object] = {}
        for key in KEYS:
            if key not in params:
                continue
            raw = params[key]
            value = ("true" if key in _BOOLEAN_KEYS else "") if raw is None else raw
            name = key.lower()
            values[name] = _split_list(value) if name == "insecure_registries" else value
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_text(cls, text: str | bytes) -> HookConfig:
        return cls.from_params(parse_cmdline(text))

    @classmethod
    def from_file(cls, path: Path) -> HookConfig:
        """Read and parse a cmdline file; OSError tells why it could not be read."""
        return cls.from_text(path.read_bytes())

    @property
    def secrets(self) -> list[str]:
        """Values that must never be logged."""
        return [self.registry_password] if self.registry_password else []

    def proxy_env(self) -> dict[str, str]:
        """The proxy variables given on the cmdline, for a child's environment."""
        env = {"HTTP_PROXY": self.http_proxy, "HTTPS_PROXY": self.https_proxy, "NO_PROXY": self.no_proxy}
        return {k: v for k, v in env.items() if v}


def registry_host(value: str) -> str:
    """host[:port] of a registry given as 'host[:port]', with or without scheme or path.

    Raises ValueError when nothing usable is left (the result becomes a directory name).
    """
    host = value.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].strip()
    if not host or host in (".", "..") or any(c in _SPACE for c in host):
        raise ValueError(f"{value!r} is not a registry host[:port]")
    return host


def syslog_address(host: str) -> str:
    """udp://HOST:514 for syslog_host; a port given with the host is kept, IPv6 gets brackets."""
    host = host.strip()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"udp://{host}" if ":" in host else f"udp://{host}:514"
    if ip.version == 6:
        return f"udp://[{ip}]:514"
    return f"udp://{ip}:514"


def load_config(path: Path, log: logging.Logger) -> HookConfig | None:
    """Both programs' start: read the cmdline, mask its secrets from now on, say so; None (logged) if unreadable."""
    try:
        cfg = HookConfig.from_file(path)
    except OSError as exc:
        log.error("cannot read the kernel command line %s: %s", path, exc.strerror or reason(exc))
        return None
    for secret in cfg.secrets:
        add_secret(secret)
    log.info("starting (kernel command line from %s)", path)
    return cfg
