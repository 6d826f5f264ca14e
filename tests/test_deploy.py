"""doit deploy: a build installed into a webroot that a real HTTP server (python's, which follows
symlinks as nginx does) serves while the deploy runs; killed deploys, tampered builds, rollback, keep;
and the OCI artefact images against the real registry with htpasswd auth.

The builds are small fake ones, packaged by tasks.media.package.package() into a copy of the project
(a full `doit dist` is minutes of LinuxKit): the tarballs, checksum.txt and ISO are what package and the
ISO task write, only their kernel and initramfs are random bytes.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.core.errors import HookError
from tasks.deploy import stage
from tasks.deploy.oci import push_artifacts
from tasks.media.package import package, sha512, update_checksums
from tasks.settings import load_settings
from tasks.settings.builds import ARTIFACTS
from tests.conftest import Registry
from tests.pipeline_env import Project, make_project

ARCHES = ("x86_64", "aarch64")
MTIME = 1700000000
BIG = 4 << 20  # the x86_64 initramfs: big enough that reads overlap the swap


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return make_project(tmp_path_factory.mktemp("deploy") / "hook")


def build(project: Project, version: str, *, iso: bool = False, name: str = "release",
          arches: tuple[str, ...] = ARCHES) -> dict[str, bytes]:
    """A packaged fake build in out/dist/<name>/ (the only one there); returns the loose files' bytes."""
    dist = project.out(f"dist/{name}")
    subprocess.run(["rm", "-rf", str(project.out("dist"))], check=True)
    rng = random.Random(version)
    loose, per_arch = {}, {}
    for arch in arches:
        folder = project.out(f"fake/{version}/{arch}")
        folder.mkdir(parents=True, exist_ok=True)
        loose[f"vmlinuz-{arch}"] = rng.randbytes(64 << 10)
        loose[f"initramfs-{arch}"] = rng.randbytes(BIG if arch == "x86_64" else 256 << 10)
        per_arch[arch] = []
        for kind in ("vmlinuz", "initramfs"):
            (folder / f"{kind}-{arch}").write_bytes(loose[f"{kind}-{arch}"])
            per_arch[arch].append(folder / f"{kind}-{arch}")
    package(dist=dist, prefix="hook", version=version, per_arch=per_arch, mtime=MTIME)
    if iso:
        (dist / "hook-x86_64.iso").write_bytes(rng.randbytes(128 << 10))
        update_checksums(dist, {"hook-x86_64.iso": sha512(dist / "hook-x86_64.iso")})
    return loose


def deploy(project: Project, root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None):  # noqa: ANN201
    return project.doit("deploy", f"webroot={root}", *args, check=check, extra_env=env)


def failure(result) -> str:  # noqa: ANN001
    """The one failure line a refused deploy prints."""
    assert result.returncode != 0, result.output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("hook: deploy failed: ")]
    assert len(lines) == 1, result.output[-3000:]
    assert "Traceback" not in result.output
    return lines[0]


def digest(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def current(root: Path) -> str:
    return os.readlink(root / "current")


def temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".hook-deploy-"))


def state(root: Path) -> dict:
    return json.loads((root / ".hook-deploy.json").read_text())


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: link target, or (inode, mtime, size)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = ("link", os.readlink(path))
        else:
            st = path.stat()
            found[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Path], str]]:
    """serve(root) -> base URL: python's ThreadingHTTPServer on 127.0.0.1 with root as its folder."""
    servers = []

    def start(root: Path) -> str:
        handler = lambda *a, **k: Quiet(*a, directory=str(root), **k)  # noqa: E731
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


# --- the layout -----------------------------------------------------------------------------------------------


def test_first_deploy_makes_the_layout_and_the_same_version_again_does_nothing(project: Project,
                                                                              tmp_path: Path) -> None:
    root = tmp_path / "www"
    loose = build(project, "v1", iso=True)
    dist = project.out("dist/release")
    result = deploy(project, root)
    assert "deploy: v1 from the release build (out/dist/release) into" in result.stderr
    assert current(root) == "v1"
    served = ["hook-x86_64.iso", "hook_aarch64.tar.gz", "hook_x86_64.tar.gz", "initramfs-aarch64",
              "initramfs-x86_64", "vmlinuz-aarch64", "vmlinuz-x86_64"]
    for name in served:
        assert os.readlink(root / name) == f"current/{name}"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [*served, "current", "v1", ".hook-deploy.json", ".hook-deploy.lock"])
    folder = root / "v1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["checksum.txt", "hook-v1.tar.gz", *served])
    listed = [line.split("  ")[1] for line in (folder / "checksum.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(p.name for p in folder.iterdir() if p.name != "checksum.txt")
    subprocess.run(["sha512sum", "--strict", "-c", "checksum.txt"], cwd=folder, check=True, capture_output=True)
    for name in ("hook_x86_64.tar.gz", "hook-v1.tar.gz", "hook-x86_64.iso"):
        assert (root / name if name != "hook-v1.tar.gz" else folder / name).read_bytes() == (dist / name).read_bytes()
    for name, data in loose.items():
        assert (root / name).read_bytes() == data  # unpacked from hook_<arch>.tar.gz, as the chart does
    assert state(root)["history"] == ["v1"]

    before = snapshot(root)
    again = deploy(project, root)
    assert "v1 from the release build (out/dist/release) is current already in" in again.stderr
    assert "nothing to do" in again.stderr
    assert snapshot(root) == before


def test_the_dev_build_when_there_is_no_release_build_and_one_line_refusals(project: Project,
                                                                           tmp_path: Path) -> None:
    root = tmp_path / "www"
    loose = build(project, "d1", name="dev", arches=("x86_64",))
    result = deploy(project, root)
    assert "d1 from the dev build (out/dist/dev)" in result.stderr
    assert (root / "initramfs-x86_64").read_bytes() == loose["initramfs-x86_64"]
    assert not (root / "vmlinuz-aarch64").exists()
    # one-arch builds: hook-d1.tar.gz is the same bytes as hook_x86_64.tar.gz, a hardlink in the version folder
    assert (root / "d1" / "hook-d1.tar.gz").stat().st_ino == (root / "d1" / "hook_x86_64.tar.gz").stat().st_ino

    assert "needs the webroot: doit deploy webroot=DIR" in failure(project.doit("deploy", check=False))
    assert "the release build is not packaged" in failure(deploy(project, root, "from=release", check=False))
    nothing = deploy(project, root, "--rollback", check=False)
    assert "d1 is the only version" in failure(nothing)
    (tmp_path / "file").write_text("x")
    bad = project.doit("deploy", f"webroot={tmp_path / 'file'}", check=False)
    assert "hook: setting webroot=" in bad.stderr and "is not a folder" in bad.stderr


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"deploy_keep": "0"}, "setting deploy_keep='0' is not a whole number of at least 1"),
        ({"deploy_from": "not a ref"}, "setting deploy_from='not a ref' is not release, dev, debug, a folder"),
        ({"from": "/nonexistent/build"}, "setting deploy_from='/nonexistent/build': no such folder"),
        ({"deploy_from": "quay.io/tinkerbell/hook-artifacts"}, "an image reference with a tag"),
        ({"artifacts": "maybe"}, "setting artifacts='maybe' is not true or false"),
    ],
)
def test_bad_deploy_settings_are_refused_up_front(given: dict[str, str], message: str) -> None:
    env = {"HOOK_VERSION": "v1", "SOURCE_DATE_EPOCH": "1"}
    with pytest.raises(HookError, match=None) as err:
        load_settings(lambda name, default=None: given.get(name, default), env, given=given)
    assert message in str(err.value)


def test_settings_lists_the_deploy_settings_and_from_is_deploy_from(project: Project, tmp_path: Path) -> None:
    shown = project.doit("settings", f"webroot={tmp_path}", "from=dev", "deploy_keep=5", "artifacts=yes").stdout
    assert f"webroot            = {tmp_path}" in shown
    assert "deploy_from        = dev " in shown and "HOOK_DEPLOY_FROM" in shown
    assert "deploy_keep        = 5 " in shown
    assert "artifacts          = true " in shown
    info = project.doit("info", "dist", "artifacts=true", check=False).stdout  # exit 1: dist is not up to date
    assert "artifacts" in info.split("task_dep")[1]
    assert "artifacts" not in project.doit("info", "dist", check=False).stdout.split("task_dep")[1]


# --- serving while it runs ------------------------------------------------------------------------------------


def test_readers_see_one_whole_version_all_the_time(project: Project, tmp_path: Path,
                                                    serve: Callable[[Path], str]) -> None:
    """Two reader loops fetch initramfs-x86_64 and vmlinuz-x86_64 over HTTP during a deploy that
    keeps one version (the old one is removed right after the swap, while it may be being read)."""
    root = tmp_path / "www"
    old = build(project, "v1")
    deploy(project, root)
    base = serve(root)
    new = build(project, "v2")
    wanted = {name: {digest(old[name]): "v1", digest(new[name]): "v2"} for name in ("initramfs-x86_64",
                                                                                  "vmlinuz-x86_64")}
    seen: dict[str, list[str]] = {name: [] for name in wanted}
    errors: list[str] = []
    stop = threading.Event()

    def reader(name: str) -> None:
        while not stop.is_set():
            try:
                body = fetch(f"{base}/{name}")
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{name}: {exc}")
                continue
            version = wanted[name].get(digest(body))
            if version is None:
                errors.append(f"{name}: {len(body)} bytes of neither version")
            else:
                seen[name].append(version)

    threads = [threading.Thread(target=reader, args=(name,)) for name in wanted]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        deploy(project, root, "deploy_keep=1")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(seen[name][-1:] != ["v2"] or seen[name].count("v2") < 5
                                                  for name in seen):
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[:5]
    for name, versions in seen.items():
        assert versions[0] == "v1" and versions[-1] == "v2", (name, versions[:3], versions[-3:])
        first_new = versions.index("v2")
        assert set(versions[first_new:]) == {"v2"}, name  # once switched, never back
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()) == ["v2"]


@pytest.mark.parametrize("point", ["copied", "installed", "swapped"])
def test_a_killed_deploy_leaves_a_version_serving_and_the_next_one_completes(
        project: Project, tmp_path: Path, serve: Callable[[Path], str], point: str) -> None:
    root = tmp_path / "www"
    old = build(project, "v1")
    deploy(project, root)
    base = serve(root)
    new = build(project, "v2")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "deploy", f"webroot={root}", "deploy_keep=1"],
                            cwd=project.root, env={**project.env, "HOOK_TEST_DEPLOY_PAUSE": point},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    said = []
    try:
        for line in proc.stderr:
            said.append(line)
            if f"deploy: paused after {point}" in line:
                break
        else:
            pytest.fail("the deploy never paused:\n" + "".join(said[-30:]))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    serving = "v2" if point == "swapped" else "v1"
    assert current(root) == serving
    want = (new if serving == "v2" else old)["initramfs-x86_64"]
    assert fetch(f"{base}/initramfs-x86_64") == want
    assert fetch(f"{base}/vmlinuz-x86_64") == (new if serving == "v2" else old)["vmlinuz-x86_64"]
    if point == "copied":
        assert [t.rsplit(".", 1)[0] for t in temporaries(root)] == [".hook-deploy-v2"]
        assert not (root / "v2").exists()
    if point == "swapped":
        assert (root / "v1").is_dir()  # old versions go only after the swap: here it was killed before that

    result = deploy(project, root, "deploy_keep=1")
    if point == "copied":
        assert "removed what a stopped deploy left: .hook-deploy-v2." in result.stderr
    if point == "swapped":
        assert "v2 from the release build (out/dist/release) is current already in" in result.stderr
        assert "removed v1 (deploy_keep=1)" in result.stderr
    assert current(root) == "v2"
    assert fetch(f"{base}/initramfs-x86_64") == new["initramfs-x86_64"]
    assert temporaries(root) == []
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()) == ["v2"]
    assert state(root)["history"] == ["v2"]
    subprocess.run(["sha512sum", "--strict", "-c", "checksum.txt"], cwd=root / "v2", check=True,
                   capture_output=True)


# --- refusals, rollback, keep ---------------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("file", "hook_x86_64.tar.gz does not match its sha512 in the release build (out/dist/release)'s checksum.txt"),
        ("checksum", "hook_aarch64.tar.gz does not match its sha512 in the release build"),
        ("cut", "line 3 is not '<sha512 hex>  <file name>'"),
        ("missing", "hook-x86_64.iso is listed in the release build (out/dist/release)'s checksum.txt but is not "
                    "there"),
    ],
)
def test_a_tampered_build_is_refused_and_the_current_version_is_untouched(
        project: Project, tmp_path: Path, serve: Callable[[Path], str], tamper: str, message: str) -> None:
    root = tmp_path / "www"
    old = build(project, "v1")
    deploy(project, root)
    base = serve(root)
    before = snapshot(root)
    build(project, "v2", iso=True)
    dist = project.out("dist/release")
    if tamper == "file":
        _flip(dist / "hook_x86_64.tar.gz", 20000)
    elif tamper == "checksum":
        text = (dist / "checksum.txt").read_text().splitlines()
        line = next(i for i, t in enumerate(text) if t.endswith("hook_aarch64.tar.gz"))
        text[line] = ("0" if text[line][0] != "0" else "1") + text[line][1:]
        (dist / "checksum.txt").write_text("\n".join(text) + "\n")
    elif tamper == "cut":
        text = (dist / "checksum.txt").read_text()
        (dist / "checksum.txt").write_text(text[: text.index("\n", text.index("\n") + 1) + 40])
    else:
        (dist / "hook-x86_64.iso").unlink()
    result = deploy(project, root, check=False)
    assert message in failure(result)
    assert snapshot(root) == before
    assert fetch(f"{base}/initramfs-x86_64") == old["initramfs-x86_64"]
    assert temporaries(root) == []


def test_rollback_keep_and_roll_forward(project: Project, tmp_path: Path, serve: Callable[[Path], str]) -> None:
    root = tmp_path / "www"
    base = serve(root.parent)
    builds = {}
    for version in ("v1", "v2", "v3"):
        builds[version] = build(project, version)
        deploy(project, root, "deploy_keep=2")
    versions = lambda: sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())  # noqa: E731
    assert versions() == ["v2", "v3"]  # v1 went after v3's swap
    assert state(root)["history"] == ["v2", "v3"]

    rolled = deploy(project, root, "--rollback")
    assert "rolled back: v2 is current again (was v3" in rolled.stderr
    assert current(root) == "v2"
    assert fetch(f"{base}/www/initramfs-x86_64") == builds["v2"]["initramfs-x86_64"]
    assert "v2 is the only version" in failure(deploy(project, root, "--rollback", check=False))

    forward = deploy(project, root, "deploy_keep=2")  # out/dist/release still holds v3: its folder is reused
    assert "holds this build already (checked): not copied again" in forward.stderr
    assert current(root) == "v3" and versions() == ["v2", "v3"]

    (root / "v2" / "vmlinuz-x86_64").write_bytes(b"changed by hand")
    assert "vmlinuz-x86_64 does not match its sha512" in failure(deploy(project, root, "--rollback", check=False))
    assert current(root) == "v3"

    builds["v4"] = build(project, "v4", arches=("x86_64",))
    deploy(project, root, "deploy_keep=2")
    assert versions() == ["v3", "v4"]  # the changed v2 is gone too
    assert not (root / "vmlinuz-aarch64").exists() and not (root / "vmlinuz-aarch64").is_symlink()
    assert (root / "initramfs-x86_64").read_bytes() == builds["v4"]["initramfs-x86_64"]
    deploy(project, root, "--rollback")
    assert (root / "vmlinuz-aarch64").read_bytes() == builds["v3"]["vmlinuz-aarch64"]  # its link is back


def test_rollback_goes_back_one_version_at_a_time(project: Project, tmp_path: Path) -> None:
    root = tmp_path / "www"
    for version in ("v1", "v2", "v3"):
        build(project, version)
        deploy(project, root)
    deploy(project, root, "--rollback")
    deploy(project, root, "--rollback")
    assert current(root) == "v1" and state(root)["history"] == ["v1"]
    build(project, "v4")
    deploy(project, root)  # the versions rolled back from go now
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()) == ["v1", "v4"]


def test_a_served_name_that_was_a_plain_file_becomes_a_link(project: Project, tmp_path: Path) -> None:
    """A webroot set up by hand (the files themselves at the top) is taken over by the first deploy."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "initramfs-x86_64").write_bytes(b"old by hand")
    (root / "other.txt").write_text("not ours")
    loose = build(project, "v1")
    deploy(project, root)
    assert os.readlink(root / "initramfs-x86_64") == "current/initramfs-x86_64"
    assert (root / "initramfs-x86_64").read_bytes() == loose["initramfs-x86_64"]
    assert (root / "other.txt").read_text() == "not ours"
    (root / "v9").mkdir()
    build(project, "v9")
    assert "v9 is there and hook did not make it" in failure(deploy(project, root, check=False))


# --- OCI artefact images --------------------------------------------------------------------------------------

PASSWORD = "art=ifact s3cret"


def _docker(*args: str, config: Path) -> str:
    return subprocess.run(["docker", *args], env={**os.environ, "DOCKER_CONFIG": str(config)}, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def registry(registry_factory, tmp_path: Path, docker_engine: None) -> Iterator[tuple[Registry, Path]]:  # noqa: ANN001
    reg = registry_factory(username="hook", password=PASSWORD)
    config = tmp_path / "docker-config"
    reg.login(config)
    yield reg, config
    refs = subprocess.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}",
                           f"{reg.addr}/hooktest/{ARTIFACTS}"], capture_output=True, text=True).stdout.split()
    if refs:
        subprocess.run(["docker", "image", "rm", *refs], capture_output=True)


def test_artifact_images_push_and_deploy_byte_for_byte(project: Project, tmp_path: Path,
                                                       registry: tuple[Registry, Path], registry_factory,  # noqa: ANN001
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reg, config = registry
    loose = build(project, "v7", iso=True)
    dist = project.out("dist/release")
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    org = f"{reg.addr}/hooktest"
    settings = load_settings(lambda name, default=None: {"org": org}.get(name, default),
                             {"HOOK_VERSION": "v7", "SOURCE_DATE_EPOCH": str(MTIME)}, root=project.root)
    stage.artifacts(settings)  # what `doit artifacts` runs, after package:release
    pushed = json.loads(project.out("images/registry/hook-artifacts.json").read_text())["images"]
    ref, x86, arm = (f"{org}/{ARTIFACTS}:{tag}" for tag in ("v7", "v7-x86_64", "v7-aarch64"))
    assert sorted(pushed) == sorted([ref, x86, arm])

    listed = [line.split("  ")[1] for line in (dist / "checksum.txt").read_text().splitlines()]
    manifest = json.loads(_docker("buildx", "imagetools", "inspect", "--raw", ref, config=config))
    assert len(manifest["layers"]) == len(listed) + 1  # one layer per file, and checksum.txt
    arm_manifest = json.loads(_docker("buildx", "imagetools", "inspect", "--raw", arm, config=config))
    assert len(arm_manifest["layers"]) == 2  # hook_aarch64.tar.gz, checksum.txt

    # deterministic: the same files pushed again into another registry are the same manifest, byte for byte
    second = registry_factory()
    pushed_again = push_artifacts(f"{second.addr}/hooktest", dist, tmp_path / "again.json", mtime=MTIME)
    assert pushed_again[f"{second.addr}/hooktest/{ARTIFACTS}:v7"] == pushed[ref]
    assert pushed_again[f"{second.addr}/hooktest/{ARTIFACTS}:v7-aarch64"] == pushed[arm]
    second.stop()

    root = tmp_path / "www"
    env = {"DOCKER_CONFIG": str(config)}
    result = deploy(project, root, f"from={ref}", env=env)
    assert f"deploy: v7 from image {ref} into" in result.stderr
    for name in listed:
        assert (root / "v7" / name).read_bytes() == (dist / name).read_bytes(), name
    for name, data in loose.items():
        assert (root / name).read_bytes() == data
    assert os.readlink(root / "hook-x86_64.iso") == "current/hook-x86_64.iso"
    subprocess.run(["sha512sum", "--strict", "-c", "checksum.txt"], cwd=root / "v7", check=True,
                   capture_output=True)
    assert "is current already" in deploy(project, root, f"from={ref}", env=env).stderr

    one = tmp_path / "www-arm"
    deploy(project, one, f"from={arm}", env=env)  # an aarch64 image on this machine: pulled, never run
    assert sorted(p.name for p in (one / "v7").iterdir()) == ["checksum.txt", "hook_aarch64.tar.gz",
                                                              "initramfs-aarch64", "vmlinuz-aarch64"]
    assert (one / "initramfs-aarch64").read_bytes() == loose["initramfs-aarch64"]

    anonymous = deploy(project, tmp_path / "www-anon", f"from={x86}", check=False,
                       env={"DOCKER_CONFIG": str(tmp_path / "empty-config")})
    line = failure(anonymous)
    assert "docker pull failed" in line and f"docker login {reg.addr}" in line
    assert PASSWORD not in anonymous.output

