"""The network set-up from the kernel cmdline (containers/common/hookcommon/network.py, run by
hook-docker before dockerd): ipam=, vlan_id= + hw_addr=, interface=, the DHCP default, and the
fallback rule for a bad value.

Three levels, all real:
- the values: parsing and validation of every key, on the host;
- hook-docker itself on the host, inside network namespaces made here (veth pairs, busybox
  `udhcpd` on the far side, busybox `ip` and `udhcpc` as in the image, a raw-socket capture),
  in a UTS namespace of its own (ipam= sets the host name), with a stand-in dockerd;
- the Hook OS in QEMU (TCG, user net with restrict=on): the NIC's traffic recorded with QEMU's
  filter-dump and read here from the pcap.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import programs_helpers  # noqa: F401 - first: puts containers/ on sys.path
import pytest
from hookcommon.cmdline import HookConfig
from hookcommon.network import (
    DHCP_SCRIPT,
    FALLBACK,
    Ipam,
    NetworkProblem,
    OnlyInterface,
    Vlan,
    asked_for,
    ipv4_address,
    lease_from,
    parse_event,
    parse_ipam,
    parse_mac,
    parse_netmask,
    parse_vlan_id,
    resolv_conf_text,
    then_text,
    vlan_name,
)
from programs_helpers import HOOK_DOCKER, program_env, wait_until

from tasks.boot import qemu
from tests.conftest import Registry
from tests.pipeline_env import Project
from tests.test_boot import (
    ARCH,
    BOOT_TIMEOUT,
    MARKER,
    MEMORY_MB,
    SMP,
    file_lines,
    in_service,
    packaged,
    report,
    service_logs,
    tinkerbell_cmdline,
)

BUSYBOX = Path("/bin/busybox")
#: iproute2's ip (netns); busybox's is put first on hook-docker's PATH, as in the image
HOST_IP = shutil.which("ip") or "/sbin/ip"
ROOT = Path(__file__).resolve().parent.parent


# --- pcap: QEMU's filter-dump and our raw-socket capture write classic pcap (Ethernet) ---------

@dataclass(frozen=True)
class Dhcp:
    """A DHCP message seen in a capture."""

    src_mac: str
    vlan: int | None
    kind: str  # DISCOVER, OFFER, REQUEST, ACK, ...
    from_client: bool


@dataclass(frozen=True)
class Frame:
    src_mac: str
    vlan: int | None
    ethertype: int
    payload: bytes


DHCP_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE",
              8: "INFORM"}


def read_pcap(path: Path) -> list[Frame]:
    """The Ethernet frames of a pcap file (either byte order); 802.1Q tags are read."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    order = "<" if magic == b"\xd4\xc3\xb2\xa1" else ">" if magic == b"\xa1\xb2\xc3\xd4" else None
    assert order, f"{path} is not a pcap file (magic {magic.hex()})"
    (linktype,) = struct.unpack(order + "I", data[20:24])
    assert linktype == 1, f"{path}: link type {linktype}, not Ethernet"
    frames: list[Frame] = []
    pos = 24
    while pos + 16 <= len(data):
        _, _, caplen, _ = struct.unpack(order + "IIII", data[pos:pos + 16])
        raw = data[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        if len(raw) < 14:
            continue
        src = raw[6:12].hex(":")
        (ethertype,) = struct.unpack("!H", raw[12:14])
        vlan = None
        body = raw[14:]
        if ethertype == 0x8100 and len(body) >= 4:
            tci, ethertype = struct.unpack("!HH", body[:4])
            vlan = tci & 0x0FFF
            body = body[4:]
        frames.append(Frame(src, vlan, ethertype, body))
    return frames


def udp_of(frame: Frame) -> tuple[str, str, int, int, bytes] | None:
    """(source IP, destination IP, source port, destination port, payload) of an IPv4 UDP frame."""
    body = frame.payload
    if frame.ethertype != 0x0800 or len(body) < 20 or body[9] != 17:
        return None
    ihl = (body[0] & 0x0F) * 4
    sport, dport = struct.unpack("!HH", body[ihl:ihl + 4])
    return (str(ipaddress.IPv4Address(body[12:16])), str(ipaddress.IPv4Address(body[16:20])), sport, dport,
            body[ihl + 8:])


def dhcp_messages(frames: list[Frame]) -> list[Dhcp]:
    """Every DHCP message (UDP 67/68) in the frames, tagged or not."""
    found = []
    for frame in frames:
        udp = udp_of(frame)
        if udp is None or not {udp[2], udp[3]} & {67, 68}:
            continue
        payload = udp[4]
        kind = "?"
        if len(payload) > 240 and payload[236:240] == b"\x63\x82\x53\x63":
            i = 240
            while i + 1 < len(payload) and payload[i] != 255:
                if payload[i] == 0:
                    i += 1
                    continue
                code, size = payload[i], payload[i + 1]
                if code == 53 and size >= 1:
                    kind = DHCP_TYPES.get(payload[i + 2], str(payload[i + 2]))
                i += 2 + size
        found.append(Dhcp(frame.src_mac, frame.vlan, kind, from_client=udp[3] == 67))
    return found


def summary(messages: list[Dhcp]) -> str:
    return ", ".join(f"{m.kind} from {m.src_mac}" + (f" vlan {m.vlan}" if m.vlan is not None else " untagged")
                     for m in messages) or "no DHCP"


# --- the values --------------------------------------------------------------------------------

SPEC_EXAMPLE = ("de-ad-be-ef-fe-ed:30:192.168.2.193:255.255.255.0:192.168.2.1:server.example.com:1.1.1.1,8.8.8.8:"
                "example.com,team.example.com:132.163.97.1,132.163.96.1")


def test_ipam_example_of_the_tinkerbell_spec() -> None:
    ipam = parse_ipam(SPEC_EXAMPLE)
    assert ipam == Ipam(
        mac="de:ad:be:ef:fe:ed", vlan=30, address=ipaddress.IPv4Interface("192.168.2.193/24"),
        gateway=ipaddress.IPv4Address("192.168.2.1"), hostname="server.example.com",
        dns=(ipaddress.IPv4Address("1.1.1.1"), ipaddress.IPv4Address("8.8.8.8")),
        search=("example.com", "team.example.com"),
        ntp=(ipaddress.IPv4Address("132.163.97.1"), ipaddress.IPv4Address("132.163.96.1")))


@pytest.mark.parametrize(("value", "expect"), [
    # Hook latest's own comment: no VLAN, no search domains
    ("de-ad-be-ef-fe-ed::192.168.2.193:255.255.255.0:192.168.2.1:myserver:1.1.1.1,8.8.8.8::132.163.97.1",
     {"vlan": None, "search": (), "hostname": "myserver"}),
    # only the required fields; fields missing at the end are empty; upper-case MAC; a prefix length
    ("52-54-00-AB-CD-EF::10.0.2.15:24:::10.0.2.3", {"mac": "52:54:00:ab:cd:ef", "gateway": None, "hostname": ""}),
    # empty list items are dropped, duplicates too; a gateway off the subnet is allowed (reached on the link)
    ("52-54-00-12-34-56:4094:10.0.2.15:/32:10.0.9.1::10.0.2.3,,10.0.2.3,:a.example,", {
        "vlan": 4094, "gateway": ipaddress.IPv4Address("10.0.9.1"), "dns": (ipaddress.IPv4Address("10.0.2.3"),),
        "search": ("a.example",)}),
])
def test_ipam_forms(value: str, expect: dict) -> None:
    ipam = parse_ipam(value)
    for name, want in expect.items():
        assert getattr(ipam, name) == want, name


@pytest.mark.parametrize(("value", "line"), [
    ("zz-54-00-12-34-56::10.0.2.15:24::h:10.0.2.3",
     "ipam= MAC address (field 1) 'zz-54-00-12-34-56' is not 6 hex pairs joined by '-': write it like "
     "52-54-00-12-34-56"),
    ("52:54:00:12:34:56::10.0.2.15:24::h:10.0.2.3", "has 12 ':'-separated fields, at most 9 are read"),
    ("01-00-5e-00-00-01::10.0.2.15:24::h:10.0.2.3", "is not a NIC's address (all zero or multicast)"),
    ("52-54-00-12-34-56:4095:10.0.2.15:24::h:10.0.2.3",
     "ipam= VLAN id (field 2) '4095' is not a number from 1 to 4094"),
    ("52-54-00-12-34-56:0:10.0.2.15:24::h:10.0.2.3", "VLAN id (field 2) '0' is not a number from 1 to 4094"),
    ("52-54-00-12-34-56:x:10.0.2.15:24::h:10.0.2.3", "VLAN id (field 2) 'x' is not a number"),
    ("52-54-00-12-34-56::10.0.2.256:24::h:10.0.2.3",
     "ipam= IP address (field 3) '10.0.2.256' is not an IPv4 address: write it as four numbers 0-255"),
    ("52-54-00-12-34-56::10.0.2.0:24::h:10.0.2.3", "is the network or broadcast address of 10.0.2.0/24"),
    ("52-54-00-12-34-56::127.0.0.5:8::h:10.0.2.3", "cannot be a host's address"),
    ("52-54-00-12-34-56::10.0.2.15:255.0.255.0::h:10.0.2.3",
     "ipam= netmask (field 4) '255.0.255.0' is not a netmask: write it like 255.255.255.0"),
    ("52-54-00-12-34-56::10.0.2.15:33::h:10.0.2.3", "netmask (field 4) '33' is not a netmask"),
    ("52-54-00-12-34-56::10.0.2.15:0.0.0.255::h:10.0.2.3", "netmask (field 4) '0.0.0.255' is not a netmask"),
    ("52-54-00-12-34-56::10.0.2.15:24:10.0.2.x:h:10.0.2.3", "ipam= gateway (field 5) '10.0.2.x' is not an IPv4"),
    ("52-54-00-12-34-56::10.0.2.15:24:10.0.2.15:h:10.0.2.3", "gateway (field 5) '10.0.2.15' cannot be the gateway"),
    ("52-54-00-12-34-56::10.0.2.15:24::bad_name:10.0.2.3", "hostname (field 6) 'bad_name' is not a host name"),
    ("52-54-00-12-34-56::10.0.2.15:24::" + "a" * 65 + ":10.0.2.3", "at most 64 characters"),
    ("52-54-00-12-34-56::10.0.2.15:24::h:10.0.2.3,dns.example",
     "ipam= DNS server (field 7) 'dns.example' is not an IPv4 address"),
    ("52-54-00-12-34-56::10.0.2.15:24::h", "ipam= DNS servers (field 7) is empty: it is required"),
    ("52-54-00-12-34-56::10.0.2.15:24::h:,", "DNS servers (field 7) has no address: at least one is required"),
    ("52-54-00-12-34-56::10.0.2.15:24::h:10.0.2.3:bad..domain", "search domain (field 8) 'bad..domain'"),
    ("52-54-00-12-34-56::10.0.2.15:24::h:10.0.2.3::pool.ntp.org", "NTP server (field 9) 'pool.ntp.org'"),
    ("::10.0.2.15:24::h:10.0.2.3", "ipam= MAC address (field 1) is empty: it is required (ipam=<mac>:<vlan-id>:"),
    ("52-54-00-12-34-56:::24::h:10.0.2.3", "IP address (field 3) is empty"),
    ("52-54-00-12-34-56::10.0.2.15:::h:10.0.2.3", "netmask (field 4) is empty"),
])
def test_malformed_ipam_is_one_clear_line(value: str, line: str) -> None:
    with pytest.raises(NetworkProblem) as err:
        parse_ipam(value)
    text = err.value.line(FALLBACK)
    assert line in text
    assert "\n" not in text and text.startswith("ipam= ")
    assert text.endswith("; falling back to DHCP on every interface whose name starts with 'e'")


def test_mac_vlan_netmask_values() -> None:
    assert parse_mac("52:54:00:AB:cd:ef", key="hw_addr") == "52:54:00:ab:cd:ef"
    assert parse_mac("52-54-00-ab-cd-ef", key="hw_addr") == "52:54:00:ab:cd:ef"
    for bad in ("52:54:00-ab-cd-ef", "52:54:00:ab:cd", "52:54:00:ab:cd:ef:01", "5254.00ab.cdef", ""):
        with pytest.raises(NetworkProblem, match="is not 6 hex pairs joined by '-' or ':'"):
            parse_mac(bad, key="hw_addr")
    assert [parse_vlan_id(v, key="vlan_id") for v in ("1", "100", "4094")] == [1, 100, 4094]
    for bad in ("0", "4095", "-1", "1e3", "\u0663", " 5", "100000"):
        with pytest.raises(NetworkProblem, match="is not a number from 1 to 4094"):
            parse_vlan_id(bad, key="vlan_id")
    assert [parse_netmask(m, key="ipam") for m in ("255.255.255.0", "255.255.255.255", "128.0.0.0", "24", "/16")] \
        == [24, 32, 1, 24, 16]
    for bad in ("0", "0.0.0.0", "255.255.255.1", "24.0", "255.255.255.0/24"):
        with pytest.raises(NetworkProblem, match="is not a netmask"):
            parse_netmask(bad, key="ipam")


def test_keys_are_tried_in_order_and_bad_ones_say_what_comes_next() -> None:
    cfg = HookConfig.from_text("interface=eth1 vlan_id=4095 hw_addr=52:54:00:12:34:56 "
                               "ipam=52-54-00-12-34-56::10.0.2.15:24::h:10.0.2.3")
    asked = asked_for(cfg)
    assert [a.key for a in asked] == ["ipam", "vlan_id", "interface"]
    assert isinstance(asked[0].plan, Ipam) and asked[2].plan == OnlyInterface("eth1")
    assert asked[1].problem is not None
    assert asked[1].problem.line(then_text(asked[2:])) == (
        "vlan_id= VLAN id '4095' is not a number from 1 to 4094: use the VLAN's id (0 and 4095 are reserved by "
        "802.1Q); trying interface= instead")
    # hw_addr= is read with vlan_id=; vlan_id= alone names no NIC (Hook latest since 2025: no eth0 guess)
    alone = asked_for(HookConfig.from_text("vlan_id=7"))[0]
    assert alone.plan is None and str(alone.problem) == ("vlan_id= 7 names no NIC: hw_addr= is not given: give "
                                                         "hw_addr=<the NIC's MAC> too (Smee's iPXE script gives both)")
    assert asked_for(HookConfig.from_text("vlan_id=7 hw_addr=52:54:00:12:34:56"))[0].plan == \
        Vlan(7, "52:54:00:12:34:56")
    bad_hw = asked_for(HookConfig.from_text("vlan_id=7 hw_addr=52:54:00:12:34"))[0].problem
    assert bad_hw is not None and bad_hw.line(FALLBACK).startswith("hw_addr= MAC address '52:54:00:12:34' is not 6")
    bad_if = asked_for(HookConfig.from_text('"interface=eth 1"'))[0].problem
    assert bad_if is not None and "interface name 'eth 1' is not one the kernel allows" in bad_if.line(FALLBACK)
    assert asked_for(HookConfig.from_text("interface=abcdefghijklmnop"))[0].problem is not None  # 16 > 15
    # empty values (and bare flags) count as not given; hw_addr= alone plans nothing
    assert asked_for(HookConfig.from_text("ipam= vlan_id= interface hw_addr=52:54:00:12:34:56")) == []


def test_resolv_conf_lease_and_names() -> None:
    assert resolv_conf_text("ipam=", ["10.0.2.3", "1.1.1.1", "10.0.2.3"], ["a.example", "b.example"]) == (
        "# written by hook-docker: ipam=\nsearch a.example b.example\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n")
    assert resolv_conf_text("DHCP on eth0", [], []) == "# written by hook-docker: DHCP on eth0\n"
    assert vlan_name("eth0", 100) == "eth0.100"
    assert vlan_name("enp129s0f0np0", 4094) == "vlan4094"  # enp129s0f0np0.4094 is longer than 15
    lease = lease_from({"ip": "10.9.0.50", "mask": "24", "router": "10.9.0.1 10.9.0.2", "dns": "10.9.0.53 x",
                        "domain": "lab.example", "mtu": "1400", "serverid": "10.9.0.1", "lease": "3600"})
    assert lease.address == ipaddress.IPv4Interface("10.9.0.50/24")
    assert lease.routers[0] == ipaddress.IPv4Address("10.9.0.1") and lease.dns == ("10.9.0.53",)
    assert (lease.search, lease.mtu) == (("lab.example",), 1400)
    with pytest.raises(ValueError):
        lease_from({"ip": "", "mask": ""})


def test_ipv4_address_is_asked_of_the_kernel() -> None:
    assert ipv4_address("lo") == ["127.0.0.1/8"]
    assert ipv4_address("no-such-if0") == []


def test_udhcpc_event_script_reports_each_variable() -> None:
    """The script as udhcpc runs it: an executable sh script, its event as argument, variables in env."""
    assert os.access(DHCP_SCRIPT, os.X_OK), f"{DHCP_SCRIPT} must be executable (git mode 100755)"
    env = {"PATH": "/usr/bin:/bin", "interface": "eth0", "ip": "10.9.0.50", "mask": "24", "router": "10.9.0.1",
           "dns": "10.9.0.53 10.9.0.54", "domain": "lab.example", "mtu": "1400", "serverid": "10.9.0.1",
           "lease": "3600"}
    out = subprocess.run([str(DHCP_SCRIPT), "bound"], env=env, capture_output=True, text=True, check=True).stdout
    event = parse_event(out)
    assert event is not None and event[0] == "bound"
    assert event[1]["dns"] == "10.9.0.53 10.9.0.54" and event[1]["interface"] == "eth0"
    assert parse_event("udhcpc: sending discover\n") is None


# --- hook-docker on the host, in network namespaces of its own --------------------------------------

_names = itertools.count()
STAND_IN_DOCKERD = "#!/bin/sh\necho \"STAND-IN-DOCKERD started $*\"\nexec sleep 600\n"
CAPTURE = r"""
import signal, socket, struct, sys, time
out, ifname = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
f = open(out, "wb", buffering=0)
f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("capturing", flush=True)
while True:
    data = s.recv(65535)
    t = time.time()
    f.write(struct.pack("<IIII", int(t), int(t % 1 * 1e6), len(data), len(data)) + data)
"""


def sh(*argv: str, ns: str | None = None, check: bool = True) -> str:
    cmd = ([HOST_IP, "netns", "exec", ns] if ns else []) + list(argv)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


class Lab:
    """Network namespaces: `host` (where hook-docker runs) and `far` (DHCP servers, captures)."""

    def __init__(self, tmp: Path) -> None:
        n = next(_names)
        self.tmp = tmp
        self.host = f"hooktest-net-{os.getpid()}-{n}h"
        self.far = f"hooktest-net-{os.getpid()}-{n}f"
        self.procs: list[subprocess.Popen[bytes]] = []
        for ns in (self.host, self.far):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for applet in ("ip", "udhcpc", "modprobe"):  # busybox's, as in the image
            (self.bin / applet).symlink_to(BUSYBOX)
        self.dockerd = tmp / "dockerd"
        self.dockerd.write_text(STAND_IN_DOCKERD)
        self.dockerd.chmod(0o755)

    def link(self, name: str, far: str, *, mac: str | None = None) -> None:
        """A veth: `name` in the host namespace, `far` (up) in the far one."""
        sh("ip", "link", "add", name, "netns", self.host, *(["address", mac] if mac else []), "type", "veth",
           "peer", "name", far, "netns", self.far)
        sh("ip", "link", "set", far, "up", ns=self.far)

    def dhcp_server(self, far: str, subnet: str, *, dns: str = "", extra: str = "") -> None:
        """busybox udhcpd on `far` serving <subnet>.50-.60, router <subnet>.1."""
        sh("ip", "addr", "add", f"{subnet}.1/24", "dev", far, ns=self.far)
        conf = self.tmp / f"udhcpd-{far}.conf"
        leases = self.tmp / f"udhcpd-{far}.leases"
        leases.touch()
        conf.write_text(f"start {subnet}.50\nend {subnet}.60\ninterface {far}\nlease_file {leases}\n"
                        f"pidfile {self.tmp / f'udhcpd-{far}.pid'}\nopt subnet 255.255.255.0\n"
                        f"opt router {subnet}.1\nopt lease 3600\n" + (f"opt dns {dns}\n" if dns else "") + extra)
        self.spawn(["ip", "netns", "exec", self.far, str(BUSYBOX), "udhcpd", "-f", str(conf)],
                   self.tmp / f"udhcpd-{far}.log")

    def ntp_server(self, address: str) -> None:
        """chrony on the far side at `address`: a real NTP server (its own clock, stratum 8; -x: it
        never sets the machine's clock)."""
        if not shutil.which("chronyd"):
            pytest.fail("no chronyd: run hack/setup-test-machine.sh (Debian's chrony)")
        conf = self.tmp / "chrony.conf"
        conf.write_text(f"local stratum 8\nallow all\nbindaddress {address}\ncmdport 0\n"
                        f"driftfile {self.tmp / 'chrony.drift'}\npidfile {self.tmp / 'chronyd.pid'}\n")
        self.spawn(["ip", "netns", "exec", self.far, "chronyd", "-d", "-x", "-f", str(conf)], self.tmp / "chrony.log")

    def capture(self, far: str) -> Path:
        out = self.tmp / f"{far}.pcap"
        proc = self.spawn(["ip", "netns", "exec", self.far, sys.executable, "-c", CAPTURE, str(out), far],
                          self.tmp / f"capture-{far}.log")
        wait_until(lambda: "capturing" in (self.tmp / f"capture-{far}.log").read_text() or proc.poll() is not None,
                   what="the capture")
        assert proc.poll() is None, (self.tmp / f"capture-{far}.log").read_text()
        return out

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        for ns in (self.host, self.far):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0 or not shutil.which("ip") or not BUSYBOX.is_file():
        pytest.fail("the network tests need root, iproute2 and /bin/busybox (hack/setup-test-machine.sh)")
    made = Lab(tmp_path)
    try:
        yield made
    finally:
        made.close()


class HookDockerInNs:
    """hook-docker run in the lab's host namespace and a UTS namespace of its own, with the image's
    busybox `ip`/`udhcpc` first on PATH, a stand-in dockerd, and its console written to a file."""

    def __init__(self, lab: Lab, cmdline: str, *args: str) -> None:
        self.lab = lab
        tmp = lab.tmp
        self.console = tmp / "console"
        self.console.touch()
        self.resolv = tmp / "resolv.conf"
        self.resolv.write_text("# before\n")
        (tmp / "cmdline").write_text(cmdline + "\n")
        self.log = tmp / "hook-docker.log"
        env = program_env(PATH=f"{lab.bin}:{os.environ['PATH']}", HOOK_CONSOLE=str(self.console))
        argv = [HOST_IP, "netns", "exec", lab.host, "unshare", "--uts", sys.executable, str(HOOK_DOCKER),
                "--cmdline-file", str(tmp / "cmdline"), "--config-dir", str(tmp / "etc-docker"),
                "--certs-dir", str(tmp / "certs.d"), "--worker-dir", str(tmp / "worker"), "--dockerd", str(lab.dockerd),
                "--resolv-conf", str(self.resolv), "--backoff-initial", "0.2",
                "--backoff-max", "1", "--network-wait", "20", "--link-wait", "2", *args]
        self.proc = lab.spawn(argv, self.log, env=env)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str | re.Pattern[str], *, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output
            if (text.search(out) if isinstance(text, re.Pattern) else text in out):
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in hook-docker's output (exit {self.proc.poll()}):\n{self.output[-5000:]}")

    def hostname(self) -> str:
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-u", "hostname"], capture_output=True, text=True,
                              check=True).stdout.strip()

    def udhcpc_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"started udhcpc on \S+ \(pid (\d+)\)", self.output)]

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(30)
        assert "Traceback" not in self.output, self.output
        return code


def addresses(lab: Lab, name: str) -> list[str]:
    return re.findall(r"inet (\S+)", sh("ip", "-4", "addr", "show", "dev", name, ns=lab.host))


def before(text: str, first: str, second: str) -> bool:
    return first in text and second in text and text.index(first) < text.index(second)


def test_default_dhcp_on_every_e_interface(lab: Lab) -> None:
    """No network key: udhcpc on each e* interface without an address; the lease's address, default
    route, MTU and DNS (two servers, the domain as search) applied; dockerd only after the lease."""
    lab.link("eth0", "far0")
    lab.link("eth7", "far7")   # already addressed by someone else: left alone
    sh("ip", "addr", "add", "10.77.0.2/24", "dev", "eth7", ns=lab.host)
    lab.link("xnet0", "farx")  # not an "e" name: left alone
    lab.dhcp_server("far0", "10.9.0", dns="10.9.0.53 10.9.0.54", extra="opt domain lab.example\nopt mtu 1400\n")
    quiet = [lab.capture("far7"), lab.capture("farx")]
    seen = lab.capture("far0")
    hd = HookDockerInNs(lab, "console=ttyS0 docker_registry=10.9.0.1:5000")
    out = hd.wait_for("STAND-IN-DOCKERD started")
    assert before(out, "network: DHCP on eth0 (every interface whose name starts with 'e')", "eth0 leased")
    assert "network: eth7 already has 10.77.0.2/24: left alone (no DHCP there)" in out
    assert before(out, "hook-docker INFO network: eth0 leased 10.9.0.", "started dockerd"), out
    assert addresses(lab, "eth0")[0].startswith("10.9.0.") and addresses(lab, "eth0")[0].endswith("/24")
    assert re.search(r"default via 10\.9\.0\.1 dev eth0 +metric 10\d\d", sh("ip", "route", ns=lab.host))
    assert "mtu 1400" in sh("ip", "link", "show", "dev", "eth0", ns=lab.host)
    assert hd.resolv.read_text() == ("# written by hook-docker: DHCP on eth0\nsearch lab.example\n"
                                     "nameserver 10.9.0.53\nnameserver 10.9.0.54\n")
    console = hd.console.read_text()
    assert re.search(r"^hook-docker: INFO network: eth0 leased 10\.9\.0\.\d+/24 from 10\.9\.0\.1 \(router 10\.9\.0\.1, "
                     r"DNS 10\.9\.0\.53, 10\.9\.0\.54, 3600s\)$", console, re.M), console
    assert hd.stop() == 0
    assert [m.kind for m in dhcp_messages(read_pcap(seen)) if m.from_client][:2] == ["DISCOVER", "REQUEST"]
    for pcap in quiet:
        assert dhcp_messages(read_pcap(pcap)) == [], pcap.name
    for pid in hd.udhcpc_pids():  # stopped with hook-docker
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("shape", ["subnet /24, gateway on it", "/32, gateway off the subnet"])
def test_ipam_static_address_and_no_dhcp(lab: Lab, shape: str) -> None:
    """ipam=: the address, the default route, resolv.conf (every DNS server, the search list) and the
    host name, on the NIC with that MAC; not one DHCP packet, though a DHCP server answers there."""
    lab.link("eth0", "far0", mac="52:54:00:aa:bb:01")
    lab.link("eth1", "far1", mac="52:54:00:aa:bb:02")
    lab.dhcp_server("far1", "10.9.0", dns="10.9.0.53")
    pcap = lab.capture("far1")
    other = lab.capture("far0")
    mask = "255.255.255.0" if shape.startswith("subnet") else "255.255.255.255"
    value = f"52-54-00-AA-BB-02::10.9.0.15:{mask}:10.9.0.1:hook-static.lab.example:10.9.0.53,10.9.0.54:" \
            "lab.example,corp.example:10.9.0.123"
    hd = HookDockerInNs(lab, f"console=ttyS0 ipam={value}")
    out = hd.wait_for("STAND-IN-DOCKERD started")
    prefix = "24" if shape.startswith("subnet") else "32"
    line = (f"hook-docker: INFO network: ipam=: static 10.9.0.15/{prefix} on eth1 52:54:00:aa:bb:02, gateway "
            "10.9.0.1, DNS 10.9.0.53, 10.9.0.54, hostname hook-static.lab.example; no DHCP")
    assert line in hd.console.read_text()
    assert before(out, line.replace("hook-docker: ", "hook-docker ", 1), "started dockerd")
    assert addresses(lab, "eth1") == [f"10.9.0.15/{prefix}"] and addresses(lab, "eth0") == []
    routes = sh("ip", "route", ns=lab.host)
    assert re.search(r"^default via 10\.9\.0\.1 dev eth1", routes, re.M), routes
    if prefix == "32":
        assert re.search(r"^10\.9\.0\.1 dev eth1", routes, re.M), routes
    assert hd.resolv.read_text() == ("# written by hook-docker: ipam= (static, eth1)\nsearch lab.example "
                                     "corp.example\nnameserver 10.9.0.53\nnameserver 10.9.0.54\n")
    assert hd.hostname() == "hook-static.lab.example"
    # the address works: the far side answers a ping from it
    sh("ip", "netns", "exec", lab.host, str(BUSYBOX), "ping", "-c", "1", "-W", "3", "10.9.0.1")
    assert "udhcpc" not in out
    assert hd.stop() == 0
    assert dhcp_messages(read_pcap(pcap)) == [] and dhcp_messages(read_pcap(other)) == []
    assert any(f.src_mac == "52:54:00:aa:bb:02" and f.ethertype == 0x0800 for f in read_pcap(pcap))


def test_interface_dhcp_only_there(lab: Lab) -> None:
    lab.link("eth0", "far0")
    lab.link("eth1", "far1")
    lab.dhcp_server("far0", "10.8.0")
    lab.dhcp_server("far1", "10.9.0")
    pcaps = {"eth0": lab.capture("far0"), "eth1": lab.capture("far1")}
    hd = HookDockerInNs(lab, "interface=eth1")
    hd.wait_for("STAND-IN-DOCKERD started")
    assert "hook-docker: INFO network: interface=eth1: DHCP only on eth1 (" in hd.console.read_text()
    assert addresses(lab, "eth1")[0].startswith("10.9.0.") and addresses(lab, "eth0") == []
    assert hd.stop() == 0
    assert dhcp_messages(read_pcap(pcaps["eth0"])) == []
    assert {m.kind for m in dhcp_messages(read_pcap(pcaps["eth1"])) if m.from_client} >= {"DISCOVER", "REQUEST"}


def test_bad_values_each_one_line_then_the_dhcp_fallback(lab: Lab) -> None:
    """A malformed ipam= (bad MAC), a vlan_id= whose hw_addr= no NIC has, an interface= that does not
    exist: one line each (console and log), in order, each saying what comes next; then DHCP on e*."""
    lab.link("eth0", "far0", mac="52:54:00:aa:bb:01")
    lab.dhcp_server("far0", "10.9.0")
    hd = HookDockerInNs(lab, "ipam=52-54-00-aa-bb-zz::10.9.0.15:24::h:10.9.0.53 vlan_id=100 "
                             "hw_addr=52:54:00:00:00:99 interface=eth9")
    hd.wait_for("STAND-IN-DOCKERD started")
    lines = [line for line in hd.console.read_text().splitlines() if " ERROR " in line]
    assert lines == [
        "hook-docker: ERROR network: ipam= MAC address (field 1) '52-54-00-aa-bb-zz' is not 6 hex pairs joined by "
        "'-': write it like 52-54-00-12-34-56; trying vlan_id= instead",
        "hook-docker: ERROR network: hw_addr= MAC address '52:54:00:00:00:99' is on no interface after 2s (there are: "
        "eth0 52:54:00:aa:bb:01): give the MAC of one of this machine's NICs; trying interface= instead",
        "hook-docker: ERROR network: interface= 'eth9' does not exist after 2s (there are: eth0 "
        "52:54:00:aa:bb:01): name one of this machine's interfaces; " + FALLBACK,
    ]
    out = hd.output
    for line in lines:
        assert line.replace("hook-docker: ", "hook-docker ", 1) in out
    assert addresses(lab, "eth0")[0].startswith("10.9.0.")
    assert hd.stop() == 0


def test_dhcp_static_routes_host_name_ntp_and_the_clock(lab: Lab) -> None:
    """A lease with classless static routes (option 121: its default route, not the router option's),
    a host name and an NTP server; chrony answers there: the clock is set from it before dockerd."""
    lab.link("eth0", "far0")
    lab.dhcp_server("far0", "10.9.0", extra="opt staticroutes 10.99.0.0/16 10.9.0.254, 0.0.0.0/0 10.9.0.2\n"
                                             "opt ntpsrv 10.9.0.1\nopt hostname lab-machine-7\n")
    lab.ntp_server("10.9.0.1")
    hd = HookDockerInNs(lab, "console=ttyS0 docker_registry=10.9.0.1:5000")
    out = hd.wait_for("STAND-IN-DOCKERD started")
    routes = sh("ip", "route", ns=lab.host)
    assert re.search(r"^10\.99\.0\.0/16 via 10\.9\.0\.254 dev eth0", routes, re.M), routes
    assert re.search(r"^default via 10\.9\.0\.2 dev eth0", routes, re.M), routes  # option 121's, not 10.9.0.1
    assert "via 10.9.0.1" not in routes
    assert "classless static routes 10.99.0.0/16 via 10.9.0.254, 0.0.0.0/0 via 10.9.0.2" in out
    assert hd.hostname() == "lab-machine-7"
    clock = re.search(r"clock: set from 10\.9\.0\.1 \(stratum \d+, DHCP servers\)", out)
    assert clock and out.index(clock.group(0)) < out.index("STAND-IN-DOCKERD started"), out
    assert re.search(r"^hook-docker: INFO clock: set from 10\.9\.0\.1 .*: it was [+-]\d+\.\d+s off$",
                     hd.console.read_text(), re.M)
    assert hd.stop() == 0


def test_no_ntp_answer_is_one_line_and_dockerd_starts(lab: Lab) -> None:
    """NTP names a server that does not answer: one console line, the clock as it was, dockerd starts."""
    lab.link("eth0", "far0")
    lab.dhcp_server("far0", "10.9.0", extra="opt ntpsrv 10.9.0.77\n")
    hd = HookDockerInNs(lab, "console=ttyS0", "--ntp-timeout", "1")
    out = hd.wait_for("STAND-IN-DOCKERD started")
    assert before(out, "clock: no NTP answer (10.9.0.77 (10.9.0.77): no answer within 1s)", "STAND-IN-DOCKERD"), out
    assert "TLS fails if it is far off" in hd.console.read_text()
    assert hd.stop() == 0


def test_vlan_id_without_hw_addr_makes_no_vlan(lab: Lab) -> None:
    """vlan_id= alone: no VLAN on a guessed NIC (there is no eth0 to count on with udev's names): one
    line that says to give hw_addr= too, then DHCP on every e* NIC, untagged."""
    lab.link("eth0", "far0", mac="52:54:00:aa:bb:01")
    lab.dhcp_server("far0", "10.9.0")
    hd = HookDockerInNs(lab, "vlan_id=100")
    hd.wait_for("eth0 leased")
    console = hd.console.read_text()
    assert ("hook-docker: ERROR network: vlan_id= 100 names no NIC: hw_addr= is not given: give hw_addr=<the NIC's "
            "MAC> too (Smee's iPXE script gives both); " + FALLBACK) in console, console
    assert "eth0.100" not in sh("ip", "link", ns=lab.host)
    assert hd.stop() == 0


def test_ipam_mac_of_no_interface_and_vlan_without_kernel_support(lab: Lab) -> None:
    """Runtime failures fall back too: ipam= with a MAC no NIC has; vlan_id= on a kernel without
    802.1Q (this host's: the line says so; with 8021q the VLAN is made and DHCP runs on it)."""
    lab.link("eth0", "far0", mac="52:54:00:aa:bb:01")
    lab.dhcp_server("far0", "10.9.0")
    hd = HookDockerInNs(lab, "ipam=52-54-00-aa-bb-09::10.9.0.15:24::h:10.9.0.53 vlan_id=100 hw_addr=52:54:00:aa:bb:01")
    hd.wait_for("STAND-IN-DOCKERD started")
    console = hd.console.read_text()
    assert ("hook-docker: ERROR network: ipam= MAC address (field 1) '52-54-00-aa-bb-09' is on no interface after 2s "
            "(there are: eth0 52:54:00:aa:bb:01): give the MAC of one of this machine's NICs; trying vlan_id= "
            "instead") in console
    if Path("/proc/net/vlan").exists():  # pragma: no cover - a kernel with 802.1Q
        assert "network: vlan_id=100: DHCP only on eth0.100 (VLAN 100 on eth0 52:54:00:aa:bb:01)" in console
    else:
        vlan_line = ("hook-docker: ERROR network: vlan_id= VLAN 100 on eth0: cannot create eth0.100 (`ip link add link "
                     "eth0 name eth0.100 type vlan id 100` failed: ip: RTNETLINK answers: Operation not supported): "
                     "the kernel needs 802.1Q VLAN support (CONFIG_VLAN_8021Q, module 8021q); " + FALLBACK)
        assert vlan_line in console, console
        assert "eth0 leased 10.9.0." in hd.wait_for("eth0 leased")
        assert "eth0.100" not in sh("ip", "link", ns=lab.host)
    assert addresses(lab, "eth0") and not addresses(lab, "eth0")[0].startswith("10.9.0.15/")
    assert hd.stop() == 0


def test_dhcp_client_is_supervised_and_dockerd_does_not_wait_for_ever(lab: Lab) -> None:
    """No DHCP server at first: dockerd starts after --network-wait anyway; a killed udhcpc is
    restarted; a server that comes later gives the lease (the client never stopped asking)."""
    lab.link("eth0", "far0")
    hd = HookDockerInNs(lab, "", "--network-wait", "3")
    out = hd.wait_for("STAND-IN-DOCKERD started")
    assert before(out, "no DHCP lease on eth0 after 3s: going on without one; the DHCP client keeps asking",
                  "started dockerd")
    hd.wait_for("network: no DHCP answer on eth0 yet (round 1 of DISCOVERs); udhcpc keeps asking")
    first = hd.udhcpc_pids()[0]
    os.kill(first, signal.SIGKILL)
    hd.wait_for(re.compile(r"udhcpc on eth0 exited after \d+s \(signal 9\); restarting it in"))
    wait_until(lambda: len(hd.udhcpc_pids()) >= 2, what="a second udhcpc")
    lab.dhcp_server("far0", "10.9.0")
    hd.wait_for("eth0 leased 10.9.0.", timeout=40)
    # the console had the first "no answer" line only, then the lease
    console = hd.console.read_text()
    assert console.count("no DHCP answer on eth0 yet") == 1 and "eth0 leased 10.9.0." in console, console
    assert "Traceback" not in hd.output
    assert hd.stop() == 0
    assert not any(Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in hd.udhcpc_pids())


def test_no_dhcp_client_at_all_does_not_hold_dockerd(lab: Lab) -> None:
    """An image without udhcpc: the error line, retried, and dockerd starts without waiting 20 s."""
    lab.link("eth0", "far0")
    (lab.bin / "udhcpc").unlink()
    (lab.bin / "udhcpc").symlink_to(lab.tmp / "no-such-udhcpc")
    started = time.monotonic()
    hd = HookDockerInNs(lab, "")
    hd.wait_for("STAND-IN-DOCKERD started")
    assert time.monotonic() - started < 15
    assert ("hook-docker: ERROR network: the DHCP client cannot run (No such file or directory): going on without "
            "a lease") in hd.console.read_text()
    assert "network: cannot run the DHCP client (udhcpc): No such file or directory; retrying in" in hd.output
    assert hd.stop() == 0


def test_lost_lease_is_removed(lab: Lab) -> None:
    """udhcpc's deconfig (it is stopped with its lease lost, or restarted) takes the address away."""
    lab.link("eth0", "far0")
    lab.dhcp_server("far0", "10.9.0", dns="10.9.0.53")
    hd = HookDockerInNs(lab, "")
    hd.wait_for("eth0 leased 10.9.0.")
    assert addresses(lab, "eth0")
    os.kill(hd.udhcpc_pids()[-1], signal.SIGKILL)
    out = hd.wait_for(re.compile(r"started udhcpc on eth0 .*\n(.*\n)*.*lost its lease", re.S))
    assert "hook-docker: WARNING network: eth0 lost its lease of 10.9.0." in hd.console.read_text()
    hd.wait_for(re.compile(r"lost its lease.*\n(.*\n)*.*eth0 leased 10\.9\.0\.", re.S))
    assert "Traceback" not in out
    assert hd.stop() == 0


# --- the Hook OS in QEMU ----------------------------------------------------------------------------

NET_MILESTONES = (*qemu.HOOK_MILESTONES,
                  ("network set up (hook-docker)", r"hook-docker: \w+ network: (ipam=|vlan_id=|interface=|DHCP on)"),
                  ("address (lease or static)", r"network: (\S+ leased \d|ipam=: static)"))


@pytest.fixture(scope="module")
def boot_files(dev_project: Project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return packaged(dev_project, "dev", "hook", tmp_path_factory.mktemp("net-boot"))


#: udev's names of the boot tests' NICs: virtio-net in PCI slots 3 and 4 of QEMU's i440fx (the NICs are
#: the first devices after the machine's own), as a server's NICs get ens<slot> or eno<n> names
NIC0, NIC1 = "ens3", "ens4"


def net_guest(files: tuple[Path, Path], log: Path, cmdline: str, nics: list[qemu.Nic]) -> qemu.Guest:
    kernel, initrd = files
    return qemu.Guest(kernel, initrd, arch=ARCH, cmdline=cmdline, memory_mb=MEMORY_MB, accel="tcg", smp=SMP,
                      nics=nics, extra=["-device", "virtio-rng-pci"], log=log, milestone_patterns=NET_MILESTONES)


def registry_nic(registry: Registry, *, mac: str, pcap: Path) -> qemu.Nic:
    return qemu.Nic(forwards=(qemu.Forward(5000, registry.port),), mac=mac, pcap=pcap)


def lines_in(output: str, *expected: str) -> bool:
    """Each expected line is a whole line of output: other console writers (tink-worker's marker,
    the kernel) may put their lines between those of the command typed into the serial shell."""
    got = {line.strip() for line in output.replace("\r", "").splitlines()}
    return all(e in got for e in expected)


@pytest.mark.slow
def test_boot_ipam_static_no_dhcp(boot_files: tuple[Path, Path], worker_registry: Registry, tmp_path: Path) -> None:
    """ipam= with the NIC's MAC, 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3: no DHCP packet at all;
    tink-worker is pulled through the guestfwd registry and runs; everyone sees the address, the
    resolv.conf and the host name."""
    mac = "52:54:00:12:34:99"
    ipam = "52-54-00-12-34-99::10.0.2.15:255.255.255.0:10.0.2.2:hook-static.test:10.0.2.3,10.0.2.4:lab.test:"
    pcap = tmp_path / "eth0.pcap"
    with net_guest(boot_files, tmp_path / "console.log", tinkerbell_cmdline(extra=f"ipam={ipam}"),
                   [registry_nic(worker_registry, mac=mac, pcap=pcap)]) as g:
        g.wait_for(MARKER, timeout=BOOT_TIMEOUT)
        report(g, "ipam=")
        assert (f"hook-docker: INFO network: ipam=: static 10.0.2.15/24 on {NIC0} 52:54:00:12:34:99, gateway 10.0.2.2, "
                "DNS 10.0.2.3, 10.0.2.4, hostname hook-static.test; no DHCP") in g.console
        addr = g.sh(in_service("hook-docker", f"ip -4 addr show dev {NIC0}")).output
        assert "inet 10.0.2.15/24" in addr, addr
        assert re.search(rf"default via 10\.0\.2\.2 dev {NIC0}", g.sh(in_service("hook-docker", "ip route")).output)
        resolv = (f"# written by hook-docker: ipam= (static, {NIC0})", "search lab.test", "nameserver 10.0.2.3",
                  "nameserver 10.0.2.4")
        # the stand-in tink-worker is python-slim without coreutils: it answers in python
        in_worker = "docker exec tink-worker python3 -c"
        read_resolv = "'print(open(\"/etc/resolv.conf\").read())'"
        for where, command in (("hook-docker", in_service("hook-docker", "cat /etc/resolv.conf")),
                               ("the host (LinuxKit's /etc/resolv.conf symlink)", "cat /etc/resolv.conf"),
                               ("tink-worker", in_service("hook-docker", f"{in_worker} {read_resolv}"))):
            output = g.sh(command).output
            assert lines_in(output, *resolv), f"{where}: {output}"
        for command in ("hostname", in_service("hook-docker", "hostname"),
                        in_service("hook-docker", f"{in_worker} 'import socket; print(socket.gethostname())'")):
            output = g.sh(command).output
            assert lines_in(output, "hook-static.test"), f"{command}: {output}"
        # SIOCGIFADDR of the NIC, from inside tink-worker: it is on the host's network
        address = ("import fcntl, socket, struct; s = socket.socket(); print(socket.inet_ntoa(fcntl.ioctl(s.fileno(), "
                   f"0x8915, struct.pack(\"256s\", b\"{NIC0}\"))[20:24]))")
        worker = g.sh(in_service("hook-docker", f"{in_worker} '{address}'")).output
        assert lines_in(worker, "10.0.2.15"), worker
        ps = g.sh(in_service("hook-docker", "ps -o comm")).output
        assert "udhcpc" not in ps and "dhcpcd" not in ps, ps
        logs = file_lines(service_logs(g))
        assert before(logs, "network: ipam=: static 10.0.2.15/24", "started dockerd"), logs[-3000:]
    frames = read_pcap(pcap)
    assert dhcp_messages(frames) == [], summary(dhcp_messages(frames))
    # the guest's own IPv4 traffic (to the registry) comes from the static address
    assert any(f.src_mac == mac and f.ethertype == 0x0800 and f.payload[12:16] == bytes([10, 0, 2, 15])
               for f in frames)
    print(f"[ipam=] {len(frames)} frames on {NIC0}, {summary(dhcp_messages(frames))}")


@pytest.mark.slow
def test_boot_vlan_dhcp_tagged_only(boot_files: tuple[Path, Path], worker_registry: Registry, tmp_path: Path) -> None:
    """vlan_id=100 hw_addr=<the NIC's MAC>: <NIC>.100 is made, DHCP runs there only: the pcap has
    802.1Q frames with VLAN 100 carrying DHCP DISCOVERs and no untagged DHCP. QEMU's user net has no
    VLAN, so no lease comes: dockerd starts after the 30 s bound anyway."""
    mac = "52:54:00:12:34:98"
    pcap = tmp_path / "eth0.pcap"
    with net_guest(boot_files, tmp_path / "console.log", tinkerbell_cmdline(extra=f"vlan_id=100 hw_addr={mac}"),
                   [registry_nic(worker_registry, mac=mac, pcap=pcap)]) as g:
        g.wait_for(f"hook-docker: INFO network: vlan_id=100: DHCP only on {NIC0}.100 (VLAN 100 on {NIC0} {mac})",
                   timeout=BOOT_TIMEOUT)
        g.wait_for(f"hook-docker: WARNING network: no DHCP lease on {NIC0}.100 after 30s: going on without one",
                   timeout=90)
        vlan = g.sh("cat /proc/net/vlan/config").output
        assert re.search(rf"{NIC0}\.100\s*\|\s*100\s*\|\s*{NIC0}", vlan), vlan
        deadline = time.monotonic() + 120
        while "started dockerd" not in (logs := file_lines(g.sh("cat /var/log/hook-docker.log").output)):
            assert time.monotonic() < deadline, logs[-3000:]
            time.sleep(3)
        report(g, "vlan_id=")
        assert before(logs, f"no DHCP lease on {NIC0}.100 after 30s", "started dockerd"), logs[-3000:]
    messages = dhcp_messages(read_pcap(pcap))
    print(f"[vlan_id=] {summary(messages)}")
    assert messages and all(m.vlan == 100 and m.src_mac == mac for m in messages), summary(messages)
    assert "DISCOVER" in {m.kind for m in messages}


@pytest.mark.slow
def test_boot_interface_two_nics(boot_files: tuple[Path, Path], worker_registry: Registry, tmp_path: Path) -> None:
    """Two NICs, interface=<the second NIC's udev name>: DHCP on it only (one pcap per NIC); tink-worker
    runs through it."""
    macs = ("52:54:00:12:34:a0", "52:54:00:12:34:a1")
    pcaps = (tmp_path / "eth0.pcap", tmp_path / "eth1.pcap")
    nics = [qemu.Nic(mac=macs[0], pcap=pcaps[0]), registry_nic(worker_registry, mac=macs[1], pcap=pcaps[1])]
    with net_guest(boot_files, tmp_path / "console.log", tinkerbell_cmdline(extra=f"interface={NIC1}"), nics) as g:
        g.wait_for(MARKER, timeout=BOOT_TIMEOUT)
        report(g, "interface=")
        assert f"hook-docker: INFO network: interface={NIC1}: DHCP only on {NIC1} ({macs[1]})" in g.console
        assert re.search(rf"hook-docker: INFO network: {NIC1} leased 10\.0\.2\.15/24 from 10\.0\.2\.2", g.console)
    first, second = (dhcp_messages(read_pcap(p)) for p in pcaps)
    print(f"[interface=] {NIC0}: {summary(first)}; {NIC1}: {summary(second)}")
    assert first == []
    assert {m.kind for m in second if m.from_client} >= {"DISCOVER", "REQUEST"}
    assert all(m.vlan is None and (m.src_mac == macs[1] or not m.from_client) for m in second)


@pytest.mark.slow
def test_boot_bad_values_fall_back_to_dhcp(boot_files: tuple[Path, Path], worker_registry: Registry,
                                           tmp_path: Path) -> None:
    """A malformed ipam=, a vlan_id= whose hw_addr= no NIC has, an unknown interface=: one line each on
    the console and in hook-docker's log, then DHCP on every e* interface, and tink-worker runs."""
    mac = "52:54:00:12:34:97"
    extra = ("ipam=52-54-00-12-34-zz::10.0.2.15:255.255.255.0:10.0.2.2::10.0.2.3 vlan_id=100 "
             "hw_addr=52:54:00:00:00:01 interface=eth5")
    with net_guest(boot_files, tmp_path / "console.log", tinkerbell_cmdline(extra=extra),
                   [registry_nic(worker_registry, mac=mac, pcap=tmp_path / "eth0.pcap")]) as g:
        g.wait_for(MARKER, timeout=BOOT_TIMEOUT)
        report(g, "bad values")
        expected = [
            "hook-docker: ERROR network: ipam= MAC address (field 1) '52-54-00-12-34-zz' is not 6 hex pairs joined by "
            "'-': write it like 52-54-00-12-34-56; trying vlan_id= instead",
            "hook-docker: ERROR network: hw_addr= MAC address '52:54:00:00:00:01' is on no interface after 10s "
            f"(there are: {NIC0} {mac}): give the MAC of one of this machine's NICs; trying interface= instead",
            f"hook-docker: ERROR network: interface= 'eth5' does not exist after 10s (there are: {NIC0} {mac}): "
            f"name one of this machine's interfaces; {FALLBACK}",
        ]
        console = g.console.replace("\r", "")
        for line in expected:
            assert line in console, line
            print(f"[bad values] console: {line}")
        assert re.search(rf"hook-docker: INFO network: {NIC0} leased 10\.0\.2\.15/24", console)
        logs = service_logs(g)
        for line in expected:
            assert line.replace("hook-docker: ", "hook-docker ", 1) in logs
    messages = dhcp_messages(read_pcap(tmp_path / "eth0.pcap"))
    assert {m.kind for m in messages if m.from_client} >= {"DISCOVER", "REQUEST"}
    assert all(m.vlan is None for m in messages)
