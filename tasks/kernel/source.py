"""Our kernel, flavour `source`: built from a kernel source tarball with our config (docs/kernel.md).

The image task of `hook-kernel` runs this instead of a Dockerfile build:
1. the tarball: `kernel_src`, a URL downloaded once into <cache_dir>/kernel-src/ (checked against
   `kernel_src_sha256`, stored under its sha256) or a local file;
2. the builder, `hook-kernel-builder` (containers/hook-kernel/source/Dockerfile), a tools image;
3. `docker run` of the builder's build.sh with the tarball, the config (containers/hook-kernel/
   source/config-<arch>, or `kernel_config`) and <cache_dir>/ccache bound in: LinuxKit's kernel
   image files in a temporary folder;
4. those files as the image `<org>/hook-kernel:<hash>-<arch>`, loaded or pushed with buildx.

The tag hashes the builder's files, its base, the tarball's sha256 and the config, so an unchanged
kernel is never built again. `doit kernel_config` runs the builder's menuconfig on our config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import atomic_writer, file_digest
from tasks.core.run import find_tool, log_step, run
from tasks.images import docker, tools
from tasks.images.specs import ImageSpec, content_hash, image_ref, read_record, resolve

if TYPE_CHECKING:
    from tasks.images.bases import BaseResolver
    from tasks.settings import Settings

#: The builder: gcc (and gcc-aarch64-linux-gnu), make, ccache, kmod, the firmware packages.
BUILDER = ImageSpec("hook-kernel-builder", (("BASE_IMAGE", "debian_builder"), ("KERNEL_SUITE", "kernel_suite")),
                    folders=("hook-kernel/source", "hook-kernel/common"),
                    dockerfile_path="hook-kernel/source/Dockerfile", extra_args=False)
BUILDER_VERSIONS = "/usr/share/hook-kernel/versions"
#: The image of the files build.sh made: LinuxKit reads /kernel and /kernel.tar.
PACKAGE_DOCKERFILE = "FROM scratch\nCOPY kernel kernel.tar kernel.json kernel.config /\n"
CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = (15, 60)


def config_path(settings: Settings, arch: Arch) -> Path:
    """The kernel config of one arch: the setting, else ours in the repo."""
    if settings.kernel_config:
        return Path(settings.kernel_config)
    return settings.root / "containers" / "hook-kernel" / "source" / f"config-{arch}"


def source_files(settings: Settings) -> list[Path]:
    """Files outside containers/ the source kernel is made of (its tasks' file_dep): a local tarball, a config."""
    found = [Path(settings.kernel_src)] if settings.kernel_src and "://" not in settings.kernel_src else []
    return found + ([Path(settings.kernel_config)] if settings.kernel_config else [])


# --- the tarball ---------------------------------------------------------------------------------


def source_tarball(settings: Settings) -> tuple[Path, str]:
    """(the kernel source tarball, its sha256): a local file, or a URL's download in the cache."""
    wanted = settings.kernel_src_sha256
    if "://" not in settings.kernel_src:
        path = Path(settings.kernel_src)
        got = file_digest(path)
        if wanted and got != wanted:
            raise HookError(f"kernel_src={path} has sha256 {got}, kernel_src_sha256 is {wanted}: give the tarball "
                            "that sum is for, or fix kernel_src_sha256")
        return path, got
    name = settings.kernel_src.rstrip("/").rsplit("/", 1)[-1] or "linux.tar"
    final = settings.cache_dir / "kernel-src" / wanted / name
    if final.is_file():
        return final, wanted
    final.parent.mkdir(parents=True, exist_ok=True)
    got = _download(settings.kernel_src, final, wanted)
    return final, got


def _download(url: str, final: Path, wanted: str) -> str:
    """Stream url into final (atomically), checking its sha256; a wrong one leaves nothing."""
    import requests  # only here: it costs ~0.1 s of every doit start-up

    digest = hashlib.sha256()
    log_step(f"downloading the kernel source {url} ...")
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT) as response, atomic_writer(final) as out:
            if response.status_code >= 400:
                raise HookError(f"cannot download kernel_src={url}: HTTP {response.status_code}; check the URL")
            done, step = 0, 50 << 20
            for block in response.iter_content(CHUNK):
                out.write(block)
                digest.update(block)
                done += len(block)
                if done >= step:
                    log_step(f"  {done / 1e6:.0f} MB")
                    step += 50 << 20
            if digest.hexdigest() != wanted:
                raise HookError(f"kernel_src={url} has sha256 {digest.hexdigest()}, kernel_src_sha256 is {wanted}: "
                                "nothing was kept; check the URL and the sum (kernel.org's sha256sums.asc)")
    except requests.RequestException as exc:
        raise HookError(f"cannot download kernel_src={url}: {type(exc).__name__}; check the URL and the network, "
                        "or give a local tarball") from None
    return digest.hexdigest()


# --- the image -----------------------------------------------------------------------------------


def _tag(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path], resolver: BaseResolver,
         source_sha256: str, config: Path) -> tuple[dict[str, str], dict[str, str], str]:
    resolved = resolve(spec, settings, arch, resolver)
    resolver.save()
    inputs = {"args": resolved.args, "bases": resolved.bases, "source": source_sha256,
              "config": file_digest(config), "arch": arch.value}
    return resolved.args, resolved.bases, content_hash(spec, settings.root, files, inputs)


def make_kernel(spec: ImageSpec, settings: Settings, arch: Arch, files: Iterable[Path], record: Path,
                resolver: BaseResolver, *, push: bool) -> None:
    """`image_load` / `image_push` of the source kernel: build it (unless that tag is there) and record it."""
    config = config_path(settings, arch)
    if not config.is_file():
        raise HookError(f"no kernel config {config} for {arch}: give kernel_config=FILE (doit kernel_config makes one)")
    tarball, source_sha256 = source_tarball(settings)
    args, bases, tag = _tag(spec, settings, arch, files, resolver, source_sha256, config)
    ref = image_ref(settings, spec, tag, arch)
    client = docker.client(settings)
    old = read_record(record)
    present = docker.remote_manifest(ref) is not None if push else client.image.exists(ref)
    report = old.get("report") if old and old.get("tag") == tag else None
    if present and report is None and not push:
        report = _report_of_local(ref)
    if present and report is not None:
        log_step(f"{ref} is {'in the registry' if push else 'in the local engine'} already: not rebuilt")
    else:
        report = _build(spec, settings, arch, ref, resolver, tarball, config, push=push)
    record.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"ref": ref, "tag": tag, "arch": arch.value, "platform": arch.docker_platform,
                            "bases": bases, "args": args, "source_sha256": source_sha256, "report": report}
    if push:
        manifest = docker.remote_manifest(ref)
        if manifest is None or manifest.config is None:
            raise HookError(f"{ref} was pushed but the registry does not show it: docker login and try again")
        data["config"] = manifest.config.digest
    else:
        data.update(local=True, id=client.image.inspect(ref).id)
    with atomic_writer(record) as out:
        out.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _build(spec: ImageSpec, settings: Settings, arch: Arch, ref: str, resolver: BaseResolver, tarball: Path,
           config: Path, *, push: bool) -> dict[str, Any]:
    tools.build(settings, BUILDER, resolver, versions=BUILDER_VERSIONS)
    builder = tools.recorded_ref(settings, BUILDER, "image_load:hook-kernel")
    work = settings.out / "kernel" / "source" / arch.value
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=work) as folder:
        out = Path(folder)
        _run_builder(settings, builder, arch, tarball, config, out)
        (out / "Dockerfile").write_text(PACKAGE_DOCKERFILE)
        docker.buildx_build(spec, settings, arch, ref, {}, push=push, context=out, dockerfile=out / "Dockerfile")
        return json.loads((out / "kernel.json").read_text())


def _run_builder(settings: Settings, builder: str, arch: Arch, tarball: Path, config: Path, out: Path,
                 *, make_targets: list[str] | None = None, interactive: bool = False) -> None:
    """build.sh in the builder: the kernel (into out), or make targets on a copy of the config (out/config)."""
    exe = find_tool("docker")
    ccache = settings.cache_dir / "ccache"
    ccache.mkdir(parents=True, exist_ok=True)
    name = f"hook-kernel-build-{uuid.uuid4().hex[:12]}"
    mounts = ["-v", f"{tarball.resolve()}:/src/linux.tar:ro", "-v", f"{ccache.resolve()}:/ccache",
              "-v", f"{out.resolve()}:/out"]
    if make_targets:
        shutil.copyfile(config, out / "config")
        mounts += ["-v", f"{out.resolve()}:/src/edit"]
        mounts += ["-e", "HOOK_CONFIG=/src/edit/config"]
    else:
        mounts += ["-v", f"{config.resolve()}:/src/config:ro"]
    argv = [exe, "run", "--rm", "--init", "--name", name, "--network", "none", "--pull", "never",
            "-e", f"SOURCE_DATE_EPOCH={settings.source_date_epoch}", *mounts]
    if interactive:
        argv.insert(2, "-it")
    argv += [builder, arch.docker, *(make_targets or [])]
    try:
        if interactive:
            done = subprocess.run(argv)
            if done.returncode != 0:
                raise HookError(f"make {' '.join(make_targets or [])} in the kernel builder failed (exit "
                                f"{done.returncode}); the config was not changed")
        else:
            run(argv, tool="kernel build", fix="see the build's lines above")
    except BaseException:  # interrupted or failed: the container goes too
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([exe, "rm", "-f", name], capture_output=True, timeout=30)
        raise


def _report_of_local(ref: str) -> dict[str, Any] | None:
    """The /kernel.json of a kernel image in the local engine (docker create + cp: nothing runs)."""
    exe = find_tool("docker")
    created = subprocess.run([exe, "create", ref, "/none"], capture_output=True, text=True)
    if created.returncode != 0:
        return None
    container = created.stdout.strip()
    try:
        done = subprocess.run([exe, "cp", f"{container}:/kernel.json", "-"], capture_output=True)
        if done.returncode != 0:
            return None
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
            member = tar.extractfile("kernel.json")
            return json.loads(member.read()) if member else None
    finally:
        subprocess.run([exe, "rm", container], capture_output=True)


# --- doit kernel_config ----------------------------------------------------------------------------


def edit_config(settings: Settings, arch: Arch, resolver: BaseResolver, *, tool: str) -> None:
    """`doit kernel_config`: run make <tool> (menuconfig, nconfig, olddefconfig, ...) on our config in the
    builder, then save the result back over it as a savedefconfig (atomically; a failure changes nothing)."""
    config = config_path(settings, arch)
    if not config.is_file():
        raise HookError(f"no kernel config {config} for {arch}: copy one there first (a savedefconfig or a .config)")
    if not settings.kernel_src:
        raise HookError("doit kernel_config needs the kernel source: set kernel_src= (a tarball or URL)")
    tarball, _ = source_tarball(settings)
    tools.build(settings, BUILDER, resolver, versions=BUILDER_VERSIONS)
    builder = tools.recorded_ref(settings, BUILDER, "kernel_config")
    interactive = tool in ("menuconfig", "nconfig", "config") and sys.stdin.isatty()
    if tool in ("menuconfig", "nconfig", "config") and not interactive:
        raise HookError(f"make {tool} needs a terminal: run doit kernel_config on one (or --tool olddefconfig)")
    with tempfile.TemporaryDirectory(prefix=".config-", dir=settings.out) as folder:
        out = Path(folder)
        _run_builder(settings, builder, arch, tarball, config, out, make_targets=[tool], interactive=interactive)
        result = out / "config.new"
        if not result.is_file():
            raise HookError("the kernel builder saved no config; the config was not changed")
        with atomic_writer(config) as handle:
            handle.write(result.read_bytes())
    log_step(f"{config} saved ({os.path.getsize(config)} bytes, savedefconfig form)")
