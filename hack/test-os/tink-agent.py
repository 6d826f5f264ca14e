#!/usr/bin/env python3
"""hooktest/tink-agent:test: stands in for Tinkerbell's tink-agent (cmd/agent) where the helm chart
runs it, in tink-worker's place (`tink_worker_image=.../tink-agent:<tag>`). It checks the contract
of ../shared/tinkerbell/AGENT.md, what the real agent reads of the machine and of bootkit, and says
each check, then one verdict, to stdout, /dev/console and /dev/kmsg:

- TINK-AGENT-CHECK ok|FAILED <what>: <detail>
- TINK-AGENT-CONTRACT MET (<n> checks) worker_id=<id>   or   TINK-AGENT-CONTRACT BROKEN: <failed checks>

The checks:
- env: the legacy variables as the agent reads them (SetFromEnvLegacy: an empty value is ignored,
  the TLS flags go through Go's strconv.ParseBool, ID and WORKER_ID set the agent id) give what
  the kernel cmdline says (/proc/cmdline is the host's): the id, the gRPC authority, TLS,
  insecure TLS, the registry and its user; the password is compared by sha256, never shown;
- docker: the runtime (-runtime docker, -docker-socket /var/run/docker.sock) answers _ping and
  /info, and runs an action as the agent does (privileged, /dev bound, host network) to exit 0;
- dev: every block device in /sys/block has its /dev node, and the first one can be read
  (privileged, the host's /dev);
- udev: /run is the host's, with udev's database: a b<major>:<minor> entry with properties for
  each block device and an n<ifindex> entry for each NIC (what jaypipes/ghw reads);
- host network: the NIC named by hw_addr= is here (a container network would show a veth);
- hardware: /sys/class/dmi/id and /proc/cpuinfo, /proc/meminfo are readable (CPU, memory, product).
Then it stays up, as the agent does, and says the verdict again every 10 s. Standard library only.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import socket
import stat
import time
from pathlib import Path

SOCKET = "/var/run/docker.sock"
LEGACY = ("REGISTRY_USERNAME", "REGISTRY_PASSWORD", "DOCKER_REGISTRY", "TINKERBELL_GRPC_AUTHORITY",
          "TINKERBELL_TLS", "TINKERBELL_INSECURE_TLS", "ID", "WORKER_ID")
GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def say(message: str) -> None:
    print(message, flush=True)
    for path in ("/dev/console", "/dev/kmsg"):
        try:
            with open(path, "w") as out:
                out.write(message + "\n")
        except OSError:
            pass


def cmdline() -> dict[str, str]:
    """The kernel's parameters, the last of a key winning (a bare key: "")."""
    words = shlex.split(Path("/proc/cmdline").read_text())
    return {w.partition("=")[0]: w.partition("=")[2] for w in words}


def go_bool(value: str) -> bool | None:
    return True if value in GO_TRUE else False if value in GO_FALSE else None


def agent_settings(env: dict[str, str]) -> dict[str, object]:
    """What tink-agent takes from the legacy environment (cmd/agent/flags.go, SetFromEnvLegacy)."""
    got: dict[str, object] = {"tls": False, "insecure_tls": False}
    for key in LEGACY:
        value = env.get(key, "")
        if not value:
            continue
        if key in ("TINKERBELL_TLS", "TINKERBELL_INSECURE_TLS"):
            parsed = go_bool(value)
            if parsed is not None:
                got["tls" if key == "TINKERBELL_TLS" else "insecure_tls"] = parsed
        elif key in ("ID", "WORKER_ID"):
            got["id"] = value
        else:
            got[key.lower()] = value
    return got


def flag(params: dict[str, str], key: str) -> bool:
    """A boolean parameter of the cmdline as Hook documents it: absent false, bare true."""
    if key not in params:
        return False
    return params[key] == "" or params[key].lower() in ("1", "t", "true", "yes", "on")


class Engine:
    def request(self, method: str, path: str, body: object = None, timeout: float = 300) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock.settimeout(timeout)
        conn.sock.connect(SOCKET)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        payload = answer.read()
        conn.close()
        return answer.status, payload


def check_env() -> tuple[bool, str]:
    params = cmdline()
    got = agent_settings(dict(os.environ))
    wrong = []
    expected = {"id": params.get("worker_id", ""), "tinkerbell_grpc_authority": params.get("grpc_authority", ""),
                "docker_registry": params.get("docker_registry", ""),
                "registry_username": params.get("registry_username", "")}
    for key, want in expected.items():
        if not want:
            wrong.append(f"{key}: the cmdline gives none, so the test cannot check it")
        elif got.get(key) != want:
            wrong.append(f"{key}={got.get(key)!r}, the cmdline says {want!r}")
    for key, param in (("tls", "tinkerbell_tls"), ("insecure_tls", "tinkerbell_insecure_tls")):
        if got[key] != flag(params, param):
            wrong.append(f"{key}={got[key]}, the cmdline's {param} means {flag(params, param)}")
    secret = params.get("registry_password", "")
    if not secret or got.get("registry_password") != secret:
        wrong.append("registry_password is not the cmdline's (neither is shown)")
    if os.environ.get("ID") != os.environ.get("WORKER_ID"):
        wrong.append("ID and WORKER_ID differ")
    if wrong:
        return False, "; ".join(wrong)
    return True, (f"id={got['id']} grpc={got['tinkerbell_grpc_authority']} tls={got['tls']} "
                  f"insecure_tls={got['insecure_tls']} registry={got['docker_registry']} "
                  f"user={got['registry_username']} password=the cmdline's")


def own_image(engine: Engine) -> str:
    """The image this container runs (on the host network its hostname is the host's: by name)."""
    for name in ("tink-worker", socket.gethostname()):  # bootkit names it tink-worker
        status, body = engine.request("GET", f"/containers/{name}/json")
        if status == 200:
            return json.loads(body)["Config"]["Image"]
    raise RuntimeError(f"cannot inspect this container ({status})")


def check_docker() -> tuple[bool, str]:
    if not Path(SOCKET).exists() or not stat.S_ISSOCK(os.stat(SOCKET).st_mode):
        return False, f"{SOCKET} is not a socket"
    engine = Engine()
    status, body = engine.request("GET", "/_ping")
    if status != 200 or body != b"OK":
        return False, f"_ping answered {status} {body[:80]!r}"
    status, body = engine.request("GET", "/info")
    info = json.loads(body)
    image = own_image(engine)
    spec = {"Image": image, "Entrypoint": ["/usr/bin/python3", "-c"],
            "Cmd": ["import os,sys; sys.exit(0 if os.path.exists('/dev/kmsg') and os.access('/dev/kmsg', os.W_OK) "
                    "else 3)"],
            "HostConfig": {"Privileged": True, "Binds": ["/dev:/dev"], "NetworkMode": "host"}}
    status, body = engine.request("POST", "/containers/create", spec)
    if status != 201:
        return False, f"creating an action container: {status} {body[:200]!r}"
    cid = json.loads(body)["Id"]
    try:
        status, body = engine.request("POST", f"/containers/{cid}/start")
        if status not in (204, 304):
            return False, f"starting an action container: {status} {body[:200]!r}"
        status, body = engine.request("POST", f"/containers/{cid}/wait")
        code = json.loads(body).get("StatusCode")
    finally:
        engine.request("DELETE", f"/containers/{cid}?force=1")
    if code != 0:
        return False, f"a privileged action exited {code}"
    return True, f"docker {info.get('ServerVersion')}: a privileged action with /dev ran to exit 0"


def block_devices() -> list[tuple[str, str]]:
    """(name, major:minor) of the block devices the agent lists (no loop, ram or zram)."""
    found = []
    for entry in sorted(Path("/sys/block").iterdir()):
        if entry.name.startswith(("loop", "ram", "zram")):
            continue
        found.append((entry.name, (entry / "dev").read_text().strip()))
    return found


def check_dev() -> tuple[bool, str]:
    devices = block_devices()
    if not devices:
        return False, "no block device in /sys/block: the test must attach one"
    missing = [n for n, _ in devices
               if not Path(f"/dev/{n}").exists() or not stat.S_ISBLK(os.stat(f"/dev/{n}").st_mode)]
    if missing:
        return False, f"no /dev node for {', '.join(missing)}"
    first = devices[0][0]
    with open(f"/dev/{first}", "rb") as disk:
        data = disk.read(4096)
    return True, f"{', '.join(n for n, _ in devices)}; read {len(data)} bytes of /dev/{first}"


def check_udev() -> tuple[bool, str]:
    data = Path("/run/udev/data")
    if not data.is_dir():
        return False, "/run/udev/data is missing: bind the host's /run (hook-docker's /host_root/run) as /run"
    wrong = []
    for name, numbers in block_devices():
        entry = data / f"b{numbers}"
        if not entry.is_file():
            wrong.append(f"{name}: no {entry.name}")
        elif "E:" not in entry.read_text():
            wrong.append(f"{name}: {entry.name} holds no properties")
    nics = [n for n in sorted(Path("/sys/class/net").iterdir()) if (n / "device").exists()]
    for nic in nics:
        entry = data / f"n{(nic / 'ifindex').read_text().strip()}"
        if not entry.is_file():
            wrong.append(f"{nic.name}: no {entry.name}")
    if not nics:
        wrong.append("no NIC with a device in /sys/class/net")
    if wrong:
        return False, "; ".join(wrong)
    return True, f"{len(list(data.iterdir()))} entries; every block device and NIC ({len(nics)}) has its own"


def check_host_network() -> tuple[bool, str]:
    mac = cmdline().get("hw_addr", "").lower()
    names = {n.name: (n / "address").read_text().strip().lower() for n in Path("/sys/class/net").iterdir()}
    if not mac:
        nics = sorted(n for n in names if Path(f"/sys/class/net/{n}/device").exists())
        return bool(nics), f"the host's NICs {', '.join(nics) or 'none'} (no hw_addr on the cmdline to look for)"
    for name, address in names.items():
        if address == mac:
            return True, f"{name} has hw_addr {mac}"
    return False, f"no interface has hw_addr {mac}: {names}"


def check_hardware() -> tuple[bool, str]:
    dmi = Path("/sys/class/dmi/id")
    product = (dmi / "product_name").read_text().strip() if (dmi / "product_name").is_file() else ""
    cpus = Path("/proc/cpuinfo").read_text().count("processor\t:")
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), "")
    if not product or not cpus or not memory:
        return False, f"product={product!r} cpus={cpus} memory_kb={memory!r}"
    return True, f"product={product!r} cpus={cpus} memory_kb={memory}"


CHECKS = (("env", check_env), ("docker", check_docker), ("dev", check_dev), ("udev", check_udev),
          ("host-network", check_host_network), ("hardware", check_hardware))


def main() -> None:
    failed = []
    for name, check in CHECKS:
        try:
            ok, detail = check()
        except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        say(f"TINK-AGENT-CHECK {'ok' if ok else 'FAILED'} {name}: {detail}")
        if not ok:
            failed.append(name)
    worker = os.environ.get("WORKER_ID") or os.environ.get("ID", "")
    verdict = (f"TINK-AGENT-CONTRACT BROKEN: {', '.join(failed)}" if failed
               else f"TINK-AGENT-CONTRACT MET ({len(CHECKS)} checks) worker_id={worker}")
    while True:
        say(verdict)
        time.sleep(10)


if __name__ == "__main__":
    main()
