"""Netbooting a build the way Tinkerbell's Smee boots Hook (../shared/tinkerbell/SMEE.md).

The machine's NIC boots its iPXE option ROM (Debian's ipxe-qemu: BIOS and EFI iPXE in one ROM).
QEMU's user net (restrict=on) answers iPXE's DHCP with a boot file, an iPXE script in Smee's form,
by TFTP; the script fetches the kernel and the initramfs over HTTP from a server on the host's
127.0.0.1, which the guest reaches only through a guestfwd relay (HTTP_IP:80). Under UEFI (OVMF)
iPXE starts the kernel through its EFI stub, and finds the initrd by the `initrd=` argument.

Smee's console is ttyS1 at 115200, last: the machine has two serial ports; the first (the
firmware's and iPXE's lines) goes to a file, the second is the console the harness reads.
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.boot import qemu
from tasks.core.arch import Arch
from tasks.core.errors import HookError

#: Where the guest finds the HTTP server (QEMU's user net is 10.0.2.0/24; the registry is .100).
HTTP_IP = "10.0.2.101"
#: Debian's ipxe-qemu: the e1000e ROM holds the BIOS (PXE) and the EFI iPXE.
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-e1000e.rom")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: Secure Boot: OVMF's build with it (SMM required), variables with Microsoft's keys enrolled and SB on
OVMF_SB_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_SB_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
SCRIPT = "hook.ipxe"
#: Smee's MAC for the machine in tests and `doit boot --netboot` (a locally administered address).
MAC = "52:54:00:aa:bb:01"
#: What Smee puts between the kernel and initrd= (its HookScript), with this machine's values.
SMEE_PARAMETERS = ("facility={facility} syslog_host={syslog_host} grpc_authority={grpc_authority} "
                   "tinkerbell_tls={tls} tinkerbell_insecure_tls=false worker_id={worker_id} hw_addr={mac} "
                   "modules=loop,squashfs,sd-mod,usb-storage intel_iommu=on iommu=pt")
#: Smee's consoles: the serial one (ttyS1, a BMC's serial-over-LAN) last, so /dev/console is it.
SMEE_CONSOLES = "console=tty0 console=ttyS1,115200"


def smee_script(*, arch: Arch, base_url: str, mac: str = MAC, worker_id: str = "", vlan_id: str = "",
                facility: str = "onprem", syslog_host: str = "", grpc_authority: str = "", tls: bool = False,
                extra: str = "") -> str:
    """The iPXE script Smee serves for Hook (smee/internal/ipxe/script/hook.go), parameter for parameter."""
    params = SMEE_PARAMETERS.format(facility=facility, syslog_host=syslog_host or HTTP_IP,
                                    grpc_authority=grpc_authority or f"{HTTP_IP}:42113",
                                    tls=str(tls).lower(), worker_id=worker_id or mac, mac=mac)
    vlan = f"vlan_id={vlan_id} " if vlan_id else ""
    kernel = f"vmlinuz-{arch}"
    initrd = f"initramfs-{arch}"
    return ("#!ipxe\n"
            "echo Hook: loading the kernel and the initramfs over HTTP (Smee's script)\n"
            f"kernel {base_url}/{kernel} {vlan}{params} initrd={initrd} {SMEE_CONSOLES} {extra}".rstrip() + "\n"
            f"initrd {base_url}/{initrd}\n"
            "boot\n")


# --- the HTTP server ----------------------------------------------------------------------------


@dataclass
class Transfer:
    path: str
    status: int
    size: int
    seconds: float


class _Handler(http.server.SimpleHTTPRequestHandler):
    """A static file server that notes each transfer (size, time) and logs nothing on stderr."""

    transfers: list[Transfer]

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        started = time.monotonic()
        super().do_GET()
        size = int(self.headers.get("Content-Length", 0) or 0)
        target = Path(self.translate_path(self.path))
        if target.is_file():
            size = target.stat().st_size
        self.server.transfers.append(  # type: ignore[attr-defined]
            Transfer(self.path, 200 if target.is_file() else 404, size, time.monotonic() - started))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        return


@dataclass
class HttpServer:
    """A static HTTP server on 127.0.0.1 for one folder (the build's boot files, and what tests add)."""

    folder: Path
    port: int = 0
    transfers: list[Transfer] = field(default_factory=list)
    _httpd: http.server.ThreadingHTTPServer | None = None

    def start(self) -> HttpServer:
        handler = functools.partial(_Handler, directory=str(self.folder))
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.transfers = self.transfers  # type: ignore[attr-defined]
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="http",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def transfer(self, name: str) -> Transfer | None:
        """The last complete GET of /name."""
        done = [t for t in self.transfers if t.path.lstrip("/") == name and t.status == 200]
        return done[-1] if done else None


# --- the machine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    """A raw disk image on one of a server's storage controllers, with a serial number."""

    path: Path
    serial: str
    bus: str = "ahci"  # ahci (q35's SATA), nvme, megaraid (QEMU's megasas-gen2), virtio
    #: QEMU drive options added (e.g. "werror=report,rerror=report" with a blkdebug file)
    driver: str = "raw"
    blkdebug: Path | None = None


def disk_args(disks: Sequence[Disk]) -> list[str]:
    """QEMU arguments for the disks: one controller per kind, the serial numbers udev names them by."""
    argv: list[str] = []
    megaraid = False
    for index, disk in enumerate(disks):
        drive = f"d{index}"
        if disk.blkdebug is not None:  # a disk that fails writes: QEMU's blkdebug rules under the raw format
            argv += ["-blockdev", f"driver=raw,node-name={drive},file.driver=blkdebug,file.config={disk.blkdebug},"
                                  f"file.image.driver=file,file.image.filename={disk.path}"]
        else:
            argv += ["-drive", f"file={disk.path},if=none,id={drive},format={disk.driver}"]
        fail = ",werror=report,rerror=report" if disk.blkdebug is not None else ""
        if disk.bus == "ahci":
            argv += ["-device", f"ide-hd,drive={drive},bus=ide.{index % 6},serial={disk.serial}{fail}"]
        elif disk.bus == "nvme":
            argv += ["-device", f"nvme,drive={drive},serial={disk.serial}"]
        elif disk.bus == "megaraid":
            if not megaraid:
                argv += ["-device", "megasas-gen2,id=raid0"]
                megaraid = True
            argv += ["-device", f"scsi-hd,drive={drive},bus=raid0.0,serial={disk.serial}{fail}"]
        elif disk.bus == "virtio":
            argv += ["-device", f"virtio-blk-pci,drive={drive},serial={disk.serial}{fail}"]
        else:
            raise HookError(f"unknown disk bus {disk.bus!r}: ahci, nvme, megaraid or virtio")
    return argv


def firmware_args(*, uefi: bool, vars_copy: Path, secure_boot: bool = False,
                  variables: Path | None = None) -> list[str]:
    """q35, and under UEFI OVMF's code and a copy of its variables (the firmware writes them).
    secure_boot: OVMF's Secure Boot build with Microsoft's keys enrolled (SMM on: TCG only here).
    variables: the variable store to start from instead (e.g. with a certificate of yours in db)."""
    if not uefi:
        return ["-machine", "q35"]
    code, default = (OVMF_SB_CODE, OVMF_SB_VARS) if secure_boot else (OVMF_CODE, OVMF_VARS)
    variables = variables or default
    machine = ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"] \
        if secure_boot else ["-machine", "q35"]
    return [*machine, *qemu.pflash_args(code, variables, vars_copy, package="ovmf")]


def netboot_nic(*, tftp: Path, http_port: int, registry_port: int | None = None, mac: str = MAC,
                pcap: Path | None = None) -> qemu.Nic:
    """The server's e1000e with iPXE, restricted user net: TFTP for the script, the HTTP server at
    HTTP_IP:80 and (given) a registry at 10.0.2.100:5000, both on the host's 127.0.0.1."""
    if not IPXE_ROM.is_file():
        raise HookError(f"no iPXE ROM at {IPXE_ROM}: install Debian's ipxe-qemu package")
    forwards = [qemu.Forward(80, http_port, guest_ip=HTTP_IP)]
    if registry_port is not None:
        forwards.append(qemu.Forward(5000, registry_port))
    return qemu.Nic(forwards=tuple(forwards), mac=mac, model="e1000e", tftp=tftp, bootfile=SCRIPT,
                    romfile=str(IPXE_ROM), bootindex=1, pcap=pcap)


def write_script(tftp: Path, script: str) -> Path:
    tftp.mkdir(parents=True, exist_ok=True)
    path = tftp / SCRIPT
    path.write_text(script)
    return path
