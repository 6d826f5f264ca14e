"""What the local docker engine holds, read in about a millisecond over its unix socket.

doit loads dodo.py for every command, a no-op build included, and the image tags depend on the
identity of the base images in the local engine. The docker SDK would answer too, but importing it
costs about 120 ms of the 300 ms a no-op build may take, and the docker CLI (python-on-whales) costs
a process per question. So this asks the Engine API directly: one GET /images/json for every image.

Only a local unix socket is read this way (DOCKER_HOST unset or unix://). For another DOCKER_HOST
(tcp://, ssh://) or a docker context, `local_images()` falls back to the docker CLI.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
from collections.abc import Mapping

from hookcommon.unixhttp import UnixHTTPConnection

DEFAULT_SOCKET = "/var/run/docker.sock"


def _socket_path(environ: Mapping[str, str]) -> str | None:
    host = environ.get("DOCKER_HOST", "")
    if environ.get("DOCKER_CONTEXT"):
        return None
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    return None


def _from_socket(path: str) -> dict[str, str] | None:
    try:
        conn = UnixHTTPConnection(path, timeout=5)
        try:
            conn.request("GET", "/images/json")
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
    except OSError:
        return None
    if answer.status != 200:
        return None
    images: dict[str, str] = {}
    for image in json.loads(body):
        for name in image.get("RepoTags") or []:
            if name != "<none>:<none>":
                images[name] = image["Id"]
    return images


def _from_cli() -> dict[str, str] | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["docker", "image", "ls", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return {name: ident for name, _, ident in (line.partition(" ") for line in done.stdout.splitlines())
                    if not name.startswith("<none>")}
    return None


@functools.cache
def local_images() -> Mapping[str, str] | None:
    """{"repo:tag": image id} of the local engine, or None when it cannot be asked (not running)."""
    path = _socket_path(os.environ)
    return _from_socket(path) if path else _from_cli()


def image_id(ref: str) -> str | None:
    """The local image id of ref (a short name gets Docker Hub's `:latest` rule), or None."""
    images = local_images()
    if images is None:
        return None
    name = ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"
    found = images.get(name)
    if found is None and name.startswith("docker.io/"):
        found = images.get(name.removeprefix("docker.io/").removeprefix("library/"))
    return found
