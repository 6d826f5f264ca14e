"""tasks.hookos.tool: the LinuxKit v1.8.2 binary, downloaded from a real HTTP server on 127.0.0.1, taken
from a path or PATH, or built from LinuxKit's real source with the real Go (warm build cache)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.hookos import tool as tools
from tasks.hookos.tool import linuxkit_binary
from tasks.settings import LINUXKIT_VERSION, default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HOOK_TEST_CACHE", "/var/cache/hook-test"))
#: The warm Go build cache the test machine keeps (tests only point GOCACHE at it).
WARM_GOCACHE = CACHE / "tools" / "go-build"
SETUP = "run hack/setup-test-machine.sh first"
ASSET = f"linuxkit-linux-{Arch.native().docker}"
FAKE_V181 = "#!/bin/sh\necho 'linuxkit version v1.8.1'\necho 'commit: unknown'\n"


def source_tree() -> Path:
    """The patched, unpacked LinuxKit v1.8.2 source tree of the test machine."""
    candidates = [CACHE / "linuxkit-src" / "linuxkit-v1.8.2", CACHE / "src.tmp" / "linuxkit-v1.8.2"]
    if os.environ.get("HOOK_TEST_LINUXKIT_SRC"):
        candidates.insert(0, Path(os.environ["HOOK_TEST_LINUXKIT_SRC"]))
    for path in candidates:
        if (path / "src" / "cmd" / "linuxkit" / "vendor").is_dir():
            return path
    pytest.fail(f"no patched LinuxKit v1.8.2 source tree at {candidates[0]}: {SETUP}")


def one_line(err: pytest.ExceptionInfo[HookError]) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to 127.0.0.1 never go through a proxy someone has set."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@dataclass
class Server:
    """http.server serving `root` on 127.0.0.1 in a thread."""

    root: Path
    httpd: http.server.ThreadingHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def requests(self) -> list[str]:
        return self.httpd.paths  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        self.server.paths.append(self.path)  # type: ignore[attr-defined]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.daemon_threads = True
    httpd.paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=functools.partial(httpd.serve_forever, poll_interval=0.05), daemon=True)
    thread.start()
    srv = Server(root, httpd, thread)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def real_linuxkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real LinuxKit v1.8.2, built by the module from the real source (warm Go cache: seconds)."""
    cache = tmp_path_factory.mktemp("real-linuxkit-cache")
    return Path(linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(source_tree()), cache=cache,
                                gocache=WARM_GOCACHE))


def no_linuxkit_name() -> str:
    """A bare name that is not on PATH, so linuxkit_binary downloads."""
    name = "linuxkit-hook-test-absent"
    assert shutil.which(name) is None
    return name


# --- download ------------------------------------------------------------------------------------


def test_download_lands_in_cache_and_is_reused_offline(server: Server, real_linuxkit: Path, tmp_path: Path) -> None:
    (server.root / ASSET).symlink_to(real_linuxkit)
    cache = tmp_path / "cache"
    path = linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256="", src="", cache=cache)
    assert path == str(cache / "linuxkit" / LINUXKIT_VERSION / ASSET)
    assert sha256(Path(path)) == sha256(real_linuxkit)
    assert os.stat(path).st_mode & 0o777 == 0o755
    out = subprocess.run([path, "version"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == f"{ASSET} version {LINUXKIT_VERSION}"
    assert contents(cache) == ["linuxkit", "linuxkit/v1.8.2", f"linuxkit/v1.8.2/{ASSET}"]
    assert server.requests == [f"/{ASSET}"]

    server.stop()
    started = time.monotonic()
    again = linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256="", src="", cache=cache)
    assert again == path
    assert time.monotonic() - started < 1.0
    assert server.requests == [f"/{ASSET}"]


def test_download_with_pinned_right_sha256(server: Server, real_linuxkit: Path, tmp_path: Path) -> None:
    (server.root / ASSET).symlink_to(real_linuxkit)
    cache = tmp_path / "cache"
    pin = sha256(real_linuxkit).upper()  # any case
    path = linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url + "/", sha256=pin, src="", cache=cache)
    assert sha256(Path(path)) == pin.lower()
    # the pinned, cached file is verified and reused without the network
    server.stop()
    assert linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256=pin, src="", cache=cache) == path


def test_download_with_wrong_sha256_is_refused_and_leaves_nothing(
    server: Server, real_linuxkit: Path, tmp_path: Path
) -> None:
    (server.root / ASSET).symlink_to(real_linuxkit)
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256=wrong, src="", cache=cache)
    message = one_line(err)
    assert f"expected {wrong}" in message
    assert sha256(real_linuxkit) in message
    assert "linuxkit_url" in message and "linuxkit_sha256" in message
    assert contents(cache) == []


def test_cached_file_with_wrong_sha256_is_downloaded_again(
    server: Server, real_linuxkit: Path, tmp_path: Path
) -> None:
    (server.root / ASSET).symlink_to(real_linuxkit)
    cache = tmp_path / "cache"
    cached = cache / "linuxkit" / LINUXKIT_VERSION / ASSET
    cached.parent.mkdir(parents=True)
    cached.write_text(FAKE_V181)
    cached.chmod(0o755)
    path = linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256=sha256(real_linuxkit), src="",
                           cache=cache)
    assert path == str(cached)
    assert sha256(cached) == sha256(real_linuxkit)
    assert server.requests == [f"/{ASSET}"]


def test_invalid_sha256_and_empty_url_settings(tmp_path: Path) -> None:
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=no_linuxkit_name(), url="http://127.0.0.1:1", sha256="abc", src="",
                        cache=tmp_path / "cache")
    assert "linuxkit_sha256" in one_line(err)
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=no_linuxkit_name(), url="", sha256="", src="", cache=tmp_path / "cache")
    assert one_line(err).startswith("linuxkit_url is empty")


def test_unreachable_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/mirror"
    cache = tmp_path / "cache"
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=no_linuxkit_name(), url=url, sha256="", src="", cache=cache)
    message = one_line(err)
    assert f"{url}/{ASSET}" in message
    assert "Connection refused" in message
    assert "linuxkit_url=" in message and "linuxkit=" in message and "linuxkit_src=" in message
    assert contents(cache) == []


def test_http_404(server: Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256="", src="", cache=cache)
    message = one_line(err)
    assert f"{server.url}/{ASSET}" in message
    assert "HTTP 404" in message
    assert "linuxkit_url=" in message
    assert contents(cache) == []


def test_leftovers_of_killed_runs_are_swept(server: Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    old_file, old_dir, fresh = cache / ".download-x.tmp", cache / ".unpack-y", cache / ".build-z"
    old_file.write_text("partial")
    (old_dir / "linuxkit-v1.8.2").mkdir(parents=True)
    fresh.mkdir()
    day_ago = time.time() - 25 * 3600
    for path in (old_file, old_dir):
        os.utime(path, (day_ago, day_ago))
    with pytest.raises(HookError):  # a download that starts (and gets a 404)
        linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256="", src="", cache=cache)
    assert contents(cache) == [".build-z"]


def test_download_of_another_version_is_refused_and_not_cached(server: Server, tmp_path: Path) -> None:
    (server.root / ASSET).write_text(FAKE_V181)
    cache = tmp_path / "cache"
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=no_linuxkit_name(), url=server.url, sha256="", src="", cache=cache)
    message = one_line(err)
    assert "linuxkit version v1.8.1" in message and f"not {LINUXKIT_VERSION}" in message
    assert "linuxkit_url=" in message
    assert contents(cache) == []


# --- the user's binary ---------------------------------------------------------------------------


def test_user_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "bin" / "linuxkit"
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=str(missing), url="", sha256="", src="", cache=tmp_path / "cache")
    message = one_line(err)
    assert message.startswith(f"{missing} not found: install linuxkit v1.8.2")
    assert "linuxkit=/path/to/linuxkit" in message


def test_user_path_that_is_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "linuxkit"
    plain.write_text("not a program")
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=str(plain), url="", sha256="", src="", cache=tmp_path / "cache")
    assert "not an executable file" in one_line(err)


def test_user_path_to_the_real_binary(real_linuxkit: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert linuxkit_binary(linuxkit=str(real_linuxkit), url="", sha256="", src="", cache=cache) == str(real_linuxkit)
    assert contents(cache) == []


def test_user_binary_on_path(real_linuxkit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "linuxkit").symlink_to(real_linuxkit)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    path = linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src="", cache=cache)
    assert path == str(bindir / "linuxkit")
    assert contents(cache) == []


def test_user_binary_on_path_of_another_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "linuxkit"
    fake.write_text(FAKE_V181)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src="", cache=tmp_path / "cache")
    message = one_line(err)
    assert str(fake) in message and "v1.8.1" in message and f"needs {LINUXKIT_VERSION}" in message
    assert "set linuxkit=PATH" in message and "remove it from PATH" in message


def test_user_binary_that_is_not_linuxkit(tmp_path: Path) -> None:
    other = tmp_path / "linuxkit"
    other.write_text("#!/bin/sh\necho 'usage: something else' >&2\nexit 2\n")
    other.chmod(0o755)
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit=str(other), url="", sha256="", src="", cache=tmp_path / "cache")
    assert "is not linuxkit" in one_line(err)


def test_version_is_checked_once_per_process(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    fake = tmp_path / "linuxkit"
    fake.write_text(f"#!/bin/sh\necho run >> {counter}\necho 'linuxkit version {LINUXKIT_VERSION}'\n")
    fake.chmod(0o755)
    for _ in range(3):
        linuxkit_binary(linuxkit=str(fake), url="", sha256="", src="", cache=tmp_path / "cache")
    assert counter.read_text() == "run\n"
    # a changed file is checked again
    fake.write_text(FAKE_V181)
    with pytest.raises(HookError):
        linuxkit_binary(linuxkit=str(fake), url="", sha256="", src="", cache=tmp_path / "cache")


# --- build from source ---------------------------------------------------------------------------


def test_build_from_source_directory(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    src = source_tree()
    path = Path(linuxkit_binary(linuxkit="ignored", url="", sha256="", src=str(src), cache=cache,
                                gocache=WARM_GOCACHE))
    assert path.parent.parent == cache / "linuxkit" / LINUXKIT_VERSION
    assert path.name == "linuxkit" and path.parent.name.startswith("src-")
    out = subprocess.run([path, "version"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == f"linuxkit version {LINUXKIT_VERSION}"
    assert contents(cache) == ["linuxkit", "linuxkit/v1.8.2", f"linuxkit/v1.8.2/{path.parent.name}",
                               f"linuxkit/v1.8.2/{path.parent.name}/linuxkit"]
    started = time.monotonic()
    again = linuxkit_binary(linuxkit="ignored", url="", sha256="", src=str(src), cache=cache, gocache=WARM_GOCACHE)
    assert again == str(path)
    assert time.monotonic() - started < 2.0


def test_build_from_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source_tree()
    tarball = tmp_path / "linuxkit-v1.8.2-src.tar.gz"
    # LICENSE and the linuxkit module (with its vendor folder): what the build reads
    subprocess.run(
        ["tar", "-C", str(src.parent), "--use-compress-program=gzip -1", "-cf", str(tarball),
         f"{src.name}/LICENSE", f"{src.name}/src/cmd/linuxkit"],
        check=True,
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("HOOK_GOCACHE", str(WARM_GOCACHE))  # the environment variable works too
    path = Path(linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(tarball), cache=cache))
    out = subprocess.run([path, "version"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == f"linuxkit version {LINUXKIT_VERSION}"
    # the unpacked source and the build folder are gone, Go's cache was not put in ours
    assert contents(cache) == ["linuxkit", "linuxkit/v1.8.2", f"linuxkit/v1.8.2/{path.parent.name}",
                               f"linuxkit/v1.8.2/{path.parent.name}/linuxkit"]
    started = time.monotonic()
    assert linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(tarball), cache=cache) == str(path)
    assert time.monotonic() - started < 2.0


def _tarball(path: Path, files: dict[str, str]) -> Path:
    staging = path.parent / (path.name + ".d")
    for name, text in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
    with tarfile.open(path, "w:gz") as archive:
        for top in sorted({name.split("/")[0] for name in files}):
            archive.add(staging / top, arcname=top)
    return path


@pytest.mark.parametrize(
    ("files", "expect"),
    [
        ({"something-1.0/README": "hi"}, "its top folder is something-1.0"),
        ({"linuxkit-v1.8.1/src/cmd/linuxkit/main.go": "package main"}, "its top folder is linuxkit-v1.8.1"),
        ({"linuxkit-v1.8.2/README.md": "hi"}, "it has no linuxkit-v1.8.2/src/cmd/linuxkit"),
        ({"a/x": "1", "b/y": "2"}, "its top folder is a, b"),
    ],
)
def test_tarball_that_is_not_linuxkit_is_refused(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    tarball = _tarball(tmp_path / "src.tar.gz", files)
    cache = tmp_path / "cache"
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(tarball), cache=cache, gocache=WARM_GOCACHE)
    message = one_line(err)
    assert f"linuxkit_src={tarball} is not LinuxKit {LINUXKIT_VERSION}'s source" in message
    assert expect in message
    assert contents(cache) == []


def test_source_that_is_no_tarball_or_missing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball at all")
    cache = tmp_path / "cache"
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(junk), cache=cache, gocache=WARM_GOCACHE)
    assert "cannot be unpacked" in one_line(err)
    assert contents(cache) == []
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(tmp_path / "nope"), cache=cache)
    assert "not found" in one_line(err)


def test_source_directory_that_is_not_linuxkit_v182(tmp_path: Path) -> None:
    older = tmp_path / "linuxkit-v1.8.1"
    (older / "src" / "cmd" / "linuxkit").mkdir(parents=True)
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(older), cache=tmp_path / "cache")
    assert "v1.8.1's source" in one_line(err)
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(tmp_path), cache=tmp_path / "cache")
    assert "has no src/cmd/linuxkit" in one_line(err)
    patched = tmp_path / "linuxkit-v1.8.2-patched"  # a suffix after the right version is fine
    patched.mkdir()
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(patched), cache=tmp_path / "cache")
    assert "has no src/cmd/linuxkit" in one_line(err)


def test_missing_go_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(tools, "DEBIAN_GO", str(tmp_path / "no-go"))
    with pytest.raises(HookError) as err:
        linuxkit_binary(linuxkit="linuxkit", url="", sha256="", src=str(source_tree()), cache=tmp_path / "cache")
    message = one_line(err)
    assert message.startswith("go not found") and "golang-1.24-go" in message


# --- default cache and CLI -----------------------------------------------------------------------


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "hook"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "hook"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.tools", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=300,
    )


def test_cli_prints_the_path(server: Server, real_linuxkit: Path, tmp_path: Path) -> None:
    (server.root / ASSET).symlink_to(real_linuxkit)
    cache = tmp_path / "cache"
    proc = _cli("linuxkit", "--url", server.url, "--cache", str(cache), "--linuxkit", no_linuxkit_name(),
                "--sha256", sha256(real_linuxkit))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{cache / 'linuxkit' / LINUXKIT_VERSION / ASSET}\n"
    assert "downloading linuxkit" in proc.stderr


def test_cli_builds_from_source(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = _cli("linuxkit", "--src", str(source_tree()), "--cache", str(cache),
                env={"HOOK_GOCACHE": str(WARM_GOCACHE)})
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.is_file() and path.is_relative_to(cache)
    assert "building linuxkit v1.8.2 from" in proc.stderr


def test_two_processes_downloading_at_once(server: Server, real_linuxkit: Path, tmp_path: Path) -> None:
    """Two checkouts sharing the cache: both get a whole binary, one file stays, no temp file."""
    (server.root / ASSET).symlink_to(real_linuxkit)
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "tasks.tools", "linuxkit", "--url", server.url, "--cache", str(cache),
            "--linuxkit", no_linuxkit_name()]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    final = cache / "linuxkit" / LINUXKIT_VERSION / ASSET
    assert [out for out, _ in outs] == [f"{final}\n"] * 2
    assert sha256(final) == sha256(real_linuxkit)
    assert contents(cache) == ["linuxkit", "linuxkit/v1.8.2", f"linuxkit/v1.8.2/{ASSET}"]


def test_cli_error_and_help(tmp_path: Path) -> None:
    proc = _cli("linuxkit", "--url", f"http://127.0.0.1:{closed_port()}", "--cache", str(tmp_path / "c"),
                "--linuxkit", no_linuxkit_name())
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("hook: cannot download linuxkit v1.8.2 from http://127.0.0.1:")
    assert "Traceback" not in proc.stderr
    helped = _cli("linuxkit", "--help")
    assert helped.returncode == 0 and "--src" in helped.stdout and "--sha256" in helped.stdout
