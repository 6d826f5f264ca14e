"""Image references as docker writes them: `[registry[:port]/]path[:tag][@sha256:digest]`.

One grammar for every stage: the settings check them, the image stages find their registry, the
embedded images split them into repository, tag and digest.
"""

from __future__ import annotations

import re

#: Loose docker reference, lowercase; `{arch}` may stand in a tag (settings expand it later).
REF = re.compile(r"^[a-z0-9]+([._:-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[\w.{}-]+)?(@sha256:[0-9a-f]{64})?$")
#: A registry and org (no tag): quay.io/tinkerbell, 127.0.0.1:5000/me.
ORG = re.compile(r"^[a-z0-9]+([._:-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
#: REPOSITORY:TAG with no digest and no placeholder: a name an image can be tagged as.
TAGGED = re.compile(r"^[a-z0-9]+([._:-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*:[\w][\w.-]{0,127}$")

DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_LOOPBACK = re.compile(r"^(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?$")


def split_tag(ref: str) -> tuple[str, str, str]:
    """(repository, tag, digest) of a reference; tag and digest may be empty."""
    rest, _, digest = ref.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest
    return rest, "", digest


def registry_of(ref: str) -> str:
    """The registry host[:port] of an image reference ("docker.io" for Docker Hub's short names)."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def is_loopback(registry: str) -> bool:
    """A registry on this machine (docker speaks plain http to it)."""
    return bool(_LOOPBACK.match(registry))
