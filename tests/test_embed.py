"""Embedded images (setting `embed_images`, tasks/hookos/embed.py, docs/embedded.md), against real parts:
the machine's dockerd, Debian's docker-registry with htpasswd auth, the real LinuxKit v1.8.2, and
QEMU booting the Hook OS with no network device at all.

- the setting: comma list, @FILE, names, the errors it gives at load time;
- the archive: what `docker load` takes, checked (arch, layers) and reproducible;
- the incremental rules with the real `doit dev_dist`: a list change, an image change, no change;
- release builds: each arch from the registry, pinned to the digest recorded once (`doit bases` again);
- two boots: no NIC at all, and a NIC whose registry is down; tink-worker starts from the embedded copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.boot import qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.hookos.embed import Entry, default_name, write_archive
from tasks.settings.embed_list import parse_setting
from tests.conftest import REGISTRY_PASSWORD, REGISTRY_USER, Registry
from tests.pipeline_env import Project, copy_out, make_project
from tests.test_boot import (
    BOOT_TIMEOUT,
    MARKER,
    MEMORY_MB,
    SMP,
    WORKER_IMAGE,
    file_lines,
    in_service,
    packaged,
    report,
    tinkerbell_cmdline,
)

ARCH = Arch.native()
TASK = f"embed:dev-{ARCH}"
OS_TASKS = sorted([TASK, f"linuxkit:dev-{ARCH}", "package:dev"])
ARM64_IMAGE = "hooktest/embed-probe:arm64"


def _docker(*args: str, config: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"DOCKER_CONFIG": str(config)} if config else {})}
    return subprocess.run(["docker", *args], env=env, check=check, capture_output=True, text=True)


def _image_id(ref: str) -> str:
    return _docker("image", "inspect", "-f", "{{.Id}}", ref).stdout.strip()


@pytest.fixture(scope="session")
def arm64_image(test_os: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test tink-worker's files with the arm64 label (FROM scratch, no RUN: no emulation)."""
    folder = tmp_path_factory.mktemp("arm64-image")
    created = _docker("create", test_os["tink_worker"]).stdout.strip()
    try:
        with open(folder / "rootfs.tar", "wb") as out:
            subprocess.run(["docker", "export", created], stdout=out, check=True)
    finally:
        _docker("rm", created, check=False)
    (folder / "Dockerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["/usr/bin/tink-worker.sh"]\n')
    _docker("buildx", "build", "--builder", "default", "--platform", "linux/arm64", "--load", "-q", "-t", ARM64_IMAGE,
            str(folder))
    return ARM64_IMAGE


# --- the setting ---------------------------------------------------------------------------------


def test_setting_comma_list_and_file(tmp_path: Path) -> None:
    assert parse_setting("", tmp_path) == ()
    assert parse_setting(" a/b:1 , reg:5000/c/d , x/y:2 reg/x/y:3,", tmp_path) == (
        "a/b:1", "reg:5000/c/d", "x/y:2 reg/x/y:3")
    (tmp_path / "images.txt").write_text("# what the rack needs\nquay.io/t/tink-worker:v1  10.0.0.1/t/tink-worker:v1\n"
                                         "\nquay.io/t/action-{arch}:v2   # per-arch tags\n")
    assert parse_setting("@images.txt", tmp_path) == (
        "quay.io/t/tink-worker:v1 10.0.0.1/t/tink-worker:v1", "quay.io/t/action-{arch}:v2")
    assert default_name("reg:5000/c/d") == "reg:5000/c/d:latest"
    assert default_name("a/b:1@sha256:" + "0" * 64) == "a/b:1"
    assert default_name("a/b@sha256:" + "0" * 64) is None


@pytest.mark.parametrize(("text", "message"), [
    ("@missing.txt", r"setting embed_images=@missing.txt: cannot read .*missing.txt \(No such file"),
    ("Quay.io/UPPER:1", r"'Quay.io/UPPER:1' is not an image reference"),
    ("a/b@sha256:" + "1" * 64, r"pinned by digest alone; give the name the OS asks for after it"),
    ("a/b:1 c/d", r"the name 'c/d' must be REPOSITORY:TAG"),
    ("a/b:1 c/d:1 e", r"is not 'IMAGE' or 'IMAGE NAME'"),
    ("a/b:1,x/y:1 a/b:1", r"a/b:1 is embedded twice"),
])
def test_setting_errors_name_the_item_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(HookError, match=message):
        parse_setting(text, tmp_path)


# --- the archive ---------------------------------------------------------------------------------


def _saved(ref: str, where: Path) -> Path:
    spool = where / "saved.tar"
    _docker("image", "save", "-o", str(spool), ref)
    return spool


def test_archive_is_checked_reproducible_and_loads(test_os: dict, tmp_path: Path) -> None:
    """docker save -> our archive: named as asked, gzip layers matching the config's diff_ids, the same
    bytes twice; docker load gives back the very image (same id) under the new name."""
    entry = Entry(test_os["action"], "hooktest/embed-probe:loaded")
    spool = _saved(entry.source, tmp_path)
    first = write_archive(spool, tmp_path / "a.tar", entry, ARCH)
    second = write_archive(spool, tmp_path / "b.tar", entry, ARCH)
    assert first == second and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first["image_id"] == _image_id(entry.source)
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == ["manifest.json", "config.json", "layers/000.tar.gz"]
        assert {(m.mtime, m.uid, m.gid) for m in tar.getmembers()} == {(0, 0, 0)}
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest == [{"Config": "config.json", "RepoTags": ["hooktest/embed-probe:loaded"],
                         "Layers": ["layers/000.tar.gz"]}]
    assert first["archive_bytes"] < first["unpacked_bytes"] / 1.5  # gzip
    try:
        loaded = _docker("load", "-i", str(tmp_path / "a.tar")).stdout
        assert "Loaded image: hooktest/embed-probe:loaded" in loaded
        assert _image_id("hooktest/embed-probe:loaded") == first["image_id"]
    finally:
        _docker("rmi", "hooktest/embed-probe:loaded", check=False)


def test_archive_of_the_wrong_arch_or_damaged_is_refused(arm64_image: str, test_os: dict, tmp_path: Path) -> None:
    with pytest.raises(HookError, match=(rf"embedded image {arm64_image} is linux/arm64, but this build is x86_64 "
                                         r"\(linux/amd64\): embed a linux/amd64 image")):
        write_archive(_saved(arm64_image, tmp_path), tmp_path / "a.tar", Entry(arm64_image, "x/y:1"), Arch.X86_64)

    # one byte of the layer changed: its digest no longer matches the image's config
    spool = _saved(test_os["action"], tmp_path)
    with tarfile.open(spool) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]  # type: ignore[union-attr]
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(damaged, "w") as out:
        for member, data in members:
            if data is not None and member.name.endswith("layer.tar"):
                data = data[:4000] + bytes([data[4000] ^ 1]) + data[4001:]
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    entry = Entry(test_os["action"], "x/y:1")
    with pytest.raises(HookError, match=rf"embedded image {re.escape(entry.source)} cannot be read: layer 0 is "
                                        r"sha256:[0-9a-f]{64}, but its config says sha256:"):
        write_archive(damaged, tmp_path / "a.tar", entry, ARCH)
    damaged.write_bytes(b"no tar at all")
    with pytest.raises(HookError, match=r"cannot be read: the export .*not a readable tar archive"):
        write_archive(damaged, tmp_path / "a.tar", entry, ARCH)
    assert not (tmp_path / "a.tar").exists()


# --- the pipeline: dev builds from the local engine -----------------------------------------------


def _listing(project: Project) -> str:
    initramfs = project.out(f"dev/{ARCH}/initramfs-{ARCH}")
    return subprocess.run([sys.executable, "-m", "tasks.initramfs", "list", str(initramfs)], cwd=project.root,
                          capture_output=True, text=True, check=True).stdout


def _member(project: Project, member: str) -> bytes:
    initramfs = project.out(f"dev/{ARCH}/initramfs-{ARCH}")
    return subprocess.run(f"zcat {initramfs} | cpio -i --quiet --to-stdout {member}", shell=True,
                          capture_output=True, check=True).stdout


@pytest.fixture
def moving_worker(test_os: dict) -> Iterator[str]:
    """A local tag of the test tink-worker that a test may move to other content."""
    ref = "hooktest/embed-worker:moving"
    _docker("tag", test_os["tink_worker"], ref)
    yield ref
    _docker("rmi", ref, check=False)


def test_list_and_image_changes_remake_only_the_os(dev_project: Project, moving_worker: str, test_os: dict,
                                                   tmp_path: Path) -> None:
    project = make_project(tmp_path / "hook")
    copy_out(dev_project, project)
    worker = f"{moving_worker} {WORKER_IMAGE}"
    both = f"embed_images={worker},{test_os['action']}"

    first = project.doit("dev_dist", both)
    print(f"\n[embed] list given: {first.seconds:.1f}s, ran {first.executed}")
    assert sorted(first.executed) == OS_TASKS
    archives = [f"usr/share/hook/embedded/00-{WORKER_IMAGE.replace(':', '_').replace('/', '_')}.tar",
                "usr/share/hook/embedded/01-hooktest_action_test.tar"]
    listing = _listing(project)
    assert all(a in listing for a in archives), listing
    with tarfile.open(fileobj=io.BytesIO(_member(project, archives[0]))) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [WORKER_IMAGE]
    assert f"size report: embedded {WORKER_IMAGE} (" in first.stderr
    assert re.search(r"size report: 2 embedded image\(s\): [\d.]+ MB of initramfs-\S+ [\d.]+ MB", first.stderr)
    record = json.loads(project.out(f"linuxkit/dev/{ARCH}/embedded.json").read_text())
    assert [i["identity"] for i in record["images"]] == [_image_id(moving_worker), _image_id(test_os["action"])]

    noop = project.doit("dev_dist", both)
    assert noop.executed == []
    print(f"[embed] no change: {noop.seconds:.2f}s")

    # the image changes under the same tag (a local re-tag): only the OS is made again
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(f"FROM {test_os['tink_worker']}\nLABEL hook.test=moved\n")
    _docker("build", "-q", "-t", moving_worker, str(tmp_path / "ctx"))
    moved = project.doit("dev_dist", both)
    assert sorted(moved.executed) == OS_TASKS
    assert "embedded hooktest/action:test: unchanged" in moved.stderr  # the other archive is kept
    assert json.loads(project.out(f"linuxkit/dev/{ARCH}/embedded.json").read_text())["images"][0]["identity"] \
        == _image_id(moving_worker)

    # the list changes: the action image goes
    shorter = project.doit("dev_dist", f"embed_images={worker}")
    assert sorted(shorter.executed) == OS_TASKS
    assert archives[1] not in _listing(project)
    assert not project.out(f"linuxkit/dev/{ARCH}/embedded/01-hooktest_action_test.tar").exists()

    # no list: the same OS, byte for byte, as a build that never embedded anything
    none = project.doit("dev_dist")
    assert sorted(none.executed) == OS_TASKS
    assert project.out("dist/dev/checksum.txt").read_text() == dev_project.out("dist/dev/checksum.txt").read_text()
    assert "embedded" not in _listing(project).replace("usr/share/hook/embedded\n", "")


def test_embed_errors_are_one_line_with_the_fix(arm64_image: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "hook")

    missing = project.doit(TASK, "embed_images=hooktest/embed-missing:nope", check=False)
    assert missing.returncode != 0
    assert (f"hook: {TASK} failed: embedded image hooktest/embed-missing:nope is not in the local engine: pull it"
            in missing.stderr), missing.output[-2000:]

    wrong = project.doit(TASK, f"embed_images={arm64_image} x/y:1", check=False)
    assert wrong.returncode != 0
    assert (f"hook: {TASK} failed: embedded image {arm64_image} is linux/arm64, but this build is x86_64 "
            f"(linux/amd64): embed a linux/amd64 image" in wrong.stderr), wrong.output[-2000:]

    unreadable = project.doit(TASK, "embed_images=@nowhere/images.txt", check=False)
    assert unreadable.returncode != 0
    assert "hook: setting embed_images=@nowhere/images.txt: cannot read" in unreadable.output

    for result in (missing, wrong, unreadable):
        assert "Traceback" not in result.output
    assert not project.out(f"linuxkit/dev/{ARCH}/embedded.json").exists()
    assert not list(project.out(f"linuxkit/dev/{ARCH}").glob("embedded/*"))


# --- release builds: from the registry, per arch, pinned to a digest -------------------------------


@pytest.fixture
def embed_registry(registry_factory, arm64_image: str, test_os: dict, tmp_path: Path) -> tuple[Registry, Path]:  # noqa: ANN001
    """A registry with auth holding hooktest/tink-worker:test as an amd64+arm64 index and
    hooktest/action:test for amd64 only."""
    reg = registry_factory(username=REGISTRY_USER, password=REGISTRY_PASSWORD)
    config = tmp_path / "docker-config"
    reg.login(config)
    _push_index(reg, config, test_os["tink_worker"], arm64_image)
    _docker("tag", test_os["action"], f"{reg.addr}/hooktest/action:test")
    _docker("push", f"{reg.addr}/hooktest/action:test", config=config)
    return reg, config


def _push_index(reg: Registry, config: Path, amd64: str, arm64: str) -> str:
    remote = f"{reg.addr}/hooktest/tink-worker:test"
    for arch, local in (("amd64", amd64), ("arm64", arm64)):
        _docker("tag", local, f"{remote}-{arch}")
        _docker("push", f"{remote}-{arch}", config=config)
    _docker("buildx", "imagetools", "create", "-t", remote, f"{remote}-amd64", f"{remote}-arm64", config=config)
    raw = _docker("buildx", "imagetools", "inspect", "--raw", remote, config=config).stdout
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def _archive_config(project: Project, arch: str) -> dict:
    record = json.loads(project.out(f"linuxkit/release/{arch}/embedded.json").read_text())
    with tarfile.open(project.out(f"linuxkit/release/{arch}/{record['images'][0]['file']}")) as tar:
        return json.load(tar.extractfile("config.json"))  # type: ignore[arg-type]


def test_release_embeds_each_arch_pinned_to_the_recorded_digest(embed_registry: tuple[Registry, Path],
                                                                 arm64_image: str, test_os: dict,
                                                                 tmp_path: Path) -> None:
    reg, config = embed_registry
    project = make_project(tmp_path / "hook", env={"HOOK_ORG": f"{reg.addr}/hooktest", "DOCKER_CONFIG": str(config)})
    source = f"{reg.addr}/hooktest/tink-worker:test"
    setting = f"embed_images={source} {WORKER_IMAGE}"
    tasks = ["embed:release-x86_64", "embed:release-aarch64"]
    digest = _docker("buildx", "imagetools", "inspect", "--format", "{{json .Manifest}}", source,
                     config=config).stdout
    digest = json.loads(digest)["digest"]

    first = project.doit(*tasks, setting)
    assert sorted(first.executed) == sorted(tasks)
    assert _archive_config(project, "x86_64")["architecture"] == "amd64"
    assert _archive_config(project, "aarch64")["architecture"] == "arm64"
    record = json.loads(project.out("linuxkit/release/aarch64/embedded.json").read_text())["images"][0]
    assert record["identity"] == digest and record["from"] == f"{reg.addr}/hooktest/tink-worker@{digest}"
    assert record["name"] == WORKER_IMAGE and record["image_id"] == _image_id(arm64_image)
    recorded = json.loads(project.out("images/embedded-digests.json").read_text())
    assert recorded[source]["digest"] == digest
    assert project.doit(*tasks, setting).executed == []

    # the tag moves in the registry: the build stays on the recorded digest until `doit bases`
    _push_index(reg, config, test_os["action"], arm64_image)
    assert project.doit(*tasks, setting).executed == []
    bases = project.doit("bases", setting)
    assert f"embedded image {source} moved: {digest} -> sha256:" in bases.stderr
    moved = project.doit(*tasks, setting)
    assert sorted(moved.executed) == sorted(tasks)
    assert _archive_config(project, "x86_64")["config"]["Cmd"] == ["/usr/bin/action.sh"]

    # an image the registry has for amd64 only cannot go into the aarch64 OS
    amd64_only = project.doit("embed:release-aarch64", f"embed_images={reg.addr}/hooktest/action:test", check=False)
    assert amd64_only.returncode != 0
    line = next(x for x in amd64_only.stderr.splitlines() if x.startswith("hook: embed:release-aarch64 failed:"))
    assert f"embedded image {reg.addr}/hooktest/action:test" in line and "linux/arm64" in line, line
    gone = project.doit("embed:release-x86_64", f"embed_images={reg.addr}/hooktest/nothing:here", check=False)
    assert gone.returncode != 0
    assert (f"embedded image {reg.addr}/hooktest/nothing:here cannot be found in its registry: check the name, "
            f"that {reg.addr} is up, and `docker login {reg.addr}`") in gone.stderr
    assert "Traceback" not in amd64_only.output + gone.output


# --- boot: the embedded OS with no network device ------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_boot_files(dev_project: Project, test_os: dict, tmp_path_factory: pytest.TempPathFactory,
                        ) -> tuple[Path, Path]:
    """`doit dev_dist embed_images=...`: the test tink-worker, under the name the cmdline asks for,
    and the action image."""
    project = make_project(tmp_path_factory.mktemp("embedded") / "hook")
    copy_out(dev_project, project)
    started = time.monotonic()
    built = project.doit("dev_dist", f"embed_images={test_os['tink_worker']} {WORKER_IMAGE},{test_os['action']}")
    print(f"\n[embedded OS] built in {time.monotonic() - started:.1f}s: "
          + "; ".join(line for line in built.stderr.splitlines() if "size report: 2 embedded" in line))
    return packaged(project, "dev", "hook", tmp_path_factory.mktemp("embedded-boot"))


def _guest(files: tuple[Path, Path], log: Path, nics: list[qemu.Nic]) -> qemu.Guest:
    return qemu.Guest(*files, arch=ARCH, cmdline=tinkerbell_cmdline(), memory_mb=MEMORY_MB, accel="tcg", smp=SMP,
                      nics=nics, extra=["-device", "virtio-rng-pci"], log=log, milestone_patterns=qemu.HOOK_MILESTONES)


def _embedded_logs(g: qemu.Guest) -> str:
    return file_lines(g.sh("grep -h -E 'embedded|pull' /var/log/hook-docker.log /var/log/hook-bootkit.log",
                           timeout=120).output)


@pytest.mark.slow
def test_boots_with_no_network_device_from_the_embedded_images(embedded_boot_files: tuple[Path, Path],
                                                               test_os: dict, tmp_path: Path) -> None:
    """No NIC at all: the images are loaded before the docker socket appears, the pull fails (network
    unreachable) and bootkit runs the embedded tink-worker. (A registry that refuses the pull falls
    back the same way: tests/test_bootkit.py::test_embedded_image_is_used_when_the_pull_fails, against
    the real dockerd; one boot here covers the OS's side.)"""
    with _guest(embedded_boot_files, tmp_path / "console.log", nics=[]) as g:
        assert "-nic none" in " ".join(g.argv)
        g.wait_for(MARKER, timeout=BOOT_TIMEOUT)
        report(g, "embedded, no NIC")
        images = g.sh(in_service("hook-docker", "docker images --format '{{.Repository}}:{{.Tag}}'"), timeout=120)
        assert images.status == 0, images.output
        listed = set(re.findall(r"^(\S+:\S+)\r?$", images.output, re.M)) - {"{{.Repository}}:{{.Tag}}'"}
        assert listed == {WORKER_IMAGE, test_os["action"]}, images.output  # the action image is there
        absent = g.sh(in_service("hook-docker", f"docker image inspect {test_os['tink_worker']}"), timeout=120)
        assert absent.status != 0 and "No such image" in absent.output  # not embedded under that name
        is_socket = "import os, stat, sys; sys.exit(not stat.S_ISSOCK(os.stat(\"/var/run/docker.sock\").st_mode))"
        socket = g.sh(in_service("hook-docker", f"docker exec tink-worker python3 -c '{is_socket}'"), timeout=120)
        assert socket.status == 0, socket.output  # tink-worker's bind of the socket (a link) is the socket
        logs = _embedded_logs(g)
        print(f"[embedded, no NIC] logs:\n{logs}")
    assert logs.index(f"loaded embedded image {WORKER_IMAGE}") < logs.index("the docker socket /var/run/docker.sock")
    assert f"using the copy of {WORKER_IMAGE} already present (embedded)" in logs
    assert "network is unreachable" in logs
