"""Boot a kernel + initramfs under QEMU, with the serial console captured.

Used by the `run` task (interactively: see `interactive_argv`) and by tests that check an
initramfs really boots (`boot`, which waits for a marker on the console or for power-off).

Acceleration: TCG unless KVM is known to work. `accel="auto"` picks KVM only when the guest
arch is the host's, /dev/kvm is usable AND the KVM module is not `kvm_pvm` (a software
hypervisor on which a stock kernel hangs for many minutes). `accel="kvm"` forces it.

aarch64 uses `qemu-system-aarch64 -M virt -cpu cortex-a57` and the PL011 console `ttyAMA0`.
That path is written but not tested here (no qemu-system-arm on the test machine).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.arch import Arch
from tasks.errors import HookError
from tasks.run import find_tool, log_step

DEFAULT_CMDLINE = "console=ttyS0 panic=-1"
ACCELS = ("auto", "tcg", "kvm")
TAIL_LINES = 12
#: The serial console device the kernel must be told about, per arch.
CONSOLE = {arch: arch.serial_console for arch in Arch}
KVM_DEVICE = Path("/dev/kvm")
KVM_PVM_MODULE = Path("/sys/module/kvm_pvm")


@dataclass
class BootResult:
    """What a boot produced. `returncode` is None when qemu was killed after `expect` was seen."""

    argv: list[str]
    console: str
    returncode: int | None
    seconds: float
    matched: bool = False
    log: Path | None = None
    accel: str = "tcg"

    @property
    def lines(self) -> list[str]:
        return self.console.splitlines()


def kvm_usable(*, device: Path = KVM_DEVICE, pvm_module: Path = KVM_PVM_MODULE) -> bool:
    """True when /dev/kvm is there, read-writable, and is not the kvm_pvm software hypervisor."""
    if pvm_module.exists():
        return False
    return device.exists() and os.access(device, os.R_OK | os.W_OK)


def pick_accel(accel: str, arch: Arch, *, host: Arch | None = None, usable: bool | None = None) -> str:
    """Resolve "auto"/"tcg"/"kvm" to "tcg" or "kvm" for a guest of `arch`."""
    if accel not in ACCELS:
        raise HookError(f"unknown qemu accel {accel!r}: use one of {', '.join(ACCELS)}")
    if accel == "tcg":
        return "tcg"
    try:
        native = host or Arch.native()
    except HookError:
        native = None
    if accel == "kvm":
        if arch is not native:
            raise HookError(
                f"accel=kvm cannot run an {arch} guest on a {native or 'unknown'} host: use accel=tcg"
            )
        return "kvm"
    works = kvm_usable() if usable is None else usable
    return "kvm" if works and arch is native else "tcg"


def arch_cmdline(cmdline: str, arch: Arch) -> str:
    """Point `console=` at the arch's serial device: console=ttyS0 becomes ttyAMA0 on aarch64."""
    want = CONSOLE[arch]
    words = []
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if key == "console" and sep:
            dev, comma, opts = value.partition(",")
            if dev in CONSOLE.values() and dev != want:
                word = f"console={want}{comma}{opts}"
        words.append(word)
    return " ".join(words)


def _argv(
    qemu: str, kernel: Path, initrd: Path, *, arch: Arch, cmdline: str, memory_mb: int, accel: str
) -> list[str]:
    argv = [qemu]
    if arch is Arch.AARCH64:
        argv += ["-M", "virt", "-cpu", "host" if accel == "kvm" else "cortex-a57"]
    elif accel == "kvm":
        argv += ["-cpu", "host"]
    argv += [
        "-accel", accel,
        "-m", str(memory_mb),
        "-smp", "1",
        "-nographic",
        "-no-reboot",
        "-kernel", os.fspath(kernel),
        "-initrd", os.fspath(initrd),
        "-append", arch_cmdline(cmdline, arch),
    ]  # fmt: skip
    return argv


def _check_inputs(kernel: Path, initrd: Path, memory_mb: int) -> None:
    for what, path in (("kernel", kernel), ("initramfs", initrd)):
        if not Path(path).is_file():
            raise HookError(f"cannot boot: {what} {path} does not exist (build it first)")
    if memory_mb < 64:
        raise HookError(f"cannot boot with {memory_mb} MiB: give qemu at least 64")


def interactive_argv(
    kernel: Path,
    initrd: Path,
    *,
    arch: Arch = Arch.X86_64,
    cmdline: str = DEFAULT_CMDLINE,
    memory_mb: int = 1024,
    accel: str = "auto",
) -> list[str]:
    """The qemu command line to boot interactively: console on this terminal, Ctrl-A X quits."""
    _check_inputs(kernel, initrd, memory_mb)
    qemu = find_tool(arch.qemu_binary)
    return _argv(
        qemu, kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=pick_accel(accel, arch)
    )


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no console output)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def boot(
    kernel: Path,
    initrd: Path,
    *,
    arch: Arch = Arch.X86_64,
    cmdline: str = DEFAULT_CMDLINE,
    memory_mb: int = 1024,
    timeout: float = 300,
    expect: str | None = None,
    accel: str = "auto",
    log: Path | None = None,
    echo: bool = False,
) -> BootResult:
    """Boot kernel+initrd with the console captured (-nographic, -no-reboot).

    Returns when the guest powers off (or panics: panic=-1 plus -no-reboot exits qemu), or,
    when `expect` is given, as soon as that text is on the console (qemu is then killed).
    Raises HookError when qemu fails, when `expect` never appears (timeout, or power-off before
    it), or when the guest does not power off within `timeout`. The console is written to `log`
    (or, on failure without a `log`, to a kept temporary file named in the error).
    """
    _check_inputs(kernel, initrd, memory_mb)
    qemu = find_tool(arch.qemu_binary)
    chosen = pick_accel(accel, arch)
    argv = _argv(qemu, kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=chosen)
    log_step(
        f"booting {Path(initrd).name} under qemu ({arch}, {chosen}), up to {timeout:g}s: {shlex.join(argv)}"
    )

    if log is not None:
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log, "wb") if log is not None else None  # noqa: SIM115 - closed in finally
    started = time.monotonic()
    searched = 0  # bytes of the console already searched for `expect` (minus an overlap)
    needle = expect.encode() if expect is not None else b""
    matched = False
    timed_out = False
    raw = bytearray()
    try:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise HookError(f"{arch.qemu_binary} could not start: {exc.strerror}") from None
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while True:
                    left = timeout - (time.monotonic() - started)
                    if left <= 0:
                        timed_out = True
                        break
                    if not sel.select(min(left, 1.0)):
                        continue
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:  # EOF: qemu is exiting
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(10)
                        break
                    raw += data
                    if sink:
                        sink.write(data)
                        sink.flush()
                    if echo:
                        sys.stderr.write(data.decode("utf-8", "replace"))
                        sys.stderr.flush()
                    if expect is not None:
                        if raw.find(needle, max(0, searched - len(needle))) >= 0:
                            matched = True
                            break
                        searched = len(raw)
        finally:
            _stop(proc)
            proc.stdout.close()
    finally:
        if sink:
            sink.close()
    console = _text(bytes(raw))
    returncode = None if matched else proc.returncode
    seconds = time.monotonic() - started
    result = BootResult(
        argv=argv,
        console=console,
        returncode=returncode,
        seconds=seconds,
        matched=matched,
        log=log,
        accel=chosen,
    )
    if matched:
        log_step(f"qemu: saw {expect!r} after {seconds:.1f}s")
        return result

    failure: str | None = None
    if timed_out:
        if expect is not None:
            failure = f"no {expect!r} on the console after {timeout:g} s"
        else:
            failure = f"the guest did not power off within {timeout:g} s"
    elif returncode != 0:
        failure = f"{arch.qemu_binary} failed (exit {returncode}) after {seconds:.1f} s"
    elif expect is not None:
        failure = f"the guest powered off after {seconds:.1f} s without {expect!r} on the console"
    if failure is None:
        log_step(f"qemu: guest powered off after {seconds:.1f}s")
        return result
    kept = log if log is not None else _keep(console)
    raise HookError(f"{failure}; last lines: {_tail(console)} (console log: {kept})")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


def _keep(console: str) -> Path:
    fd, name = tempfile.mkstemp(prefix="hook-qemu-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(console)
    return Path(name)
