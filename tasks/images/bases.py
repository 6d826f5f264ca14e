"""Base images: what each of our images is built FROM, and the identity of that base now.

An image's tag is a hash of what goes into it; its base is part of that. A base is known by:
- its digest, when the reference pins one (`ref@sha256:...`);
- its image id, when the local engine has it (a local base re-tagged to another image under the
  same name changes the id, so the images built on it get a new tag and are rebuilt);
- else its registry digest, looked up once (`docker buildx imagetools inspect`, the network) and
  recorded in out/images/bases.json; builds then use `ref@digest`, so the build and its tag agree.
  `doit bases` looks the recorded ones up again: an image whose base moved is rebuilt next time.

Every lookup but the first of a registry base is local (a file, the engine's socket), so a no-op
build needs no network.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tasks.core.files import atomic_write_text
from tasks.core.run import log_step
from tasks.images import engine

_ARG = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?\s*$", re.M | re.I)
_FROM = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", re.M | re.I)
_VAR = re.compile(r"^\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?$")
UNRESOLVED = "unresolved"


def dockerfile_bases(text: str) -> dict[str, str]:
    """The build args a Dockerfile's FROM lines name, with their defaults: {"BASE_IMAGE": "docker:27.5.1-dind"}.

    A literal `FROM ref` (not scratch, not an earlier stage) appears under the key `FROM ref`.
    """
    defaults: dict[str, str] = {}
    for name, value in _ARG.findall(text):
        defaults.setdefault(name, value)
    stages = {m.lower() for m in re.findall(r"^\s*FROM\s+.*?\s+AS\s+(\S+)", text, re.M | re.I)}
    found: dict[str, str] = {}
    for ref in _FROM.findall(text):
        var = _VAR.match(ref)
        if var:
            found[var.group(1)] = defaults.get(var.group(1), "")
        elif ref.lower() != "scratch" and ref.lower() not in stages:
            found[f"FROM {ref}"] = ref
    return found


def registry_digest(ref: str) -> str | None:
    """The digest of ref's manifest (or index) in its registry; None when it cannot be had."""
    try:
        done = subprocess.run(["docker", "buildx", "imagetools", "inspect", "--format", "{{json .Manifest}}", ref],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    try:
        digest = json.loads(done.stdout).get("digest", "")
    except ValueError:
        return None
    return digest if digest.startswith("sha256:") else None


def pin(ref: str, digest: str) -> str:
    return f"{ref}@{digest}"


@dataclass
class BaseResolver:
    """Resolves base references to (reference to build with, identity); registry digests are recorded."""

    record: Path
    recorded: dict[str, str] = field(default_factory=dict)
    _dirty: bool = False

    @classmethod
    def load(cls, record: Path) -> BaseResolver:
        try:
            data = json.loads(record.read_text())
            recorded = {ref: entry["digest"] for ref, entry in data.items() if isinstance(entry, dict)}
        except (OSError, ValueError, KeyError, AttributeError):
            recorded = {}
        return cls(record, recorded)

    def resolve(self, ref: str, *, refresh: bool = False) -> tuple[str, str]:
        known = None if refresh else self.known(ref)
        if known is not None:
            return known
        if "@sha256:" in ref:
            return ref, ref.split("@", 1)[1]
        log_step(f"base image {ref}: not in the local engine, looking up its digest in the registry")
        digest = registry_digest(ref)
        if digest is None:
            log_step(f"base image {ref}: its digest cannot be had now (no network or no such image); "
                     "the build will say why")
            return ref, UNRESOLVED
        if self.recorded.get(ref) != digest:
            if ref in self.recorded:
                log_step(f"base image {ref} moved: {self.recorded[ref]} -> {digest}")
            self.recorded[ref] = digest
            self._dirty = True
        return pin(ref, digest), digest

    def known(self, ref: str) -> tuple[str, str] | None:
        """What resolve gives without the network (a pinned digest, one recorded in bases.json, or the
        local engine's image id); None when the registry would have to be asked."""
        if "@sha256:" in ref:
            return ref, ref.split("@", 1)[1]
        if ref in self.recorded:
            return pin(ref, self.recorded[ref]), self.recorded[ref]
        local = engine.image_id(ref)
        return (ref, local) if local else None

    def save(self) -> None:
        if not self._dirty:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            old = json.loads(self.record.read_text())
        except (OSError, ValueError):
            old = {}
        data = {ref: {"digest": digest, "resolved": old.get(ref, {}).get("resolved", now)
                      if isinstance(old.get(ref), dict) and old[ref].get("digest") == digest else now}
                for ref, digest in sorted(self.recorded.items())}
        atomic_write_text(self.record, json.dumps(data, indent=2, sort_keys=True) + "\n")
        self._dirty = False


def base_ref(name: str, default: str, args: Mapping[str, str]) -> str:
    """The reference a FROM line uses: the build arg's value (or its default); a literal FROM as it is."""
    return default if name.startswith("FROM ") else args.get(name, default)


def _pinned_args(args: Mapping[str, str], bases: Mapping[str, str],
                 resolve: Callable[[str], tuple[str, str] | None]) -> tuple[dict[str, str], dict[str, str]] | None:
    built = dict(args)
    identities: dict[str, str] = {}
    for name, default in bases.items():
        ref = base_ref(name, default, args)
        if not ref:
            continue
        found = resolve(ref)
        if found is None:
            return None
        use, identities[ref] = found
        if use != ref and not name.startswith("FROM "):
            built[name] = use
    return built, identities


def resolve_args(args: Mapping[str, str], bases: Mapping[str, str], resolver: BaseResolver,
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """(build args with registry bases pinned to their digest, {base reference: identity})."""
    found = _pinned_args(args, bases, resolver.resolve)
    assert found is not None  # resolve always answers
    return found


def known_args(args: Mapping[str, str], bases: Mapping[str, str], resolver: BaseResolver,
               ) -> tuple[dict[str, str], dict[str, str]] | None:
    """What resolve_args would give, from what is known without the network (BaseResolver.known);
    None when a base needs a registry lookup."""
    return _pinned_args(args, bases, resolver.known)
