"""docker and buildx through python-on-whales: the one checked client, builds, registry manifests.

python-on-whales is imported only when a docker call is made (it costs 0.2 s of doit's start-up).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.refs import registry_of
from tasks.core.run import STEP_ERROR, log_step, timed
from tasks.images.specs import CONTAINERS, ImageSpec

if TYPE_CHECKING:
    from tasks.settings import Settings


@functools.cache
def _checked() -> Any:
    """The docker client, checked once per process: the daemon answers and buildx is there."""
    from python_on_whales import DockerClient
    from python_on_whales.exceptions import DockerException

    client = DockerClient()
    with timed("docker version"):
        try:
            client.version()
        except DockerException as exc:
            raise HookError(
                f"docker daemon not reachable ({last_line(exc)}): start dockerd, check DOCKER_HOST"
            ) from None
        except FileNotFoundError:
            raise HookError("docker not found: install Docker (Debian: apt-get install docker.io)") from None
        try:
            client.buildx.version()
        except DockerException:
            raise HookError("docker buildx not installed: install it (Debian trixie: docker-buildx)") from None
    return client


def client(settings: Settings) -> Any:
    """The checked docker client; a named buildx builder must exist (said before any build fails on it)."""
    if settings.builder:
        _check_builder(settings.builder)
    return _checked()


@functools.cache
def _check_builder(name: str) -> None:
    from python_on_whales.exceptions import DockerException

    try:
        _checked().buildx.inspect(name)
    except DockerException:
        raise HookError(
            f"buildx builder {name!r} not found: `docker buildx ls` lists them, `docker buildx create --name {name}` "
            "makes one; or leave builder= empty for the current one"
        ) from None


def last_line(exc: Exception) -> str:
    text = (getattr(exc, "stderr", None) or str(exc)).strip().splitlines()
    lines = [line.strip() for line in text if line.strip() and not line.startswith(("#", "---"))]
    return lines[-1] if lines else type(exc).__name__


def docker_fix(message: str, registry: str) -> str:
    lowered = message.lower()
    if any(s in lowered for s in ("unauthorized", "no basic auth", "authentication required", "denied")):
        return f"docker login {registry} (the registry refused our credentials)"
    if "connection refused" in lowered or "no such host" in lowered:
        return f"check that the registry {registry} is up and reachable"
    if "pull access denied" in lowered or "not found" in lowered:
        return "check the base image settings (bootkit_base, docker_base, build_image) exist locally or remotely"
    return "see the build output above"


def _stream(lines: Iterator[str], errors: list[str]) -> None:
    for line in lines:
        print(f"  {line.rstrip()}", flush=True)
        found = STEP_ERROR.search(line.rstrip())
        if found:
            errors.append(found.group(1))


def buildx_build(spec: ImageSpec, settings: Settings, arch: Arch, ref: str | None, args: dict[str, str], *,
                 push: bool, target: str | None = None, output_dir: Path | None = None,
                 context: Path | None = None, dockerfile: Path | None = None) -> None:
    """docker buildx build of one image for one arch: loaded into the local engine, pushed, or (with
    output_dir) the files of `target` written into that folder. The context is containers/ and the
    Dockerfile the spec's, unless given."""
    from python_on_whales.exceptions import DockerException

    docker = client(settings)
    secrets = [f"id=ca,src={settings.build_ca}"] if settings.build_ca else []
    what = f"{spec.name} --target {target}" if target else ref
    how = "files" if output_dir else ("push" if push else "load")
    log_step(f"building {what} for {arch.docker_platform} ({how})")
    errors: list[str] = []
    with timed("docker buildx build"):
        try:
            _stream(
                docker.buildx.build(
                    context or settings.root / CONTAINERS,
                    file=dockerfile or spec.dockerfile(settings.root),
                    platforms=[arch.docker_platform],
                    tags=[ref] if ref else [],
                    build_args=args,
                    builder=settings.builder,
                    load=not push and output_dir is None,
                    push=push,
                    target=target,
                    output={"type": "local", "dest": str(output_dir)} if output_dir else {},
                    secrets=secrets,
                    progress="plain",
                    stream_logs=True,
                ),
                errors,
            )
        except DockerException as exc:
            if errors:  # the step said what is wrong, in one line
                raise HookError(f"{spec.name} ({arch}): {errors[-1]}") from None
            msg = last_line(exc)
            fix = docker_fix(msg, registry_of(ref or spec.name))
            raise HookError(
                f"docker buildx build of {what} failed (exit {exc.return_code}): {msg}; try: {fix}"
            ) from None


def remote_manifest(ref: str) -> Any | None:
    """The manifest (or index) of ref in its registry, or None when it cannot be had."""
    from python_on_whales.exceptions import DockerException

    try:
        return _checked().buildx.imagetools.inspect(ref)
    except DockerException:
        return None
