"""`linuxkit build`: the OS's kernel and initrd from the rendered configs, all or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.refs import DOCKER_HUB, is_loopback, registry_of
from tasks.core.run import find_tool, run
from tasks.settings.builds import LINUXKIT_OUTPUTS


def mirrors_for(refs: Sequence[str]) -> list[str]:
    """`--mirror` values that make LinuxKit v1.8.2 pull each image from its own registry.

    LinuxKit v1.8.1 and v1.8.2 drop the registry host of a reference when no mirror is given, and
    fetch `quay.io/x/y` or `127.0.0.1:5000/x/y` from Docker Hub (fixed upstream after v1.8.2). A
    mirror of each registry to itself restores the right host; LinuxKit then uses the credentials of
    `docker login`. Loopback registries are spoken to over plain http, as docker does; others https.
    """
    mirrors = []
    for registry in sorted({registry_of(r) for r in refs} - DOCKER_HUB):
        scheme = "http" if is_loopback(registry) else "https"
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
    An interrupt (Ctrl-C, SIGTERM) stops linuxkit (tasks.run.run) and removes the temporary folder, which
    is linuxkit's $TMPDIR too.
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
        # LinuxKit writes the whole image as a tar to $TMPDIR before it converts it, and a killed linuxkit
        # leaves that (hundreds of MB) behind: in our temporary folder it goes with the folder.
        run(argv, tool="linuxkit build", cwd=configs[0].parent, secrets=secrets, env={**os.environ, "TMPDIR": str(tmp)},
            fix="check the image names in the config and that they exist (local engine for dev builds)")
        made = {}
        for kind in LINUXKIT_OUTPUTS:
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
