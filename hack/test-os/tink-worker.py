#!/usr/bin/env python3
"""hooktest/tink-worker:test: stands in for tink-worker. What it does is what the boot tests look for:

- TINK-WORKER-RUNNING with the settings hook-bootkit passed (the password only as the first 16 hex
  digits of its sha256), to stdout, /dev/console and /dev/kmsg, at start and every 10 s;
- TINK-WORKER-SEES: what tink-worker and tink-agent read of the machine: the disks under
  /dev/disk/by-id, each NIC and its driver, the udev database under /run/udev;
- with `hooktest_workflow=URL` on the kernel cmdline, a workflow as tink-worker runs one: a JSON
  list of actions, each pulled and run through the docker socket (privileged, /dev bound, host
  network), one after the other; WORKFLOW SUCCEEDED (then /worker/reboot when it asks for one) or
  WORKFLOW FAILED with the action and its exit status. Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

SOCKET = "/var/run/docker.sock"


def say(message: str) -> None:
    print(message, flush=True)
    for path in ("/dev/console", "/dev/kmsg"):
        try:
            with open(path, "w") as out:
                out.write(message + "\n")
        except OSError:
            pass


def marker() -> str:
    password = hashlib.sha256(os.environ.get("REGISTRY_PASSWORD", "").encode()).hexdigest()[:16]
    return (f"TINK-WORKER-RUNNING worker_id={os.environ.get('WORKER_ID', '')} "
            f"registry={os.environ.get('DOCKER_REGISTRY', '')} user={os.environ.get('REGISTRY_USERNAME', '')} "
            f"password_sha256={password}")


def sees() -> str:
    by_id = sorted(p.name for p in Path("/dev/disk/by-id").glob("*")) if Path("/dev/disk/by-id").is_dir() else []
    nics = []
    for nic in sorted(Path("/sys/class/net").glob("*")):
        driver = nic / "device" / "driver"
        if driver.exists():
            nics.append(f"{nic.name}:{os.path.basename(os.readlink(driver))}")
    udev = Path("/run/udev/data")
    entries = len(list(udev.iterdir())) if udev.is_dir() else 0
    return f"TINK-WORKER-SEES by-id={','.join(by_id) or '-'} nics={','.join(nics) or '-'} udev-db={entries}"


class Engine:
    """The docker Engine API over its unix socket: what tink-worker uses to run actions."""

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None,
                timeout: float = 600) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock.settimeout(timeout)
        conn.sock.connect(SOCKET)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        answer = conn.getresponse()
        payload = answer.read()
        conn.close()
        return answer.status, payload

    def pull(self, image: str) -> None:
        repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        headers = {}
        registry = os.environ.get("DOCKER_REGISTRY", "")
        if registry and image.startswith(registry + "/"):
            auth = {"username": os.environ.get("REGISTRY_USERNAME", ""),
                    "password": os.environ.get("REGISTRY_PASSWORD", ""), "serveraddress": registry}
            headers["X-Registry-Auth"] = base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()
        query = urllib.parse.urlencode({"fromImage": repo, "tag": tag or "latest"})
        status, body = self.request("POST", f"/images/create?{query}", headers=headers)
        if status != 200 or b'"error"' in body:
            raise RuntimeError(f"pull {image}: {status} {body[-300:].decode(errors='replace')}")

    def run(self, name: str, image: str, env: dict[str, str], command: list[str] | None) -> tuple[int, str]:
        config = {"Image": image, "Env": [f"{k}={v}" for k, v in env.items()],
                  "HostConfig": {"Privileged": True, "Binds": ["/dev:/dev"], "NetworkMode": "host"}}
        if command:
            config["Cmd"] = command
        status, body = self.request("POST", f"/containers/create?name={name}", config)
        if status != 201:
            raise RuntimeError(f"create {name}: {status} {body.decode(errors='replace')}")
        cid = json.loads(body)["Id"]
        status, body = self.request("POST", f"/containers/{cid}/start")
        if status not in (204, 304):
            raise RuntimeError(f"start {name}: {status} {body.decode(errors='replace')}")
        _, body = self.request("POST", f"/containers/{cid}/wait", timeout=3600)
        code = int(json.loads(body).get("StatusCode", -1))
        _, logs = self.request("GET", f"/containers/{cid}/logs?stdout=1&stderr=1")
        self.request("DELETE", f"/containers/{cid}?force=1")
        return code, _demux(logs)


def _demux(raw: bytes) -> str:
    """docker's multiplexed log stream (8-byte headers) as text."""
    out, at = [], 0
    while at + 8 <= len(raw):
        size = int.from_bytes(raw[at + 4:at + 8], "big")
        out.append(raw[at + 8:at + 8 + size])
        at += 8 + size
    return b"".join(out).decode(errors="replace")


def workflow_url() -> str:
    try:
        words = Path("/proc/cmdline").read_text().split()
    except OSError:
        return ""
    return next((w.split("=", 1)[1] for w in words if w.startswith("hooktest_workflow=")), "")


def run_workflow(url: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as answer:  # noqa: S310 - the test's own server
        workflow = json.load(answer)
    engine = Engine()
    say(f"WORKFLOW START {len(workflow['actions'])} actions from {url}")
    for index, action in enumerate(workflow["actions"]):
        name = action.get("name", f"action-{index}")
        started = time.monotonic()
        try:
            engine.pull(action["image"])
            env = {"WORKER_ID": os.environ.get("WORKER_ID", ""), "ACTION_NAME": name, **action.get("env", {})}
            code, logs = engine.run(f"action-{index}-{int(time.time())}", action["image"], env, action.get("command"))
        except (OSError, RuntimeError, ValueError) as exc:
            say(f"WORKFLOW FAILED action={name} error={exc}")
            return
        for line in logs.splitlines():
            say(f"ACTION {name}: {line}")
        say(f"ACTION {name} EXIT {code} in {time.monotonic() - started:.1f}s")
        if code != 0:
            say(f"WORKFLOW FAILED action={name} exit={code}")
            return
    say("WORKFLOW SUCCEEDED")
    if workflow.get("reboot"):
        Path("/worker/reboot").write_text("workflow done\n")
        say("WORKFLOW asked for a reboot (/worker/reboot)")


def main() -> None:
    say(marker())
    say(sees())
    url = workflow_url()
    if url:
        threading.Thread(target=run_workflow, args=(url,), daemon=True).start()
    while True:
        time.sleep(10)
        say(marker())


if __name__ == "__main__":
    main()
