"""tests/linuxkit-standin: the LinuxKit v1.8.2 `build` stand-in the pipeline's tests run against.

Its CLI (pflag's parsing and errors), schema validation, config merging, image checks (local
docker engine and a real registry with auth) and its kernel+initrd outputs, down to the cpio
bytes, plus one QEMU boot of what it writes.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tasks import qemu

STANDIN = Path(__file__).resolve().parent / "linuxkit-standin"
TAG = f"t{uuid.uuid4().hex[:10]}"
MTIME = 1492533000


def standin(
    *args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STANDIN), *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


def fails(proc: subprocess.CompletedProcess[str], text: str) -> str:
    """Exit 1; the error is the last line on stderr, one line naming the stand-in (never 'linuxkit:').

    Progress lines (LinuxKit's log.Infof, silenced by -q) may come before it.
    """
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("linuxkit stand-in: "), proc.stderr
    assert text in lines[-1], proc.stderr
    assert not any(line.startswith("linuxkit:") for line in lines)
    return lines[-1]


@dataclass
class CpioEntry:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    devmajor: int
    devminor: int
    data: bytes


def read_cpio(archive: bytes) -> tuple[list[CpioEntry], int]:
    """Parse newc; return the entries (without the trailer) and the trailer's end offset."""
    entries, pos = [], 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = archive[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert f[:11] == [0] * 11
            return entries, pos
        entries.append(CpioEntry(name, f[0], f[1], f[2], f[3], f[4], f[5], f[7], f[8], data))


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(docker_engine: None, base_images: dict[str, str]) -> Iterator[dict[str, str]]:
    """Local tags made for this module (removed at the end): amd64 busybox, arm64 busybox, python."""
    tags = {
        "amd64": f"standin-test/busybox:{TAG}",
        "arm64": f"standin-test/busybox-arm64:{TAG}",
        "other": f"standin-test/other:{TAG}",
    }
    sources = {"amd64": "local/busybox:amd64", "arm64": "local/busybox:arm64", "other": "local/python-base:amd64"}
    for key, tag in tags.items():
        subprocess.run(["docker", "tag", sources[key], tag], check=True, capture_output=True)
    yield tags
    subprocess.run(["docker", "rmi", *tags.values()], capture_output=True)


def hook_like_config(image: str, *, cmdline: str = "console=ttyS0 panic=-1 hook=1") -> str:
    return f"""
kernel:
  image: {image}
  cmdline: "{cmdline}"
init:
  - {image}
onboot:
  - name: sysctl
    image: {image}
    net: on
services:
  - name: getty
    image: {image}
    env: ["INSECURE=true"]
  - name: worker
    image: {image}
files:
  - path: /etc/hook/motd
    contents: "hello\\n"
    mode: "0644"
  - path: etc/hook/owned
    contents: "x"
    uid: getty
    gid: 7
  - path: var/lib/empty
    directory: true
  - path: etc/hook/link
    symlink: /etc/hook/motd
  - path: etc/hook/from-source
    source: payload.txt
    mode: "0755"
  - path: etc/hook/optional
    source: does-not-exist.txt
    optional: true
  - path: etc/linuxkit.yml
    metadata: yaml
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, images: dict[str, str]) -> Path:
    """One --docker build of a hook-like config; its cwd holds the `source:` file."""
    work = tmp_path_factory.mktemp("standin-build")
    (work / "payload.txt").write_text("from the cwd\n")
    conf = work / "conf"
    conf.mkdir()
    (conf / "hook.yml").write_text(hook_like_config(images["amd64"]))
    out = work / "out"
    out.mkdir()
    proc = standin("build", "--docker", "--dir", out, "--arch", "amd64", "conf/hook.yml", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_version_and_help(tmp_path: Path) -> None:
    proc = standin("version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "linuxkit stand-in (v1.8.2 CLI)\n"
    for args in (["--help"], ["build", "--help"], ["build", "-h"]):
        proc = standin(*args, cwd=tmp_path)
        assert proc.returncode == 0 and "stand-in" in proc.stdout, args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-name", "x"], "unknown shorthand flag: 'n' in -name"),
        (["-dir", "."], "unknown shorthand flag: 'd' in -dir"),
        (["-docker"], "unknown shorthand flag: 'd' in -docker"),
        (["-arch", "amd64"], "unknown shorthand flag: 'a' in -arch"),
        (["-o", "x.tar"], "unknown shorthand flag: 'o' in -o"),
        (["-pull"], "unknown shorthand flag: 'p' in -pull"),
        # pflag reads -format as -f with the value "ormat"
        (["-format", "kernel+initrd"], "error parsing formats: unknown format type ormat"),
        (["--foo"], "unknown flag: --foo"),
        (["--dir", "missing-dir"], "output directory missing-dir does not exist"),
        (["-f", "iso-bios"], "the stand-in only writes kernel+initrd, not iso-bios"),
        (["--format", "kernel+initrd,raw-efi"], "the stand-in only writes kernel+initrd, not raw-efi"),
        (["-f", "tar"], "the stand-in only writes kernel+initrd, not tar"),
        (["-f", "tar", "-f", "kernel+initrd"], "format type tar must be the only format specified"),
        (["--o", "out.tar", "--name", "x"], "the -output option cannot be specified with -name"),
        (["--o", "out.tar", "--dir", "."], "the -output option cannot be specified with -dir"),
        (["--o", "out", "-f", "kernel+initrd"], "cannot be specified for build type kernel+initrd"),
        (["--input-tar", "x.tar", "--pull"], "cannot use --input-tar and --pull together"),
        (["--size", "big"], "unable to parse disk size"),
        (["--pull=maybe"], 'invalid argument "maybe" for "--pull" flag'),
        (["-v", "loud"], 'invalid argument "loud" for "-v, --verbose" flag'),
        (["---name"], "bad flag syntax: ---name"),
    ],
)
def test_rejected_flags(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "c.yml").write_text("kernel:\n  image: x/y:z\n")
    proc = standin("build", *args, "c.yml", cwd=tmp_path)
    fails(proc, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


def test_missing_flag_argument_and_config(tmp_path: Path) -> None:
    fails(standin("build", "c.yml", "--name", cwd=tmp_path), "flag needs an argument: --name")
    fails(standin("build", "c.yml", "-v", cwd=tmp_path), "flag needs an argument: 'v' in -v")
    fails(standin("build", cwd=tmp_path), "requires at least 1 arg(s), only received 0")
    fails(standin("build", "nope.yml", cwd=tmp_path), "cannot open config file: open nope.yml")
    fails(standin("frobnicate", cwd=tmp_path), 'unknown command "frobnicate"')


def test_accepted_flags(tmp_path: Path, images: dict[str, str]) -> None:
    """Every v1.8.2 build flag and global flag, in the forms pflag accepts."""
    (tmp_path / "c.yml").write_text(f"kernel:\n  image: {images['amd64']}\n  cmdline: a=b\n")
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "calls.jsonl"
    args = [
        "-v", "2", "--mirror", "docker.io=http://127.0.0.1:1", "--cert-file", "none.pem",
        "build", "--name", "n1", "--dir", str(out), "--size=2G", "--pull=false", "--docker",
        "--decompress-kernel=false", "--arch", "amd64", "-f", "kernel+initrd", "--format=kernel+initrd",
        "-fkernel+initrd", "--input-tar", "old.tar", "--cache", str(tmp_path / "cache"), "--no-sbom",
        "--sbom-output", "sbom.json", "--sbom-current-time=false", "-q", "--verbose=3", "--", "c.yml",
    ]  # fmt: skip
    proc = standin(*args, cwd=tmp_path, env={"HOOK_STANDIN_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # -q
    assert sorted(p.name for p in out.iterdir()) == ["n1-cmdline", "n1-initrd.img", "n1-kernel"]
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry == {"argv": args, "cwd": str(tmp_path)}


def test_flags_after_the_config_and_name_default(tmp_path: Path, images: dict[str, str]) -> None:
    (tmp_path / "a.yml").write_text(f"kernel:\n  image: {images['amd64']}\n")
    (tmp_path / "second.yaml").write_text("kernel:\n  cmdline: x=1\n")
    proc = standin("build", "a.yml", "--docker", "second.yaml", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # name = basename of the LAST config without extension; cmdline from the later file
    assert (tmp_path / "second-cmdline").read_text() == "x=1"
    assert (tmp_path / "second-kernel").is_file() and (tmp_path / "second-initrd.img").is_file()


def test_fail_env_and_log(tmp_path: Path) -> None:
    (tmp_path / "c.yml").write_text("kernel:\n  image: x/y:z\n")
    log = tmp_path / "log.jsonl"
    env = {"HOOK_STANDIN_FAIL": "simulated failure for a test", "HOOK_STANDIN_LOG": str(log)}
    fails(standin("build", "c.yml", cwd=tmp_path, env=env), "simulated failure for a test")
    # flags are still checked first
    fails(standin("build", "-name", "c.yml", cwd=tmp_path, env=env), "unknown shorthand flag")
    assert [json.loads(x)["argv"][:2] for x in log.read_text().splitlines()] == [
        ["build", "c.yml"],
        ["build", "-name"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml", "log.jsonl"]


# --------------------------------------------------------------------------------------------
# YAML, schema, merging
# --------------------------------------------------------------------------------------------


def schema_failure(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "c.yml").write_text(text)
    proc = standin("build", "--dry-run", "c.yml", cwd=tmp_path)
    fails(proc, "invalid config: invalid configuration file")
    lines = proc.stdout.splitlines()
    assert lines[0] == "The configuration file is invalid:"
    return lines[1:]


def test_unquoted_mode_is_rejected(tmp_path: Path) -> None:
    errors = schema_failure(tmp_path, "files:\n  - path: etc/x\n    contents: y\n    mode: 0644\n")
    assert errors == ["- files.0.mode: Invalid type. Expected: string, given: integer"]


def test_unknown_keys_and_missing_name(tmp_path: Path) -> None:
    errors = schema_failure(
        tmp_path,
        "kernel:\n  image: a/b:c\n  foo: 1\nbogus: true\nonboot:\n  - image: a/b:c\n    comand: [x]\n",
    )
    assert sorted(errors) == sorted(
        [
            "- (root): Additional property bogus is not allowed",
            "- kernel: Additional property foo is not allowed",
            "- onboot.0: name is required",
            "- onboot.0: Additional property comand is not allowed",
        ]
    )


def test_yaml_is_loaded_like_yaml_v3(tmp_path: Path) -> None:
    """`on`/`yes` stay strings (YAML 1.2-ish): valid for string fields, invalid for booleans."""
    ok = "onboot:\n  - name: a\n    image: a/b:c\n    net: on\n    pid: yes\n    hostname: 1:30\n    cwd: =\n"
    (tmp_path / "ok.yml").write_text(ok)
    proc = standin("build", "--dry-run", "ok.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = yaml.safe_load(proc.stdout)
    assert merged["onboot"][0]["net"] == "on" and merged["onboot"][0]["hostname"] == "1:30"
    assert merged["onboot"][0]["pid"] == "yes" and merged["onboot"][0]["cwd"] == "="
    errors = schema_failure(tmp_path, "files:\n  - path: a\n    contents: b\n    optional: yes\n")
    assert errors == ["- files.0.optional: Invalid type. Expected: boolean, given: string"]
    (tmp_path / "dup.yml").write_text("kernel:\n  image: a\n  image: b\n")
    fails(standin("build", "--dry-run", "dup.yml", cwd=tmp_path), 'mapping key "image" already defined')


def test_schema_path_from_env(tmp_path: Path) -> None:
    (tmp_path / "c.yml").write_text("kernel:\n  image: a/b:c\n")
    env = {"HOOK_STANDIN_SCHEMA": str(tmp_path / "none.json")}
    fails(standin("build", "--dry-run", "c.yml", cwd=tmp_path, env=env), "cannot read the LinuxKit schema")


def test_merge_like_append_config(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text(
        "kernel:\n  image: k/a:1\n  cmdline: one\ninit: [i/a:1]\nservices:\n  - name: s1\n    image: s/a:1\n"
        "files:\n  - path: a\n    contents: a\n"
    )
    (tmp_path / "b.yml").write_text(
        "kernel:\n  image: k/b:2\ninit: [i/b:2]\nservices:\n  - name: s2\n    image: s/b:2\n"
        "files:\n  - path: b\n    contents: b\n"
    )
    proc = standin("build", "--dry-run", "a.yml", "b.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(proc.stdout)
    assert merged["kernel"] == {"image": "k/b:2", "cmdline": "one"}  # empty cmdline does not override
    assert merged["init"] == ["i/a:1", "i/b:2"]
    assert [s["name"] for s in merged["services"]] == ["s1", "s2"]
    assert [f["path"] for f in merged["files"]] == ["a", "b"]
    assert list(merged) == ["kernel", "init", "onboot", "onshutdown", "services", "files", "volumes"]
    fails(standin("build", "--dry-run", "a.yml", "a.yml", cwd=tmp_path), "duplicate service name: s1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yml", "b.yml"]


def test_config_from_stdin_is_named_moby(tmp_path: Path, images: dict[str, str]) -> None:
    proc = standin("build", "-q", "--docker", "-", cwd=tmp_path, stdin=f"kernel:\n  image: {images['amd64']}\n")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moby-initrd.img", "moby-kernel"]  # no cmdline


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def test_missing_image_is_named(tmp_path: Path, images: dict[str, str]) -> None:
    missing = f"standin-test/missing:{TAG}"
    (tmp_path / "c.yml").write_text(
        f"kernel:\n  image: {images['amd64']}\nonboot:\n  - name: x\n    image: {missing}\n"
    )
    line = fails(standin("build", "--docker", "c.yml", cwd=tmp_path), f"could not pull image {missing}")
    assert "not in the local docker engine" in line and "not in the registry" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]  # nothing written, no temp files


def test_docker_image_arch_must_match(tmp_path: Path, images: dict[str, str]) -> None:
    (tmp_path / "c.yml").write_text(f"kernel:\n  image: {images['amd64']}\n")
    line = fails(standin("build", "--docker", "--arch", "arm64", "c.yml", cwd=tmp_path), images["amd64"])
    assert "linux/amd64, not linux/arm64" in line
    (tmp_path / "c.yml").write_text(f"kernel:\n  image: {images['arm64']}\n")
    proc = standin("build", "-q", "--docker", "--arch", "arm64", "c.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_registry_lookup_with_auth(
    tmp_path: Path, images: dict[str, str], registry_factory: Callable[..., object]
) -> None:
    reg = registry_factory(username="hook", password="s3cret-standin")
    config_dir = tmp_path / "docker-config"
    reg.login(config_dir)  # type: ignore[attr-defined]
    env = {"DOCKER_CONFIG": str(config_dir)}
    repo = f"{reg.addr}/standin/busybox"  # type: ignore[attr-defined]
    docker_env = {**os.environ, **env}
    for arch in ("amd64", "arm64"):
        subprocess.run(["docker", "tag", images[arch], f"{repo}:{arch}"], check=True, capture_output=True)
        subprocess.run(["docker", "push", "-q", f"{repo}:{arch}"], check=True, capture_output=True, env=docker_env)
        subprocess.run(["docker", "rmi", f"{repo}:{arch}"], check=True, capture_output=True)
    subprocess.run(
        ["docker", "buildx", "imagetools", "create", "-t", f"{repo}:idx", f"{repo}:amd64", f"{repo}:arm64"],
        check=True,
        capture_output=True,
        env=docker_env,
    )
    (tmp_path / "c.yml").write_text(
        f"kernel:\n  image: {repo}:idx\ninit: [{repo}:amd64]\nonboot:\n  - name: x\n    image: {repo}:idx\n"
    )
    for arch in ("amd64", "arm64"):
        out = tmp_path / arch
        out.mkdir()
        # without --docker: the registry, reached with the docker client's credentials
        proc = standin("build", "-q", "--arch", arch, "--dir", out, "c.yml", cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
    amd = gzip.decompress((tmp_path / "amd64" / "c-initrd.img").read_bytes())
    arm = gzip.decompress((tmp_path / "arm64" / "c-initrd.img").read_bytes())
    assert amd != arm  # the platform's manifest digest is recorded
    image = {e.name: e.data for e in read_cpio(amd)[0]}["containers/onboot/000-x/image"].decode()
    assert "source: registry" in image and "index: sha256:" in image and "platform: linux/amd64" in image

    (tmp_path / "missing.yml").write_text(f"kernel:\n  image: {repo}:nope\n")
    fails(standin("build", "missing.yml", cwd=tmp_path, env=env), f"could not pull image {repo}:nope")
    (tmp_path / "s390.yml").write_text(f"kernel:\n  image: {repo}:idx\n")
    line = fails(standin("build", "--arch", "s390x", "s390.yml", cwd=tmp_path, env=env), "no linux/s390x")
    assert "linux/amd64, linux/arm64" in line
    # no credentials: the registry refuses
    anon = {"DOCKER_CONFIG": str(tmp_path / "empty-config")}
    fails(standin("build", "c.yml", cwd=tmp_path, env=anon), f"could not pull image {repo}:idx")


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------


def test_outputs_and_modes(built: Path, test_kernel: Path) -> None:
    assert sorted(p.name for p in built.iterdir()) == ["hook-cmdline", "hook-initrd.img", "hook-kernel"]
    for p in built.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert (built / "hook-kernel").read_bytes() == test_kernel.read_bytes()
    assert (built / "hook-cmdline").read_bytes() == b"console=ttyS0 panic=-1 hook=1"


def test_initrd_is_one_gzip_member_of_one_cpio(built: Path) -> None:
    raw = (built / "hook-initrd.img").read_bytes()
    assert raw[:10] == bytes.fromhex("1f8b08000000000000ff")  # MTIME 0, XFL 0, OS 255
    d = zlib.decompressobj(wbits=31)
    archive = d.decompress(raw) + d.flush()
    assert d.eof and d.unused_data == b""  # exactly one member
    entries, end = read_cpio(archive)
    assert len(archive) % 512 == 0 and archive[end:] == b"\0" * (len(archive) - end)
    assert [e.ino for e in entries] == list(range(721, 721 + len(entries)))
    assert all((e.devmajor, e.devminor, e.mtime) == (3, 1, MTIME) for e in entries)
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    listed = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True).stdout
    assert listed.decode().split() == names


def test_initrd_contents(built: Path, images: dict[str, str]) -> None:
    entries, _ = read_cpio(gzip.decompress((built / "hook-initrd.img").read_bytes()))
    by = {e.name: e for e in entries}
    assert by["bin/busybox"].mode == 0o100755 and by["bin/sh"].mode & 0o170000 == 0o120000
    assert by["bin/sh"].data == b"busybox"
    assert b"HOOK-STANDIN-INIT: booted" in by["init"].data and by["init"].mode == 0o100755
    assert by["bin"].nlink == 2 and by["bin/busybox"].nlink == 1
    for d in (
        "containers/kernel",
        "containers/init/000-busybox",
        "containers/onboot/000-sysctl",
        "containers/services/getty",
        "containers/services/worker",
    ):
        image = by[f"{d}/image"].data.decode()
        assert f"ref: {images['amd64']}" in image and "source: docker" in image and "digest: sha256:" in image
    config = json.loads(by["containers/onboot/000-sysctl/config.json"].data)
    assert config == {"name": "sysctl", "image": images["amd64"], "net": "on"}
    assert list(json.loads(by["containers/services/getty/config.json"].data)) == ["env", "image", "name"]

    # files, as LinuxKit's filesystem() writes them
    assert by["etc/hook/motd"].data == b"hello\n" and by["etc/hook/motd"].mode == 0o100644
    assert by["etc"].mode == 0o040755 and by["etc/hook"].mode == 0o040755  # parents from 0644: x added
    owned = by["etc/hook/owned"]
    assert (owned.mode, owned.uid, owned.gid) == (0o100600, 101, 7)  # default 0600; getty = 2nd container
    assert by["var/lib/empty"].mode == 0o040700 and by["var"].mode == 0o040700
    assert by["etc/hook/link"].mode == 0o120600 and by["etc/hook/link"].data == b"/etc/hook/motd"
    assert by["etc/hook/from-source"].data == b"from the cwd\n"  # source is relative to the cwd
    assert by["etc/hook/from-source"].mode == 0o100755
    assert "etc/hook/optional" not in by
    metadata = yaml.safe_load(by["etc/linuxkit.yml"].data)
    assert metadata["kernel"]["image"] == f"docker.io/{images['amd64']}"
    assert [s["name"] for s in metadata["services"]] == ["getty", "worker"]
    assert "sbom.spdx.json" in by  # no --no-sbom


def test_two_builds_are_byte_identical_and_follow_the_image(tmp_path: Path, images: dict[str, str]) -> None:
    (tmp_path / "c.yml").write_text(hook_like_config(images["amd64"]).replace("source: payload.txt", "contents: p"))
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        out.mkdir()
        proc = standin("build", "-q", "--docker", "--dir", out, "c.yml", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outs.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert outs[0] == outs[1]
    # the same name now points at another image: the initrd changes
    (tmp_path / "d.yml").write_text(
        (tmp_path / "c.yml").read_text().replace(f"name: worker\n    image: {images['amd64']}", "name: worker\n"
                                                 f"    image: {images['other']}")
    )  # fmt: skip
    out = tmp_path / "out2"
    out.mkdir()
    assert standin("build", "-q", "--docker", "--dir", out, "--name", "c", "d.yml", cwd=tmp_path).returncode == 0
    assert (out / "c-initrd.img").read_bytes() != outs[0]["c-initrd.img"]
    assert (out / "c-kernel").read_bytes() == outs[0]["c-kernel"]


def test_files_errors(tmp_path: Path, images: dict[str, str]) -> None:
    base = f"kernel:\n  image: {images['amd64']}\nfiles:\n"
    cases = {
        "  - path: a\n": "contents of file (a) not specified",
        "  - path: a\n    contents: x\n    source: y\n": "specified Contents and Source for file: a",
        "  - path: a\n    directory: true\n    contents: x\n": "directory with contents not allowed",
        "  - path: a\n    contents: x\n    mode: '9z'\n": "cannot parse file mode as octal value",
        "  - path: a\n    contents: x\n    uid: nobody\n": "cannot find uid or gid for nobody",
        "  - path: a\n    source: missing.txt\n": "open missing.txt",
    }
    for body, message in cases.items():
        (tmp_path / "c.yml").write_text(base + body)
        fails(standin("build", "--docker", "c.yml", cwd=tmp_path), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


def test_decompress_kernel(tmp_path: Path, images: dict[str, str]) -> None:
    (tmp_path / "c.yml").write_text(f"kernel:\n  image: {images['amd64']}\n")
    # the Debian kernel's payload is xz: LinuxKit's decompressKernel only knows gzip
    fails(
        standin("build", "--docker", "--decompress-kernel", "c.yml", cwd=tmp_path),
        "unsupported bzImage payload format",
    )
    fake = tmp_path / "kernel.gz"
    fake.write_bytes(gzip.compress(b"plain kernel bytes"))
    env = {"HOOK_STANDIN_KERNEL": str(fake)}
    proc = standin("build", "-q", "--docker", "--decompress-kernel", "c.yml", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c-kernel").read_bytes() == b"plain kernel bytes"


@pytest.mark.slow
def test_output_boots_in_qemu(built: Path, tmp_path: Path) -> None:
    result = qemu.boot(
        built / "hook-kernel",
        built / "hook-initrd.img",
        cmdline=(built / "hook-cmdline").read_text(),
        expect="HOOK-STANDIN-INIT: powering off",
        timeout=180,
        memory_mb=256,
        accel="tcg",
        log=tmp_path / "console.log",
    )
    assert "HOOK-STANDIN-INIT: booted" in result.console
    assert "HOOK-STANDIN-INIT: cmdline: console=ttyS0 panic=-1 hook=1" in result.console
    assert "HOOK-STANDIN-INIT: container: services/getty" in result.console
