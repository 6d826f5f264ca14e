"""The real Hook OS boots end to end in QEMU (TCG): `doit dev_dist` output, built by the real
LinuxKit v1.8.2 from the test OS's packages, with a Tinkerbell cmdline.

The guest's only network is QEMU's user net with restrict=on; 10.0.2.100:5000 in the guest is a
Debian docker-registry with htpasswd auth on the host's 127.0.0.1 (tasks/boot/relay.py per connection).
Assertions are on what the guest shows: its serial console, and commands typed into its serial
shell (LinuxKit's getty, INSECURE=true). Each test prints its boot milestones.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.boot import qemu
from tasks.core.arch import Arch
from tests.conftest import REGISTRY_PASSWORD, REGISTRY_USER, Registry, free_port, push_worker
from tests.pipeline_env import Project

pytestmark = pytest.mark.slow
ARCH = Arch.native()
MEMORY_MB = 1536  # the root (about 400 MB: our kernel's modules and firmware) is copied into a tmpfs of half the RAM
GUEST_REGISTRY = f"{qemu.GUEST_SERVICE_IP}:5000"
WORKER_ID = "hook-test-machine-1"
WORKER_IMAGE = f"{GUEST_REGISTRY}/hooktest/tink-worker:test"
#: One vCPU for every x86_64 boot test: under TCG two vCPUs' TSCs drift apart (Linux falls back to
#: the slow HPET clocksource) and, on a loaded host, a halted vCPU can miss its timer and stall the
#: guest (rcu_preempt stalls); one vCPU boots as fast here (2 host cores) and keeps the TSC.
SMP = 1
AGENT_IMAGE = f"{GUEST_REGISTRY}/hooktest/tink-agent:test"  # the tink-agent stand-in (hack/test-os/tink-agent.py)
MARKER = f"TINK-WORKER-RUNNING worker_id={WORKER_ID}"
BOOT_TIMEOUT = 600


def tinkerbell_cmdline(password: str = REGISTRY_PASSWORD, *, extra: str = "") -> str:
    """What a Tinkerbell server (smee) would give: the serial console last, so /dev/console is it."""
    return (f"console=tty0 console=ttyS0 panic=-1 docker_registry={GUEST_REGISTRY} "
            f"insecure_registries={GUEST_REGISTRY} registry_username={REGISTRY_USER} "
            f'"registry_password={password}" tink_worker_image={WORKER_IMAGE} worker_id={WORKER_ID} '
            f"grpc_authority={qemu.GUEST_SERVICE_IP}:42113 tinkerbell_tls=false {extra}").strip()


def packaged(project: Project, build: str, prefix: str, where: Path) -> tuple[Path, Path]:
    """The kernel and initramfs exactly as packaged in out/dist/<build>/<prefix>_<arch>.tar.gz."""
    with tarfile.open(project.out(f"dist/{build}/{prefix}_{ARCH}.tar.gz")) as tar:
        tar.extractall(where, filter="data")
    return where / f"vmlinuz-{ARCH}", where / f"initramfs-{ARCH}"


def guest(kernel: Path, initrd: Path, log: Path, *, cmdline: str, registry_port: int,
          hostfwd: tuple[tuple[int, int], ...] = (), extra: tuple[str, ...] = ()) -> qemu.Guest:
    nic = qemu.Nic(forwards=(qemu.Forward(5000, registry_port),), hostfwd=hostfwd)
    return qemu.Guest(kernel, initrd, arch=ARCH, cmdline=cmdline, memory_mb=MEMORY_MB, accel="tcg", smp=SMP,
                      nics=[nic], extra=["-device", "virtio-rng-pci", *extra], log=log,
                      milestone_patterns=qemu.HOOK_MILESTONES)


def in_service(service: str, command: str) -> str:
    """A shell command that runs `command` inside one of LinuxKit's service containers."""
    exec_id = f"t{time.monotonic_ns() % 10**9}"
    return f"ctr -n services.linuxkit tasks exec --exec-id {exec_id} {service} {command}"


def report(g: qemu.Guest, name: str) -> None:
    print(f"\n[{name}] milestones (s after qemu start): {g.milestone_report()}")


def assert_password_only_in_kernel_cmdline(console: str, password: str) -> None:
    """The password shows nowhere but where the kernel prints its own command line."""
    kernel_lines = ("Command line:", "Kernel command line:", "Unknown kernel command line parameters")
    leaks = [line for line in console.splitlines() if password in line and not any(k in line for k in kernel_lines)]
    assert not leaks, leaks


def service_logs(g: qemu.Guest) -> str:
    """hook-docker's and hook-bootkit's logs (LinuxKit writes each service's to /var/log/<name>.log),
    printed on the console: from then on the console shows all they ever logged. The console may
    also carry, in the middle of them, a line the programs mirror there while cat runs; to ask what
    came before what, take file_lines() of it."""
    return g.sh("cat /var/log/hook-docker.log /var/log/hook-bootkit.log", timeout=120).output


#: A line of the programs' log files: 'TIME PROGRAM LEVEL message' (hookcommon.log.setup_logging);
#: what they mirror on the console is 'PROGRAM: LEVEL message', without the time.
FILE_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \S+ [A-Z]+ .*$", re.M)


def file_lines(output: str) -> str:
    """The log-file lines of a cat on the serial console, without the console lines that came between:
    a warning or milestone line the programs write on /dev/console while cat prints shows up among
    the file's lines (CI once saw 'started dockerd' there, before the lines that preceded it)."""
    return "".join(f"{m.group(0)}\n" for m in FILE_LINE.finditer(output))


@pytest.fixture(scope="module")
def dev_boot_files(dev_project: Project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return packaged(dev_project, "dev", "hook", tmp_path_factory.mktemp("dev-boot"))


def test_whole_chain_then_reboot(dev_boot_files: tuple[Path, Path], worker_registry: Registry,
                                 tmp_path: Path) -> None:
    """dockerd comes up with the cmdline's daemon.json, bootkit pulls tink-worker with the password
    (with '=' and a space) and runs it privileged on the host network; then /worker/reboot reboots."""
    kernel, initrd = dev_boot_files
    with guest(kernel, initrd, tmp_path / "console.log", cmdline=tinkerbell_cmdline(),
               registry_port=worker_registry.port) as g:
        g.wait_for(MARKER, timeout=BOOT_TIMEOUT)
        # bootkit says so on the console once tink-worker kept running for its --running-check
        g.wait_for("hook-bootkit: INFO tink-worker is running", timeout=60)
        report(g, "whole chain")
        # the test tink-worker prints the registry user and a hash of the password it was given
        pw_hash = hashlib.sha256(REGISTRY_PASSWORD.encode()).hexdigest()[:16]
        g.wait_for(re.compile(rf"{MARKER} registry={re.escape(GUEST_REGISTRY)} user={REGISTRY_USER} "
                              rf"password_sha256={pw_hash}"), timeout=60)

        daemon = g.sh(in_service("hook-docker", "cat /etc/docker/daemon.json"))
        assert daemon.status == 0, daemon.output
        assert '"insecure-registries": [\n    "10.0.2.100:5000"\n  ]' in daemon.output.replace("\r", "")

        fmt = "'{{.HostConfig.Privileged}} {{.HostConfig.NetworkMode}} {{json .HostConfig.Binds}} {{.State.Status}}'"
        inspect = g.sh(in_service("hook-docker", f"docker inspect --format {fmt} tink-worker"))
        assert inspect.status == 0, inspect.output
        assert ('true host ["/worker:/worker","/var/run/docker.sock:/var/run/docker.sock","/dev:/dev",'
                '"/host_root/run:/run"] running' in inspect.output)

        # what upstream Hook has too: kexec-tools for kexec actions, cdc_ncm for a BMC's USB NIC, acpid;
        # and the clock step before dockerd (no NTP server answers here: one line, not fatal)
        kexec = g.sh(in_service("hook-docker", "kexec --version"))
        assert kexec.status == 0 and "kexec-tools" in kexec.output, kexec.output
        assert g.sh("test -d /sys/module/cdc_ncm").status == 0
        assert re.search(r"hook-docker: WARNING clock: no NTP answer", g.console)
        # IPv6: the kernel's SLAAC from QEMU's router advertisements (fec0::/64, which Linux scopes
        # "site"), no DHCPv6
        six = g.sh("ip -6 addr show", timeout=60)
        assert re.search(r"inet6 fec0:\S+ scope (global|site)", six.output), six.output

        logs = service_logs(g)
        assert "started dockerd" in logs
        assert re.search(r"hook-bootkit INFO .*tink-worker.* running", logs), logs[-2000:]
        assert_password_only_in_kernel_cmdline(g.console, REGISTRY_PASSWORD)

        g.sh(in_service("hook-docker", "touch /worker/reboot"))
        code = g.wait_exit(180)  # -no-reboot: the guest's reboot ends QEMU
        report(g, "whole chain + reboot")
    assert code == 0
    # hook-docker says why on the console (warnings go there), then the kernel reboots
    assert re.search(r"hook-docker: WARNING /worker/reboot appeared: tink-worker asked for a reboot", g.console)
    assert "reboot: Restarting system" in g.console, g.console[-2000:]


def test_registry_down_at_boot_comes_up_later(dev_boot_files: tuple[Path, Path], registry_factory,  # noqa: ANN001
                                              test_os: dict, tmp_path: Path) -> None:
    """Nothing listens where the registry should be; bootkit retries with backoff; once the registry
    is up, tink-worker runs, with no reboot."""
    kernel, initrd = dev_boot_files
    port = free_port()
    with guest(kernel, initrd, tmp_path / "console.log", cmdline=tinkerbell_cmdline(), registry_port=port) as g:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            logs = g.sh("cat /var/log/hook-bootkit.log 2>/dev/null | tail -n 30", timeout=BOOT_TIMEOUT).output
            if re.search(r"pull.*(fail|refused|connection|EOF)", logs, re.I | re.S):
                break
            assert time.monotonic() < deadline, logs
            time.sleep(5)
        reg = registry_factory(username=REGISTRY_USER, password=REGISTRY_PASSWORD, port=port)
        push_worker(reg, test_os, tmp_path / "docker-config")
        up = g.elapsed
        g.wait_for(MARKER, timeout=180)
        report(g, "registry down at boot")
        print(f"[registry down at boot] registry up at {up:.1f}s, tink-worker running {g.elapsed - up:.1f}s later")
        assert g.console.count("Linux version") == 1  # no reboot on the way
        assert_password_only_in_kernel_cmdline(g.console + service_logs(g), REGISTRY_PASSWORD)
        # the power button (QEMU's ACPI power button): acpid, then a clean poweroff of the whole OS
        g.monitor("system_powerdown")
        code = g.wait_exit(180)
    assert code == 0
    assert "acpid: button/power" in g.console and "reboot: Power down" in g.console, g.console[-3000:]


def test_wrong_password_is_a_clear_retried_error(dev_boot_files: tuple[Path, Path], worker_registry: Registry,
                                                 tmp_path: Path) -> None:
    kernel, initrd = dev_boot_files
    wrong = "wr=ong pass"
    with guest(kernel, initrd, tmp_path / "console.log", cmdline=tinkerbell_cmdline(wrong),
               registry_port=worker_registry.port) as g:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            logs = g.sh("cat /var/log/hook-bootkit.log 2>/dev/null", timeout=BOOT_TIMEOUT).output
            refusals = re.findall(r"hook-bootkit \w+ .*pull.*(?:unauthorized|authentication required).*", logs)
            if len(refusals) >= 2:
                break
            assert time.monotonic() < deadline, logs
            time.sleep(5)
        report(g, "wrong password")
        print(f"[wrong password] bootkit said: {refusals[0]}")
        assert "retrying in" in refusals[0]
        assert MARKER not in g.console
        assert_password_only_in_kernel_cmdline(g.console, wrong)


# --- the debug image: sshd with the key given at build time ----------------------------------------


def _ssh(key: Path, port: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR",
         "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=120)


@pytest.fixture
def debug_guest(debug_project: Project, worker_registry: Registry, tmp_path: Path) -> Iterator[tuple[qemu.Guest, int]]:
    kernel, initrd = packaged(debug_project, "debug", "hook-debug", tmp_path / "files")
    port = free_port()
    disk = tmp_path / "disk.img"
    with disk.open("wb") as out:
        out.truncate(8 << 20)
    extra = ("-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0,serial=HOOKDEBUG01")
    with guest(kernel, initrd, tmp_path / "console.log", cmdline=tinkerbell_cmdline(),
               registry_port=worker_registry.port, hostfwd=((port, 22),), extra=extra) as g:
        yield g, port


def test_debug_image_ssh_with_the_build_key(debug_guest: tuple[qemu.Guest, int], ssh_keys: dict[str, Path]) -> None:
    g, port = debug_guest
    g.wait_for(MARKER, timeout=BOOT_TIMEOUT)
    report(g, "debug image")
    deadline = time.monotonic() + 120
    while True:  # sshd may start after tink-worker
        done = _ssh(ssh_keys["good"], port, in_service("hook-docker", "docker ps --format '{{.Names}} {{.Status}}'"))
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^tink-worker Up", done.stdout, re.M), done.stdout
    disks = _ssh(ssh_keys["good"], port, in_service("hook-docker", "ls /dev/disk/by-id"))  # as workflows name disks
    assert disks.returncode == 0 and "virtio-HOOKDEBUG01" in disks.stdout.split(), disks.stdout + disks.stderr
    refused = _ssh(ssh_keys["other"], port, "true")
    assert refused.returncode == 255
    assert "Permission denied (publickey)" in refused.stderr


@pytest.mark.parametrize("how", [(), ("--netboot", "--uefi")], ids=["kernel", "netboot-uefi"])
def test_doit_boot_with_a_forwarded_registry(dev_project: Project, worker_registry: Registry,
                                             how: tuple[str, ...]) -> None:
    """What a user runs: `doit boot` with a Tinkerbell cmdline and a local registry, until a line shows:
    with `-kernel`, and as Smee boots it (`--netboot --uefi`: OVMF, iPXE's EFI ROM, Smee's script, the
    files over HTTP from 127.0.0.1). The password shows nowhere in what doit prints but the kernel's
    own cmdline lines (the Smee script's line is logged masked)."""
    cmdline = tinkerbell_cmdline().replace(GUEST_REGISTRY, "{registry}")
    result = dev_project.doit("boot", *how, "--registry", worker_registry.addr, f"--cmdline={cmdline}", "--memory",
                              str(MEMORY_MB), "--accel", "tcg", "--expect", "hook-bootkit: INFO tink-worker is running",
                              "--timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT + 120)
    assert f"the guest reaches {worker_registry.addr} as {GUEST_REGISTRY}" in result.stderr
    assert "saw 'hook-bootkit: INFO tink-worker is running' on the console after" in result.stderr
    assert "milestones: kernel" in result.stderr
    assert_password_only_in_kernel_cmdline(result.output, REGISTRY_PASSWORD)
    if how:
        script = next(line for line in result.stderr.splitlines() if "Smee's script (TFTP" in line)
        assert "registry_password=" in script and "***" in script, script
        assert re.search(r"the initramfs \([\d.]+ MB\) came over iPXE's HTTP", result.stderr), result.stderr[-3000:]
        assert "UEFI (OVMF), iPXE" in result.stderr
