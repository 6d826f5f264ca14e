"""The real LinuxKit v1.8.2 accepts every config we ship, rendered with every setting that changes its
text: `linuxkit build --dry-run` validates, merges, re-encodes with yaml.v3 and parses again (the step
that refused the motd block), without needing any image."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.core.arch import Arch
from tasks.hookos import config as linuxkit
from tasks.hookos import stage
from tasks.settings import builds, load_settings
from tests.pipeline_env import ROOT, linuxkit_binary

RENDERINGS = {
    "defaults": {},
    "mirror org with a port": {"pkg_org": "127.0.0.1:5000/mirror/linuxkit", "kernel": "127.0.0.1:5000/k/kernel:6.6.71",
                               "org": "127.0.0.1:5000/hook"},
    "pinned kernel": {"kernel": "linuxkit/kernel:6.6.71@sha256:" + "ab" * 32},
}


@pytest.fixture(scope="module")
def real_linuxkit() -> Path:
    try:
        return linuxkit_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _settings(tmp_path: Path, values: dict[str, str]):  # noqa: ANN202 - Settings
    (tmp_path / "linuxkit").mkdir()
    for name in ("hook.yaml", "debug.yaml"):
        shutil.copy(ROOT / "linuxkit" / name, tmp_path / "linuxkit" / name)
    (tmp_path / "id.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHookTestKey tester@hook\n")
    given = {"ssh_keys": str(tmp_path / "id.pub"), "version": "test", "source_date_epoch": "0", **values}
    settings = load_settings(lambda name, default: given.get(name, default), environ={}, root=ROOT)
    return dataclasses.replace(settings, root=tmp_path)


@pytest.mark.parametrize("rendering", list(RENDERINGS))
@pytest.mark.parametrize("arch", list(Arch), ids=str)
@pytest.mark.parametrize("build", list(builds.BUILDS))
def test_real_linuxkit_accepts_the_shipped_configs(real_linuxkit: Path, tmp_path: Path, build: str, arch: Arch,
                                                   rendering: str) -> None:
    settings = _settings(tmp_path, RENDERINGS[rendering])
    chosen = builds.get_build(build)
    suffix = f"-{arch.docker}" if chosen.local else ""
    ours = ("hook-docker", "hook-bootkit", "hook-events", "hook-kernel")
    refs = {name: f"{settings.org}/{name}:0123456789abcdef01234567{suffix}" for name in ours}
    configs = stage.render_configs(settings, chosen, arch, refs)
    done = subprocess.run([str(real_linuxkit), "build", "--dry-run", "--arch", arch.docker, *map(str, configs)],
                          cwd=configs[0].parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    merged = done.stdout
    assert f"console={arch.serial_console}" in merged
    for name, ref in refs.items():
        if name == "hook-kernel" and settings.kernel:
            assert f"image: {settings.kernel}" in merged  # the setting `kernel` names another kernel
            continue
        assert ref in merged
    if chosen.flavour == "debug":
        assert "name: sshd" in merged and "authorized_keys" in merged
    # what we validated with the schema is what LinuxKit took: same images, same order
    ours = [r for c in configs for r in linuxkit.images_of(linuxkit.parse(c.read_text(), c.name))]
    for ref in ours:
        assert f"{ref}\n" in merged


def test_real_linuxkit_refuses_what_pyyaml_takes(real_linuxkit: Path, tmp_path: Path) -> None:
    """The fault this test file exists for: a literal block that starts with an empty line."""
    config = tmp_path / "bad.yaml"
    config.write_text('files:\n  - path: etc/motd\n    contents: |\n\n      Welcome\n    mode: "0644"\n')
    linuxkit.parse(config.read_text(), "bad.yaml")  # our schema check cannot see it ...
    done = subprocess.run([str(real_linuxkit), "build", "--dry-run", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0  # ... the real tool refuses it
    assert "invalid config: yaml: line" in done.stderr  # the re-encoded YAML does not parse
