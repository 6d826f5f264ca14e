"""LinuxKit configs: render hook.yaml (and debug.yaml) per build and arch, load them as LinuxKit does, validate."""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tasks.core.errors import HookError

SCHEMA = Path(__file__).resolve().parents[2] / "linuxkit" / "schema-v1.8.2.json"


class Yaml12Loader(yaml.SafeLoader):
    """A loader that reads YAML as LinuxKit's yaml.v3 does: only true/false are booleans.

    PyYAML follows YAML 1.1, where on/off/yes/no are booleans too; LinuxKit would see strings.
    """


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def render(template: Path, values: Mapping[str, str]) -> str:
    """Fill ${name} placeholders; an unknown or malformed placeholder names the file and line."""
    text = template.read_text()
    try:
        return string.Template(text).substitute(values)
    except KeyError as exc:
        line = _line_of(text, "${" + str(exc.args[0]))
        known = ", ".join("${" + k + "}" for k in sorted(values))
        raise HookError(f"{template}:{line}: unknown placeholder ${{{exc.args[0]}}}; known: {known}") from None
    except ValueError as exc:
        raise HookError(f"{template}: {exc} (write a literal dollar sign as $$)") from None


def _line_of(text: str, needle: str) -> int:
    index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 0


@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    return jsonschema.Draft4Validator(schema)


def parse(text: str, source: str) -> dict[str, Any]:
    """Load a rendered config and validate it against LinuxKit v1.8.2's own schema."""
    try:
        data = yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HookError(f"{source}{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise HookError(f"{source}: a LinuxKit config is a mapping (kernel:, init:, services: ...)")
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        first = errors[0]
        key = _json_path(first.absolute_path)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise HookError(f"{source}: {key}: {first.message}{more}; see LinuxKit's docs/yaml.md")
    return data


def _json_path(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def images_of(config: Mapping[str, Any]) -> list[str]:
    """Every image a config names (kernel, init, onboot, onshutdown, services, volumes)."""
    refs = [config.get("kernel", {}).get("image")] + list(config.get("init") or [])
    for section in ("onboot", "onshutdown", "services", "volumes"):
        refs += [entry.get("image") for entry in config.get(section) or []]
    return [r for r in refs if r]


def ssh_public_keys(patterns: Sequence[str]) -> str:
    """The user's public keys, from files or globs; refuse when there are none."""
    found: list[Path] = []
    for pattern in patterns:
        found += [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    keys = []
    for path in found:
        for line in path.read_text(errors="replace").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                if not line.split()[0].startswith(("ssh-", "ecdsa-", "sk-")):
                    raise HookError(f"{path}: {line[:30]!r}... is not an ssh public key; set ssh_keys=FILE.pub")
                keys.append(line.strip())
    if not keys:
        tried = ", ".join(patterns) or "(empty)"
        raise HookError(f"no ssh public key found in {tried}: make one (ssh-keygen) or set ssh_keys=PATH.pub")
    return "\n".join(keys) + "\n"
