"""Tarballs and checksums: byte-identical for identical inputs, `sha512sum -c` passes."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from tasks.core.errors import HookError
from tasks.media.package import package


def _inputs(tmp_path: Path) -> dict[str, list[Path]]:
    per_arch = {}
    for arch in ("x86_64", "aarch64"):
        folder = tmp_path / "in" / arch
        folder.mkdir(parents=True)
        (folder / f"vmlinuz-{arch}").write_bytes(b"kernel " + arch.encode() * 1000)
        (folder / f"initramfs-{arch}").write_bytes(b"initramfs " + arch.encode() * 2000)
        per_arch[arch] = [folder / f"vmlinuz-{arch}", folder / f"initramfs-{arch}"]
    return per_arch


def test_package_layout_and_checksums(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    made = package(dist=dist, prefix="hook", version="abc123", per_arch=_inputs(tmp_path), mtime=1600000000)
    assert sorted(p.name for p in made) == ["hook-abc123.tar.gz", "hook_aarch64.tar.gz", "hook_x86_64.tar.gz"]
    with tarfile.open(dist / "hook-abc123.tar.gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["./initramfs-aarch64", "./initramfs-x86_64", "./vmlinuz-aarch64",
                                         "./vmlinuz-x86_64"]
    assert {(m.uid, m.gid, m.mtime, m.mode) for m in members} == {(0, 0, 1600000000, 0o644)}
    with tarfile.open(dist / "hook_x86_64.tar.gz") as tar:
        assert tar.getnames() == ["./initramfs-x86_64", "./vmlinuz-x86_64"]
    header = (dist / "hook_x86_64.tar.gz").read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\0" * 4  # gzip, header mtime 0
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)


def test_one_arch_combined_tarball_holds_that_arch(tmp_path: Path) -> None:
    per_arch = {"x86_64": _inputs(tmp_path)["x86_64"]}
    dist = tmp_path / "dist"
    package(dist=dist, prefix="hook", version="v1", per_arch=per_arch, mtime=5)
    with tarfile.open(dist / "hook-v1.tar.gz") as tar:
        assert tar.getnames() == ["./initramfs-x86_64", "./vmlinuz-x86_64"]
        assert tar.extractfile("./initramfs-x86_64").read() == per_arch["x86_64"][1].read_bytes()
    lines = (dist / "checksum.txt").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["hook-v1.tar.gz", "hook_x86_64.tar.gz"]
    subprocess.run(["sha512sum", "-c", "checksum.txt"], cwd=dist, check=True, capture_output=True)
    assert not [p.name for p in dist.iterdir() if p.name.startswith(".")]  # no temporary left


def test_same_inputs_same_bytes_and_old_versions_removed(tmp_path: Path) -> None:
    per_arch = _inputs(tmp_path)
    package(dist=tmp_path / "a", prefix="hook", version="v1", per_arch=per_arch, mtime=5)
    package(dist=tmp_path / "b", prefix="hook", version="v1", per_arch=per_arch, mtime=5)
    for name in ("hook-v1.tar.gz", "hook_x86_64.tar.gz", "checksum.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    package(dist=tmp_path / "a", prefix="hook", version="v2", per_arch=per_arch, mtime=5)
    assert not (tmp_path / "a" / "hook-v1.tar.gz").exists()
    assert "hook-v1" not in (tmp_path / "a" / "checksum.txt").read_text()


def test_missing_input_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    per_arch = _inputs(tmp_path)
    per_arch["x86_64"][1].unlink()
    with pytest.raises(HookError, match="initramfs-x86_64 is missing: run the build"):
        package(dist=tmp_path / "d", prefix="hook", version="v1", per_arch=per_arch, mtime=5)
    assert not list((tmp_path / "d").glob("hook*"))
