"""LinuxKit configs: render hook.yaml (and debug.yaml) per build and arch, validate, run `linuxkit build`."""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import string
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tasks.arch import Arch
from tasks.errors import HookError
from tasks.files import atomic_write_text
from tasks.run import find_tool, run

SCHEMA = Path(__file__).resolve().parent.parent / "linuxkit" / "schema-v1.8.2.json"
OUTPUTS = ("kernel", "initrd.img", "cmdline")


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


DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_LOOPBACK = re.compile(r"^(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?$")


def registry_of(ref: str) -> str:
    """The registry host[:port] of an image reference ("docker.io" for Docker Hub's short names)."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def mirrors_for(refs: Sequence[str]) -> list[str]:
    """`--mirror` values that make LinuxKit v1.8.2 pull each image from its own registry.

    LinuxKit v1.8.1 and v1.8.2 drop the registry host of a reference when no mirror is given, and
    fetch `quay.io/x/y` or `127.0.0.1:5000/x/y` from Docker Hub (fixed upstream after v1.8.2). A
    mirror of each registry to itself restores the right host; LinuxKit then uses the credentials of
    `docker login`. Loopback registries are spoken to over plain http, as docker does; others https.
    """
    mirrors = []
    for registry in sorted({registry_of(r) for r in refs} - DOCKER_HUB):
        scheme = "http" if _LOOPBACK.match(registry) else "https"
        mirrors.append(f"{registry}={scheme}://{registry}")
    return mirrors


def build(
    *,
    linuxkit: str,
    configs: Sequence[Path],
    arch: Arch,
    name: str,
    outdir: Path,
    local_images: bool,
    mirrors: Sequence[str] = (),
    secrets: Sequence[str] = (),
) -> dict[str, Path]:
    """Run `linuxkit build --format kernel+initrd` (v1.8.2 CLI) into outdir, all or nothing.

    LinuxKit writes into a fresh temporary directory beside outdir; its outputs are moved into
    place only when it succeeded, so a failure never leaves a kernel or initrd that looks finished.
    Its working directory is the configs' folder, where `source:` paths of `files` entries point.
    An interrupt (Ctrl-C, SIGTERM) stops linuxkit (tasks.run.run) and removes the temporary folder.
    """
    exe = find_tool(linuxkit, setting="linuxkit")
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".linuxkit-", dir=outdir))
    try:
        argv = [exe, "build", "--format", "kernel+initrd", "--arch", arch.docker, "--name", name,
                "--dir", str(tmp), "--no-sbom"]
        if local_images:
            argv.append("--docker")
        for mirror in mirrors:
            argv += ["--mirror", mirror]
        argv += [str(c) for c in configs]
        run(argv, tool="linuxkit build", cwd=configs[0].parent, secrets=secrets,
            fix="check the image names in the config and that they exist (local engine for dev builds)")
        made = {}
        for kind in OUTPUTS:
            produced = tmp / f"{name}-{kind}"
            if kind != "cmdline" and not produced.is_file():
                raise HookError(f"linuxkit build wrote no {produced.name}: is {exe} LinuxKit v1.8.2?")
            made[kind] = produced
        final = {}
        for kind, produced in made.items():
            target = outdir / produced.name
            if produced.exists():
                os.replace(produced, target)
            elif target.exists():
                target.unlink()
            final[kind] = target
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_rendered(path: Path, text: str) -> None:
    atomic_write_text(path, text)
