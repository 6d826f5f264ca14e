"""The LinuxKit v1.8.2 binary: the user's, a cached download, or one built from source with Go.

`linuxkit_binary` returns the path of a v1.8.2 executable or raises one `HookError` line. The
cache (default `~/.cache/hook`, per user, shared by checkouts) holds:

    <cache>/linuxkit/v1.8.2/linuxkit-linux-<arch>     downloaded from <url>/linuxkit-linux-<arch>
    <cache>/linuxkit/v1.8.2/src-<key>/linuxkit        built from a source tarball or directory
    <cache>/go-build/                                 Go's build cache (warm rebuilds take seconds)

Everything is written to a temporary name inside the cache and renamed into place only after its
checks passed, so an interrupted or refused download or build leaves nothing that looks finished,
and two checkouts doing the same at once are safe. See docs/linuxkit.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.files import file_digest
from tasks.core.run import find_tool, log_step, run
from tasks.settings import DEFAULT_LINUXKIT_URL, LINUXKIT_VERSION, Settings, default_cache_dir

#: The Go package inside the LinuxKit repository that is the linuxkit CLI (its own module, vendored).
MODULE_DIR = Path("src/cmd/linuxkit")
#: Debian trixie's golang-1.24-go puts go here and not on PATH.
DEBIAN_GO = "/usr/lib/go-1.24/bin/go"
GO_HINT = "install Go >= 1.24.2 (Debian trixie: apt-get install golang-1.24-go)"
LDFLAGS = f"-s -w -X github.com/linuxkit/linuxkit/src/cmd/linuxkit/version.Version={LINUXKIT_VERSION}"
#: Part of the key of a built binary: a change to how we build gives a new one.
BUILD_RECIPE = f"go build -trimpath -ldflags {LDFLAGS!r} GOFLAGS=-mod=vendor CGO_ENABLED=0"
#: Top folder names of a LinuxKit v1.8.2 source tarball (GitHub's archive, `git archive --prefix`).
SOURCE_TOP_NAMES = (f"linuxkit-{LINUXKIT_VERSION}", f"linuxkit-{LINUXKIT_VERSION.removeprefix('v')}")

DOWNLOAD_TIMEOUT = (15, 60)  # seconds: connect, and between two reads
CHUNK = 1 << 20
PROGRESS_EVERY = 10 << 20
VERSION_TIMEOUT = 60
#: Temporary files and folders in the cache older than this are from a killed run: removed.
STALE_AFTER = 24 * 3600
TEMP_PREFIXES = (".download-", ".unpack-", ".build-")

DOWNLOAD_FIX = (
    "set linuxkit_url=BASE (a folder holding linuxkit-linux-<arch>), linuxkit=/path/to/linuxkit, "
    "or linuxkit_src=TARBALL"
)
USER_VERSION_FIX = (
    f"set linuxkit=PATH to a {LINUXKIT_VERSION} binary, or remove it from PATH to let hook download {LINUXKIT_VERSION}"
)


def linuxkit_binary(
    *, linuxkit: str, url: str, sha256: str, src: str, cache: Path, gocache: Path | None = None
) -> str:
    """Return the path of a LinuxKit v1.8.2 executable; every failure is one HookError line.

    In order: `src` set: built from that source tarball or directory with Go (cached by content);
    `linuxkit` a path: that file; a bare name on PATH: that program; else the release binary for
    this machine's arch downloaded from `url` into the cache (verified against `sha256` when set).
    `gocache` (else $HOOK_GOCACHE, else <cache>/go-build) is Go's build cache.
    """
    cache = Path(os.path.expanduser(cache))
    if src:
        return _build_from_source(os.path.expanduser(src), cache=cache, gocache=gocache)
    if "/" in linuxkit:
        path = os.path.abspath(os.path.expanduser(linuxkit))
        if not os.path.exists(path):
            find_tool("linuxkit", path=path)  # raises, with the usual "not found: install ..." line
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise HookError(f"{path} is not an executable file: chmod +x it, or set linuxkit=/path/to/linuxkit")
        _check_user_binary(path, f"linuxkit={linuxkit}")
        return path
    found = shutil.which(linuxkit)
    if found:
        path = os.path.abspath(found)
        _check_user_binary(path, f"{linuxkit} on PATH ({path})")
        return path
    return _download(url=url, sha256=_parse_sha256(sha256), cache=cache)


def linuxkit_for(settings: Settings) -> str:
    """The LinuxKit v1.8.2 binary the settings ask for: given, on PATH, built from source or downloaded."""
    return linuxkit_binary(linuxkit=settings.linuxkit, url=settings.linuxkit_url, sha256=settings.linuxkit_sha256,
                           src=settings.linuxkit_src, cache=settings.cache_dir)


# --- the version check ---------------------------------------------------------------------------


@functools.cache
def _version_line(path: str, mtime_ns: int, size: int) -> str:
    """The first line of `<path> version`, once per file version and process."""
    del mtime_ns, size  # only the cache key
    for attempt in range(5):
        try:
            proc = subprocess.run(
                [path, "version"],
                capture_output=True,
                text=True,
                errors="replace",
                stdin=subprocess.DEVNULL,
                timeout=VERSION_TIMEOUT,
            )
            break
        except OSError as exc:
            # ETXTBSY: a file just written can be busy for a moment when another thread forks.
            if exc.errno == errno.ETXTBSY and attempt < 4:
                time.sleep(0.1 * (attempt + 1))
                continue
            raise HookError(f"{path} could not run: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise HookError(f"{path} version did not answer in {VERSION_TIMEOUT}s") from None
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if proc.returncode != 0:
        return f"(`version` exited {proc.returncode}: {first or 'no output'})"
    return first or "(`version` printed nothing)"


def _found_version(path: str) -> tuple[str | None, str]:
    """(the version `path version` reports, or None when it is no linuxkit; its first line)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    line = _version_line(real, st.st_mtime_ns, st.st_size)
    match = re.fullmatch(r"\S+ version (\S+)", line)
    return (match.group(1) if match else None), line


def _check_user_binary(path: str, what: str) -> None:
    try:
        version, line = _found_version(path)
    except HookError as exc:
        raise HookError(f"{what}: {exc}; {USER_VERSION_FIX}") from None
    if version is None:
        raise HookError(f"{what} is not linuxkit ({path} version printed {line!r}): {USER_VERSION_FIX}")
    if version != LINUXKIT_VERSION:
        raise HookError(f"{what} is linuxkit {version}, hook needs {LINUXKIT_VERSION}: {USER_VERSION_FIX}")


def _check_own_binary(path: str, what: str, fix: str) -> str | None:
    """None when path reports v1.8.2, else why not (for a binary we downloaded or built)."""
    try:
        version, line = _found_version(path)
    except HookError as exc:
        return f"{what}: {exc}; {fix}"
    if version != LINUXKIT_VERSION:
        return f"{what} reports {line!r}, not {LINUXKIT_VERSION}: {fix}"
    return None


# --- download ------------------------------------------------------------------------------------


def _parse_sha256(value: str) -> str:
    value = value.strip().lower()
    if value and not re.fullmatch(r"[0-9a-f]{64}", value):
        raise HookError(f"linuxkit_sha256={value!r} is not a sha256 (64 hex digits): fix it or leave it empty")
    return value


def _download(*, url: str, sha256: str, cache: Path) -> str:
    if not url.strip():
        raise HookError(f"linuxkit_url is empty and no linuxkit was found: {DOWNLOAD_FIX}")
    name = f"linuxkit-linux-{Arch.native().docker}"
    final = cache / "linuxkit" / LINUXKIT_VERSION / name
    source = f"{url.rstrip('/')}/{name}"
    fix = f"check linuxkit_url or update linuxkit_sha256 (now {sha256})" if sha256 else DOWNLOAD_FIX
    if final.is_file():
        stale = None
        if sha256 and (got := file_digest(final)) != sha256:
            stale = f"its sha256 is {got}, linuxkit_sha256 is {sha256}"
        elif problem := _check_own_binary(str(final), str(final), fix):
            stale = problem
        if stale is None:
            return str(final)
        log_step(f"cached {final} is not usable ({stale}); downloading it again")
    _make_cache(cache)
    _sweep_stale(cache)
    fd, tmp_name = tempfile.mkstemp(prefix=f".download-{name}.", suffix=".tmp", dir=cache)
    tmp = Path(tmp_name)
    try:
        got = _fetch(source, fd)
        if sha256 and got != sha256:
            raise HookError(
                f"{source} has sha256 {got}, expected {sha256} (linuxkit_sha256): "
                "check linuxkit_url, or update linuxkit_sha256"
            )
        os.chmod(tmp, 0o755)
        problem = _check_own_binary(str(tmp), f"the linuxkit downloaded from {source}", fix)
        if problem:
            raise HookError(problem)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    except OSError as exc:
        raise HookError(
            f"cannot store linuxkit in the cache {cache}: {exc.strerror}; free space or set cache_dir=DIR"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log_step(f"linuxkit {LINUXKIT_VERSION} downloaded to {final}")
    return str(final)


def _fetch(source: str, fd: int) -> str:
    """Stream source into fd (closed on return); return its sha256."""
    import requests  # only here: it costs ~0.1 s of every doit start-up

    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        try:
            with requests.get(source, stream=True, timeout=DOWNLOAD_TIMEOUT) as response:
                if response.status_code >= 400:
                    raise HookError(
                        f"cannot download linuxkit {LINUXKIT_VERSION} from {source}: "
                        f"HTTP {response.status_code} {response.reason or ''}".rstrip() + f"; {DOWNLOAD_FIX}"
                    )
                total = int(response.headers.get("Content-Length") or 0)
                of_total = f" of {total / 1e6:.1f} MB" if total else ""
                log_step(f"downloading linuxkit {LINUXKIT_VERSION}{of_total} from {source} ...")
                done, next_report = 0, PROGRESS_EVERY
                for block in response.iter_content(CHUNK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if done >= next_report:
                        log_step(f"  {done / 1e6:.0f} MB{of_total}")
                        next_report += PROGRESS_EVERY
                if total and done != total:
                    raise HookError(
                        f"cannot download linuxkit {LINUXKIT_VERSION} from {source}: "
                        f"got {done} of {total} bytes; try again, or {DOWNLOAD_FIX}"
                    )
        except requests.RequestException as exc:
            raise HookError(
                f"cannot download linuxkit {LINUXKIT_VERSION} from {source}: {_reason(exc)}; {DOWNLOAD_FIX}"
            ) from None
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    """A short reason for a requests failure ('Connection refused', 'timed out', ...)."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1).strip()
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "timed out"
    text = re.sub(r"<[^>]*>:? ?", "", text)  # object reprs of urllib3's exceptions
    return " ".join(text.split())[:200] or type(exc).__name__


# --- build from source ---------------------------------------------------------------------------


def _build_from_source(src: str, *, cache: Path, gocache: Path | None) -> str:
    path = Path(src).absolute()
    if path.is_dir():
        module = _module_in_dir(path)
        key = _key("dir", _dir_hash(module))
    elif path.is_file():
        module = None
        key = _key("tar", file_digest(path))
    else:
        raise HookError(
            f"linuxkit_src={src} not found: give a LinuxKit {LINUXKIT_VERSION} source tarball or unpacked "
            "source folder, or leave linuxkit_src empty"
        )
    final = cache / "linuxkit" / LINUXKIT_VERSION / f"src-{key}" / "linuxkit"
    if final.is_file() and os.access(final, os.X_OK):
        return str(final)
    go = _find_go()
    _make_cache(cache)
    _sweep_stale(cache)
    with contextlib.ExitStack() as stack:
        if module is None:
            unpacked = Path(stack.enter_context(_temp_dir(cache, ".unpack-")))
            module = _unpack(path, unpacked)
        built = Path(stack.enter_context(_temp_dir(cache, ".build-"))) / "linuxkit"
        log_step(f"building linuxkit {LINUXKIT_VERSION} from {path} with Go (about 90 s cold) ...")
        run(
            [go, "build", "-trimpath", "-ldflags", LDFLAGS, "-o", str(built), "."],
            tool="go build",
            cwd=module,
            env=_go_env(cache, gocache),
            fix=f"check that {path} is LinuxKit {LINUXKIT_VERSION}'s source with its vendor folder, and {GO_HINT}",
        )
        problem = _check_own_binary(
            str(built), f"the linuxkit built from {path}", f"check that {path} is LinuxKit {LINUXKIT_VERSION}'s source"
        )
        if problem:
            raise HookError(problem)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, final)
        except OSError as exc:
            raise HookError(f"cannot store linuxkit in the cache {cache}: {exc.strerror}; set cache_dir=DIR") from None
    log_step(f"linuxkit {LINUXKIT_VERSION} built: {final}")
    return str(final)


def _module_in_dir(path: Path) -> Path:
    """src/cmd/linuxkit in path, or in its one LinuxKit top folder (an unpacked tarball's parent)."""
    named = re.match(r"linuxkit-v?(\d+\.\d+\.\d+)(?![\d.])", path.name)
    if named and f"v{named.group(1)}" != LINUXKIT_VERSION:
        raise HookError(
            f"linuxkit_src={path} is LinuxKit v{named.group(1)}'s source, hook needs {LINUXKIT_VERSION}: "
            f"give {LINUXKIT_VERSION}'s source"
        )
    if (path / MODULE_DIR).is_dir():
        return path / MODULE_DIR
    for top in SOURCE_TOP_NAMES:
        if (path / top / MODULE_DIR).is_dir():
            return path / top / MODULE_DIR
    raise HookError(
        f"linuxkit_src={path} has no {MODULE_DIR}: give the top folder of LinuxKit {LINUXKIT_VERSION}'s source "
        "(or its tarball)"
    )


def _dir_hash(root: Path) -> str:
    """A hash of the relative paths, sizes and mtimes of the files under root (symlinks: targets)."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                digest.update(f"L {rel}\0{os.readlink(full)}\0".encode("utf-8", "surrogateescape"))
            else:
                digest.update(f"F {rel}\0{st.st_size} {st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _key(kind: str, content: str) -> str:
    return hashlib.sha256(f"{BUILD_RECIPE}\0{kind}\0{content}".encode()).hexdigest()[:20]


def _unpack(tarball: Path, into: Path) -> Path:
    """Unpack a LinuxKit v1.8.2 source tarball into `into` (refused before unpacking when it is
    not one); return its src/cmd/linuxkit."""
    expected = " or ".join(f"{t}/" for t in SOURCE_TOP_NAMES)
    try:
        with tarfile.open(tarball, "r:*") as archive:
            members = archive.getmembers()
            tops = {_member_path(m).split("/", 1)[0] for m in members} - {""}
            top = next(iter(tops)) if len(tops) == 1 else ""
            if top not in SOURCE_TOP_NAMES:
                found = ", ".join(sorted(tops)[:3]) or "nothing"
                raise HookError(
                    f"linuxkit_src={tarball} is not LinuxKit {LINUXKIT_VERSION}'s source: its top folder is "
                    f"{found}, expected {expected}; give {LINUXKIT_VERSION}'s source tarball"
                )
            prefix = f"{top}/{MODULE_DIR.as_posix()}/"
            if not any(_member_path(m).startswith(prefix) for m in members):
                raise HookError(
                    f"linuxkit_src={tarball} is not LinuxKit {LINUXKIT_VERSION}'s source: it has no "
                    f"{top}/{MODULE_DIR}; give {LINUXKIT_VERSION}'s full source tarball"
                )
            log_step(f"unpacking {tarball} ...")
            archive.extractall(into, members=members, filter="data")
    except tarfile.ReadError as exc:
        reason = "not a tar archive (plain, gzip, bzip2 or xz)" if "could not be opened" in str(exc) else str(exc)
        raise HookError(
            f"linuxkit_src={tarball} cannot be unpacked: {_one_line(reason)}; give LinuxKit {LINUXKIT_VERSION}'s "
            "source tarball (.tar.gz) or an unpacked source folder"
        ) from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise HookError(
            f"linuxkit_src={tarball} cannot be unpacked: {_one_line(reason)}; give LinuxKit {LINUXKIT_VERSION}'s "
            "source tarball (.tar.gz) or an unpacked source folder"
        ) from None
    return into / top / MODULE_DIR


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _member_path(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/") + ("/" if member.isdir() else "")


def _find_go() -> str:
    found = shutil.which("go")
    if found:
        return found
    if os.access(DEBIAN_GO, os.X_OK):
        return DEBIAN_GO
    raise HookError(
        f"go not found (needed to build linuxkit from linuxkit_src): {GO_HINT}, "
        "or leave linuxkit_src empty to use a linuxkit binary"
    )


def _go_env(cache: Path, gocache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",
        GOFLAGS="-mod=vendor",
        CGO_ENABLED="0",
        GOPROXY="off",
        GOWORK="off",
        GOOS="linux",
        GOARCH=Arch.native().docker,
        GOCACHE=str(gocache or os.environ.get("HOOK_GOCACHE") or cache / "go-build"),
    )
    if not env.get("HOME") and not env.get("GOPATH"):
        env["GOPATH"] = str(cache / "gopath")
    return env


# --- the cache folder ----------------------------------------------------------------------------


def _make_cache(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HookError(f"cannot create the cache {cache}: {exc.strerror}; set cache_dir=DIR") from None


@contextlib.contextmanager
def _temp_dir(cache: Path, prefix: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=prefix, dir=cache)
    try:
        yield path
    finally:
        _rmtree(path)


def _rmtree(path: str | Path) -> None:
    """Remove a folder we unpacked, also where the tarball made a folder read-only."""

    def retry_writable(_func: object, failed: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                shutil.rmtree(failed, ignore_errors=True)
            else:
                os.unlink(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry_writable)
    else:
        shutil.rmtree(path, onerror=retry_writable)


def _sweep_stale(cache: Path) -> None:
    """Remove temporary files and folders that a killed run left in the cache a day ago or more."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in cache.iterdir():
            if entry.name.startswith(TEMP_PREFIXES):
                with contextlib.suppress(OSError):
                    if now - entry.lstat().st_mtime > STALE_AFTER:
                        if entry.is_dir() and not entry.is_symlink():
                            _rmtree(entry)
                        else:
                            entry.unlink()


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m tasks.tools",
        description=f"Tools hook needs. `linuxkit`: print the path of a LinuxKit {LINUXKIT_VERSION} binary "
        "(built, found or downloaded as docs/linuxkit.md says). Defaults come from the HOOK_* variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lk = commands.add_parser(
        "linuxkit",
        help=f"print the path of a LinuxKit {LINUXKIT_VERSION} binary (progress on stderr)",
        description=f"Print the path of a LinuxKit {LINUXKIT_VERSION} binary on stdout; progress goes to stderr.",
    )
    lk.add_argument("--src", default=env("HOOK_LINUXKIT_SRC", ""), help="build from this source tarball or folder")
    lk.add_argument("--url", default=env("HOOK_LINUXKIT_URL") or DEFAULT_LINUXKIT_URL, help="download base URL")
    lk.add_argument("--sha256", default=env("HOOK_LINUXKIT_SHA256", ""), help="expected sha256 of the download")
    lk.add_argument(
        "--cache", type=Path, default=Path(env("HOOK_CACHE_DIR") or default_cache_dir()), help="the cache folder"
    )
    lk.add_argument("--linuxkit", default=env("HOOK_LINUXKIT") or "linuxkit", help="a path, or a name on PATH")
    args = parser.parse_args(argv)
    try:
        path = linuxkit_binary(linuxkit=args.linuxkit, url=args.url, sha256=args.sha256, src=args.src, cache=args.cache)
    except HookError as exc:
        print(f"hook: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
