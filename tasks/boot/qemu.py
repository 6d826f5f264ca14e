"""Boot a kernel + initramfs under QEMU with the serial console captured: the harness that `doit boot`
and the boot tests share.

- `Guest`: one running QEMU. The serial console is read continuously (kept, logged, optionally
  echoed); `wait_for()` waits for text on it, `milestones` records when known boot stages showed,
  `sh()` types a command into the guest's serial shell and returns its output and exit status.
- Networks: `Nic` is a QEMU user-mode NIC, always `restrict=on` (the guest reaches nothing), with
  `Forward`s (a guest address that reaches one service on the host's 127.0.0.1, through
  tasks/relay.py run per connection), `hostfwd` ports (127.0.0.1 on the host to a guest port, for
  ssh) and an optional pcap of its traffic (QEMU's filter-dump). No NIC at all is `nics=()`.
- `boot()`: boot until a marker shows or the guest powers off (the simple case).
- `interactive()`: the console on this terminal (Ctrl-A X quits), with milestones printed beside it.

Acceleration: TCG unless KVM is known to work. `accel="auto"` picks KVM only when the guest
arch is the host's, /dev/kvm is usable AND the KVM module is not `kvm_pvm` (a software
hypervisor on which a stock kernel hangs for many minutes). `accel="kvm"` forces it.

/dev/console is the LAST `console=` on the kernel cmdline that exists. `console_cmdline()` appends
the arch's serial port when the cmdline's last console= is another one, so that what init, the
services and tink-worker write to /dev/console shows on the serial line QEMU gives us.

aarch64 uses `qemu-system-aarch64 -M virt -cpu max` (under TCG `pauth-impdef=on`: QEMU's own
pointer-authentication hash, much faster to emulate than the architected QARMA) and the PL011
console `ttyAMA0`. A kernel is booted through AAVMF (Debian's `qemu-efi-aarch64`), as an arm64
server's UEFI boots it: the firmware loads the kernel and initramfs QEMU gives it (fw_cfg) and
starts the kernel's EFI stub, so the kernel finds its devices through UEFI and ACPI/DT the way it
does on a server. `extra` with its own `-bios` or pflash (an ISO boot) is left alone.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.run import find_tool, log_step, mask
from tasks.settings import cmdline as settings_cmdline

DEFAULT_CMDLINE = "console=ttyS0 panic=-1"
ACCELS = ("auto", "tcg", "kvm")
TAIL_LINES = 12
#: The serial console device the kernel must be told about, per arch.
CONSOLE = {arch: arch.serial_console for arch in Arch}
KVM_DEVICE = Path("/dev/kvm")
KVM_PVM_MODULE = Path("/sys/module/kvm_pvm")
RELAY = Path(__file__).resolve().parent / "relay.py"
#: Where a forwarded host service appears in the guest by default (QEMU's user net is 10.0.2.0/24).
GUEST_SERVICE_IP = "10.0.2.100"

#: What Linux prints when a vCPU stopped getting timer interrupts (seen under TCG with -smp 2 on a
#: loaded host: the TSCs of the vCPUs drift apart and a halted vCPU is never woken): waiting on is useless.
STALL = "rcu: INFO: rcu_preempt detected stalls"
#: Boot stages of the Hook OS that show on the serial console, in order: (name, regex).
HOOK_MILESTONES: tuple[tuple[str, str], ...] = (
    ("kernel", r"Linux version \d"),
    ("/init runs (initramfs unpacked)", r"Run /init as init process"),
    # LinuxKit's init prints /etc/issue; the debug image has its own
    ("LinuxKit init (root copied)", r"Welcome to LinuxKit|HookOS debug image"),
    ("containerd", r"containerd successfully booted"),
    ("dockerd started (hook-docker)", r"hook-docker: INFO started dockerd"),
    ("tink-worker started (hook-bootkit)", r"hook-bootkit: INFO tink-worker is running"),
    ("tink-worker's own output", r"TINK-WORKER-RUNNING"),
)


@dataclass(frozen=True)
class Forward:
    """A guest address (guest_ip:guest_port) that reaches host_ip:host_port on this machine."""

    guest_port: int
    host_port: int
    guest_ip: str = GUEST_SERVICE_IP
    host_ip: str = "127.0.0.1"

    def qemu(self) -> str:
        command = f"{sys.executable} {RELAY} {self.host_ip} {self.host_port}"
        return f"guestfwd=tcp:{self.guest_ip}:{self.guest_port}-cmd:{command.replace(',', ',,')}"


@dataclass(frozen=True)
class Nic:
    """A QEMU user-mode NIC with restrict=on: the guest reaches only what `forwards` name."""

    forwards: tuple[Forward, ...] = ()
    #: (port on the host's 127.0.0.1, guest port): e.g. ssh into the guest.
    hostfwd: tuple[tuple[int, int], ...] = ()
    mac: str | None = None
    pcap: Path | None = None
    model: str = "virtio-net-pci"
    #: netboot: QEMU's DHCP names `bootfile` in the `tftp` folder (an iPXE script), the NIC's option
    #: ROM (iPXE) boots first
    tftp: Path | None = None
    bootfile: str = ""
    romfile: str = ""
    #: no option ROM at all (QEMU gives virtio-net and e1000e its iPXE ROM unless told `romfile=`):
    #: the firmware's own network stack boots (OVMF's PXE client)
    no_rom: bool = False
    bootindex: int | None = None

    def args(self, index: int) -> list[str]:
        netdev = [f"user,id=net{index},restrict=on"]
        if self.tftp is not None:
            netdev += [f"tftp={self.tftp}", f"bootfile={self.bootfile}"]
        netdev += [f.qemu() for f in self.forwards]
        netdev += [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in self.hostfwd]
        device = f"{self.model},netdev=net{index}" + (f",mac={self.mac}" if self.mac else "")
        device += f",romfile={self.romfile}" if self.romfile else (",romfile=" if self.no_rom else "")
        device += (f",bootindex={self.bootindex}" if self.bootindex is not None else "")
        argv = ["-netdev", ",".join(netdev), "-device", device]
        if self.pcap is not None:
            argv += ["-object", f"filter-dump,id=dump{index},netdev=net{index},file={self.pcap}"]
        return argv


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


def console_cmdline(cmdline: str, arch: Arch) -> str:
    """arch_cmdline(), plus `console=<serial>` at the end unless the last console= is already it.

    /dev/console is the last console= that exists: without this, a cmdline such as
    `console=ttyS0 console=tty0` sends init's and the services' output to the screen QEMU hides.
    """
    cmdline = arch_cmdline(cmdline, arch)
    consoles = [w.partition("=")[2].partition(",")[0] for w in cmdline.split() if w.startswith("console=")]
    if consoles and consoles[-1] == CONSOLE[arch]:
        return cmdline
    return f"{cmdline} console={CONSOLE[arch]}".strip()


def cmdline_secrets(cmdline: str) -> list[str]:
    """The secrets a Tinkerbell cmdline holds (registry_password), as the kernel reads them and as
    they stand quoted in a logged command line."""
    return [form for secret in settings_cmdline.cmdline_secrets(cmdline) for form in (secret, shlex.quote(secret))]


def qemu_argv(
    qemu: str,
    kernel: Path | None,
    initrd: Path | None,
    *,
    arch: Arch,
    cmdline: str,
    memory_mb: int,
    accel: str,
    smp: int = 1,
    nics: Sequence[Nic] | None = None,
    extra: Sequence[str] = (),
    serial0: Path | None = None,
    serial1: Path | None = None,
) -> list[str]:
    """The qemu command line. nics=None: QEMU's default NIC is disabled too (`-nic none`).

    serial0: the first serial port (ttyS0) goes to that file, and the second (ttyS1, Smee's console)
    is the console read here; the firmware's and iPXE's lines are in the file. serial1: the console
    read here is the first port, the second (ttyS1) goes to that file.

    kernel=None: no -kernel/-initrd/-append; the firmware boots what `extra` gives it (-cdrom, -drive,
    -bios for OVMF), and the boot loader on that medium makes the kernel's command line.
    """
    argv = [qemu]
    if arch is Arch.AARCH64:
        argv += ["-M", "virt", "-cpu", "host" if accel == "kvm" else "max,pauth-impdef=on"]
        if kernel is not None and not any(a == "-bios" or "pflash" in a for a in extra):
            argv += aarch64_firmware()
    elif accel == "kvm":
        argv += ["-cpu", "host"]
    argv += [
        "-accel", accel,
        "-m", str(memory_mb),
        "-smp", str(smp),
        "-nographic",
        "-no-reboot",
    ]  # fmt: skip
    if serial0 is not None and serial1 is not None:
        raise ValueError("serial0 and serial1: one of the two serial ports is the console")
    if serial0 is not None:
        argv += ["-serial", f"file:{serial0}", "-serial", "mon:stdio"]
    if serial1 is not None:
        argv += ["-serial", "mon:stdio", "-serial", f"file:{serial1}"]
    if kernel is not None:
        argv += ["-kernel", os.fspath(kernel)]
        argv += ["-initrd", os.fspath(initrd)] if initrd is not None else []
        argv += ["-append", arch_cmdline(cmdline, arch)]
    if not nics:
        argv += ["-nic", "none"]
    else:
        for index, nic in enumerate(nics):
            argv += nic.args(index)
    return argv + list(extra)


#: AAVMF, the UEFI firmware for QEMU's arm64 virt machine (Debian's qemu-efi-aarch64)
AAVMF = Path("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd")


def aarch64_firmware(path: Path = AAVMF) -> list[str]:
    """The -bios arguments of an arm64 UEFI boot; a one-line refusal when the firmware is not installed."""
    if not path.is_file():
        raise HookError(f"cannot boot aarch64: no UEFI firmware at {path}; install Debian's qemu-efi-aarch64 "
                        "(apt-get install qemu-efi-aarch64)")
    return ["-bios", os.fspath(path)]


#: AAVMF's Secure Boot pair (Debian's qemu-efi-aarch64): the code, and variables with Microsoft's keys enrolled
AAVMF_SB_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.ms.fd")
AAVMF_SB_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.ms.fd")


def pflash_args(code: Path, variables: Path, vars_copy: Path, *, package: str) -> list[str]:
    """The two pflash drives of a UEFI firmware (OVMF, AAVMF): its code read-only, and a copy of its
    variables (the firmware writes them) at vars_copy. A one-line refusal naming the Debian package
    when a file is missing."""
    for path in (code, variables):
        if not path.is_file():
            raise HookError(f"no UEFI firmware file {path}: install Debian's {package} (apt-get install {package})")
    vars_copy.write_bytes(variables.read_bytes())
    return ["-drive", f"if=pflash,format=raw,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}"]


def aarch64_secure_boot_firmware(vars_copy: Path) -> list[str]:
    """pflash arguments of an arm64 UEFI boot with Secure Boot on: AAVMF's code and a copy of its
    variables (Microsoft's keys enrolled, Secure Boot enabled), which the firmware writes."""
    return pflash_args(AAVMF_SB_CODE, AAVMF_SB_VARS, vars_copy, package="qemu-efi-aarch64")


# kept for callers and tests of the simple shape
def _argv(qemu: str, kernel: Path, initrd: Path, *, arch: Arch, cmdline: str, memory_mb: int, accel: str) -> list[str]:
    return qemu_argv(qemu, kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=accel)


def _check_inputs(kernel: Path | None, initrd: Path | None, memory_mb: int) -> None:
    for what, path in (("kernel", kernel), ("initramfs", initrd)):
        if path is not None and not Path(path).is_file():
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
    nics: Sequence[Nic] | None = None,
    smp: int = 1,
) -> list[str]:
    """The qemu command line to boot interactively: console on this terminal, Ctrl-A X quits."""
    _check_inputs(kernel, initrd, memory_mb)
    qemu = find_tool(arch.qemu_binary)
    return qemu_argv(
        qemu, kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=pick_accel(accel, arch),
        nics=nics, smp=smp,
    )


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no console output)"


def _file_text(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return _text(path.read_bytes())
    except OSError:
        return ""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")


def _keep(console: str) -> Path:
    fd, name = tempfile.mkstemp(prefix="hook-qemu-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(console)
    return Path(name)


@dataclass
class ShellResult:
    """What a command typed into the guest's serial shell printed, and its exit status."""

    command: str
    output: str
    status: int


class Guest:
    """One QEMU guest with its serial console read in the background.

    Use as a context manager (QEMU is stopped on exit). The console is kept in memory, written to
    `log` as it comes, and echoed to stderr with `echo=True`. `milestones` maps each of
    `milestone_patterns` to the seconds after start it first showed. With kernel=None (and initrd=None)
    QEMU's firmware boots the media `extra` names (e.g. `-cdrom ISO`, `-bios OVMF.fd`); cmdline is unused.
    """

    def __init__(
        self,
        kernel: Path | None,
        initrd: Path | None,
        *,
        arch: Arch = Arch.X86_64,
        cmdline: str = DEFAULT_CMDLINE,
        memory_mb: int = 1024,
        accel: str = "auto",
        smp: int = 1,
        nics: Sequence[Nic] | None = None,
        extra: Sequence[str] = (),
        log: Path | None = None,
        echo: bool = False,
        milestone_patterns: Sequence[tuple[str, str]] = (),
        announce: bool = True,
        serial0: Path | None = None,
        serial1: Path | None = None,
    ) -> None:
        _check_inputs(kernel, initrd, memory_mb)
        self.arch = arch
        self.accel = pick_accel(accel, arch)
        qemu = find_tool(arch.qemu_binary)
        self.argv = qemu_argv(qemu, kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb,
                              accel=self.accel, smp=smp, nics=nics, extra=extra, serial0=serial0,
                              serial1=serial1)
        #: the first serial port's file (the firmware, iPXE), when the console is the second one
        self.serial0 = serial0
        #: the second serial port's file, when the console is the first one
        self.serial1 = serial1
        self.log = Path(log) if log is not None else None
        #: masked in what we log (the kernel still prints its own command line on the console)
        self.secrets = cmdline_secrets(cmdline)
        self.echo = echo
        self.announce = announce
        self._patterns = [(name, re.compile(rx.encode())) for name, rx in milestone_patterns]
        self.milestones: dict[str, float] = {}
        self._raw = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._sink = None
        self._started = 0.0
        self._counter = itertools.count(1)
        self._milestone_pos = 0
        self._pending: list[str] = []

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> Guest:
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._sink = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        log_step(f"booting under qemu ({self.arch}, {self.accel}): {mask(shlex.join(self.argv), self.secrets)}")
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        except OSError as exc:
            raise HookError(f"{self.arch.qemu_binary} could not start: {exc.strerror}") from None
        self._started = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="qemu-console", daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def stop(self) -> None:
        """Stop QEMU (if it still runs) and the console reader."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(10)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if stream:
                        stream.close()
        if self._sink:
            self._sink.close()
            self._sink = None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._raw += data
                reached = self._note_milestones()
                self._cond.notify_all()
            if self._sink:
                self._sink.write(data)
                self._sink.flush()
            if self.echo:
                sys.stderr.write(data.decode("utf-8", "replace"))
                sys.stderr.flush()
            if self.announce:
                # on a line of their own: with the console echoed, once it has ended a line
                self._pending += reached
                if self._pending and (not self.echo or data.endswith(b"\n")):
                    for name in self._pending:
                        log_step(f"boot milestone after {self.milestones[name]:6.1f}s: {name}")
                    self._pending = []

    def _note_milestones(self) -> list[str]:
        reached = []
        for name, rx in self._patterns:
            if name not in self.milestones and rx.search(self._raw, max(0, self._milestone_pos - 200)):
                self.milestones[name] = round(self.elapsed, 1)
                reached.append(name)
        self._milestone_pos = len(self._raw)
        return reached

    # --- the console -------------------------------------------------------------------------

    @property
    def console(self) -> str:
        with self._cond:
            return _text(bytes(self._raw))

    @property
    def firmware_console(self) -> str:
        """What the first serial port showed (serial0=): SeaBIOS or OVMF, iPXE."""
        return _file_text(self.serial0)

    @property
    def second_serial(self) -> str:
        """What the second serial port showed (serial1=)."""
        return _file_text(self.serial1)

    def mark(self) -> int:
        """A position in the console: wait_for(..., since=mark) looks only at what came after it."""
        with self._cond:
            return len(self._raw)

    def wait_for(self, pattern: str | re.Pattern[str], *, timeout: float, since: int = 0) -> re.Match[str]:
        """Wait until pattern (text or regex) shows on the console; HookError on timeout or power-off."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        what = rx.pattern if isinstance(pattern, re.Pattern) else pattern
        with self._cond:
            while True:
                text = _text(bytes(self._raw[since:]))
                found = rx.search(text)
                if found:
                    return found
                if STALL in text:
                    raise HookError(f"no {what!r} on the console: the guest's kernel stalled after {self.elapsed:.1f}s "
                                    f"({STALL!r}: its vCPUs stopped getting timer interrupts, a QEMU/host problem, "
                                    "not the OS's; boot again, or with one vCPU (--smp 1) under TCG)"
                                    + (f" (console log: {self.log})" if self.log else ""))
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        why = (f"the guest stopped (qemu exit {self.returncode}) after {self.elapsed:.1f}s" if self._eof
               else f"not within {timeout:g}s")
        raise HookError(f"no {what!r} on the console: {why}; last lines: {_tail(self.console)}"
                        + (f" (console log: {self.log})" if self.log else ""))

    def write(self, text: str | bytes) -> None:
        """Type text on the serial console."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(text.encode() if isinstance(text, str) else text)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise HookError(f"cannot type on the console: qemu exited ({self.returncode})") from None

    def sh(self, command: str, *, timeout: float = 60, retry_every: float = 5.0) -> ShellResult:
        """Run a shell command in the guest's serial shell; return what it printed and its status.

        The typed line holds no quote, backslash or bracket: the command goes base64-encoded
        (`echo B64 | base64 -d | sh`). Until the shell runs it (it may not be up yet), the line is
        typed again every `retry_every` seconds; a shell that starts reads only the end of a line
        typed before it (getty flushes the input), and no end of this line can leave it in an open
        quote or another unfinished command. The command must be safe to run twice. The markers
        around its output cannot match the typed line: the begin marker only at the start of a
        line, the end marker only with the status's digits after it. Once the command has started,
        it has the rest of `timeout`.
        """
        n = next(self._counter)
        encoded = base64.b64encode(command.encode()).decode()
        line = f"echo =B{n}=; echo {encoded} | base64 -d | sh; echo =E{n}= $?\n"
        rx = re.compile(rf"(?m)^=B{n}=\n(.*?)=E{n}= (\d+)", re.S)
        started = re.compile(rf"(?m)^=B{n}=\n")
        deadline = time.monotonic() + timeout
        since = self.mark()

        def gone() -> HookError:
            return HookError(f"the guest's serial shell did not run {command!r} within {timeout:g}s; "
                             f"last lines: {_tail(self.console)}")

        while True:
            self.write(line)
            try:
                self.wait_for(started, timeout=min(retry_every, max(0.1, deadline - time.monotonic())), since=since)
                break
            except HookError:
                if self._eof or time.monotonic() >= deadline:
                    raise gone() from None
        try:
            found = self.wait_for(rx, timeout=max(0.1, deadline - time.monotonic()), since=since)
        except HookError:
            raise gone() from None
        return ShellResult(command, found.group(1), int(found.group(2)))

    def monitor(self, command: str) -> None:
        """Give QEMU's monitor a command (e.g. system_powerdown: the ACPI power button): Ctrl-A C to the
        monitor, the command, Ctrl-A C back to the console (-nographic's mux)."""
        self.write(b"\x01c")
        time.sleep(0.5)
        self.write(command.encode() + b"\n")
        time.sleep(0.5)
        self.write(b"\x01c")

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit (the guest powered off or rebooted under -no-reboot)."""
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HookError(f"the guest did not power off or reboot within {timeout:g}s; last lines: "
                            f"{_tail(self.console)}") from None
        if self._reader is not None:
            self._reader.join(10)
        return code

    def milestone_report(self) -> str:
        return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in
                         sorted(self.milestones.items(), key=lambda item: item[1])) or "(none seen)"


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
    nics: Sequence[Nic] | None = None,
    smp: int = 1,
    milestones: Sequence[tuple[str, str]] = (),
    extra: Sequence[str] = (),
) -> BootResult:
    """Boot kernel+initrd with the console captured (-nographic, -no-reboot).

    Returns when the guest powers off (or panics: panic=-1 plus -no-reboot exits qemu), or,
    when `expect` is given, as soon as that text is on the console (qemu is then killed).
    Raises HookError when qemu fails, when `expect` never appears (timeout, or power-off before
    it), or when the guest does not power off within `timeout`. The console is written to `log`
    (or, on failure without a `log`, to a kept temporary file named in the error).
    """
    guest = Guest(kernel, initrd, arch=arch, cmdline=cmdline, memory_mb=memory_mb, accel=accel, log=log,
                  echo=echo, nics=nics, smp=smp, milestone_patterns=milestones, extra=extra)
    failure: str | None = None
    matched = False
    returncode: int | None = None
    with guest:
        deadline = time.monotonic() + timeout
        if expect is not None:
            try:
                guest.wait_for(expect, timeout=timeout)
                matched = True
            except HookError:
                pass
        if not matched:
            try:
                returncode = guest.wait_exit(max(0.0, deadline - time.monotonic()))
            except HookError:
                returncode = None
        seconds = guest.elapsed
    console = guest.console
    result = BootResult(argv=guest.argv, console=console, returncode=returncode, seconds=seconds,
                        matched=matched, log=log, accel=guest.accel)
    if matched:
        log_step(f"qemu: saw {expect!r} after {seconds:.1f}s")
        return result
    if returncode is None:
        failure = (f"no {expect!r} on the console after {timeout:g} s" if expect is not None
                   else f"the guest did not power off within {timeout:g} s")
    elif returncode != 0:
        failure = f"{arch.qemu_binary} failed (exit {returncode}) after {seconds:.1f} s"
    elif expect is not None:
        failure = f"the guest powered off after {seconds:.1f} s without {expect!r} on the console"
    if failure is None:
        log_step(f"qemu: guest powered off after {seconds:.1f}s")
        return result
    kept = log if log is not None else _keep(console)
    raise HookError(f"{failure}; last lines: {_tail(console)} (console log: {kept})")


def interactive(guest: Guest) -> int:
    """Run a guest with its console on this terminal: keys go to the guest, Ctrl-A X quits QEMU.

    Milestones are printed on stderr beside the console as they show. Returns QEMU's exit status.
    """
    import termios
    import tty

    guest.echo = True
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    with guest:
        if saved is not None:
            tty.setraw(stdin)
        try:
            stop = threading.Event()

            def forward() -> None:
                while not stop.is_set():
                    try:
                        data = os.read(stdin, 1024)
                    except OSError:
                        return
                    if not data:
                        return
                    with contextlib.suppress(HookError):
                        guest.write(data)

            threading.Thread(target=forward, name="keys", daemon=True).start()
            code = guest.wait_exit(timeout=10 * 365 * 86400)
            stop.set()
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    log_step(f"qemu exited ({code}); milestones: {guest.milestone_report()}")
    return code
