"""One way to run an external tool: log it (secrets masked), stream its output, fail clearly."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tasks.core.errors import HookError

#: How to get each tool we call, for the "not found" message.
INSTALL_HINTS: dict[str, str] = {
    "docker": "install Docker (Debian: apt-get install docker.io) and start dockerd",
    "docker-buildx": "install buildx (Debian trixie: apt-get install docker-buildx)",
    "linuxkit": "install linuxkit v1.8.2 from its releases page, or set linuxkit=/path/to/linuxkit",
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "qemu-system-aarch64": "apt-get install qemu-system-arm",
    "git": "apt-get install git",
}

TAIL_LINES = 15
#: A line of our own build scripts (in containers/) that says why they failed, in one line: printed
#: as it is, or as BuildKit's plain progress shows a step's output (`#8 0.532 hook: error: ...`, or
#: `0.532 ...` in its summary). Not BuildKit's step header (`#8 [build 3/4] RUN ... echo "hook: error:
#: ..."`), which echoes the script text of every step, cached or failed or not.
STEP_ERROR = re.compile(r"^\s*(?:#\d+ )?(?:\d+\.\d+ )?hook: error: (.*)$")


def mask(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in text with '***'."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def timed(tool: str) -> Iterator[None]:
    """Append how long an external tool took to $HOOK_TIMINGS (a JSON-lines file), when set.

    bench/bench_incremental.py uses it to tell our own overhead from docker's and linuxkit's.
    """
    started = time.monotonic()
    try:
        yield
    finally:
        path = os.environ.get("HOOK_TIMINGS")
        if path:
            with open(path, "a") as handle:
                handle.write(json.dumps({"tool": tool, "seconds": round(time.monotonic() - started, 4)}) + "\n")


def log_step(message: str) -> None:
    """Announce a long stage, on stderr so it is seen even when stdout is captured."""
    print(f"hook: {message}", file=sys.stderr, flush=True)


def find_tool(name: str, *, setting: str | None = None, path: str | os.PathLike[str] | None = None) -> str:
    """Return the path of an executable, or raise a HookError that says how to install it."""
    candidate = str(path) if path else name
    found = shutil.which(candidate)
    if found:
        return found
    hint = INSTALL_HINTS.get(Path(name).name, f"install {name}")
    where = f" (set {setting}=PATH to use another)" if setting else ""
    raise HookError(f"{candidate} not found: {hint}{where}")


def stop_process(proc: subprocess.Popen[Any], *, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; wait for it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live child processes of pid, from /proc (Linux); [] elsewhere."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                found.append((int(entry.name), " ".join(a.decode(errors="replace") for a in argv[:3] if a)))
        except (OSError, ValueError, IndexError):
            continue
    return found


def terminate_children(*, grace: float = 10.0) -> list[str]:
    """Stop every child process of this one (a tool started by a library we cannot reach into, such as
    python-on-whales's `docker buildx build`): SIGTERM, then SIGKILL after `grace` seconds.

    Returns the command lines of those stopped. Used when an action is interrupted.
    """
    children = _children(os.getpid())
    for pid, _ in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid, _ in children:
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return [command for _, command in children]


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    tool: str | None = None,
    fix: str | None = None,
    secrets: Iterable[str] = (),
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> str:
    """Run argv, streaming its output; return the output; raise HookError on failure.

    The command line and every output line are printed with secrets masked. A failure names
    the tool, the exit code, the last lines of its output and, when given, the likely fix.
    """
    secrets = [s for s in secrets if s]
    args = [os.fspath(a) for a in argv]
    name = tool or Path(args[0]).name
    exe = find_tool(args[0]) if os.sep not in args[0] else args[0]
    if not quiet:
        log_step("$ " + mask(shlex.join(args), secrets))
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    lines: list[str] = []
    try:
        proc = subprocess.Popen(
            [exe, *args[1:]],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        hint = INSTALL_HINTS.get(name, "check that it is executable")
        raise HookError(f"{name} could not start: {exc.strerror}; {hint}") from None
    assert proc.stdout is not None
    with timed(name):
        try:
            for raw in proc.stdout:
                line = mask(raw.rstrip("\n"), secrets)
                lines.append(line)
                tail.append(line)
                if not quiet:
                    print(f"  {line}", file=sys.stderr, flush=True)
            rc = proc.wait()
        except BaseException:  # an interrupt (Ctrl-C, SIGTERM): the tool stops with us
            stop_process(proc)
            raise
    if rc != 0:
        said = [found.group(1) for found in map(STEP_ERROR.search, lines) if found]
        if said:  # the tool said what is wrong, in one line of ours: that is the failure
            raise HookError(said[-1])
        last = " | ".join(x.strip() for x in tail if x.strip()) or "no output"
        hint = f"; try: {fix}" if fix else ""
        raise HookError(f"{name} failed (exit {rc}) after {time.monotonic() - started:.1f}s: {last}{hint}")
    return "\n".join(lines)
