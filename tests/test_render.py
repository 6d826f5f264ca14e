"""hook.yaml and debug.yaml render to configs LinuxKit v1.8.2's schema accepts; bad ones name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.errors import HookError
from tasks.hookos import config as linuxkit

ROOT = Path(__file__).resolve().parent.parent
VALUES = {"serial": "ttyS0", "kernel": "linuxkit/kernel:6.6.71", "pkg_org": "linuxkit",
          "hook_docker": "quay.io/tinkerbell/hook-docker:abc", "hook_bootkit": "quay.io/tinkerbell/hook-bootkit:abc",
          "hook_events": "quay.io/tinkerbell/hook-events:abc"}


@pytest.mark.parametrize("name", ["hook.yaml", "debug.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    text = linuxkit.render(ROOT / "linuxkit" / name, VALUES)
    config = linuxkit.parse(text, name)
    assert not any("${" + key + "}" in text for key in VALUES)
    assert config["services"]


def test_hook_yaml_runs_our_images_with_what_they_need() -> None:
    config = linuxkit.parse(linuxkit.render(ROOT / "linuxkit" / "hook.yaml", VALUES), "hook.yaml")
    services = {s["name"]: s for s in config["services"]}
    assert services["hook-docker"]["image"] == VALUES["hook_docker"]
    assert services["hook-bootkit"]["image"] == VALUES["hook_bootkit"]
    docker, bootkit = services["hook-docker"], services["hook-bootkit"]
    # what docs/programs.md says each program needs
    assert (docker["net"], docker["pid"], docker["capabilities"]) == ("host", "host", ["all"])
    # hook-docker sets the network up (ipam=, vlan_id=, interface=, else DHCP): no dhcpcd anywhere,
    # and the host's UTS namespace for ipam='s host name
    assert docker["uts"] == "host"
    # every block and char device (disks, loop, device-mapper, the console its lines go to), as upstream
    assert docker["devices"] == [{"path": "all", "type": "b"}, {"path": "all", "type": "c"}]
    assert "/:/host_root" in docker["binds"]  # bootkit binds /host_root/run into tink-worker
    assert not [e["name"] for e in config["onboot"] + config["services"] if "dhcp" in e["name"] + e["image"]]
    assert any(m["type"] == "cgroup" and "rw" in m["options"] for m in docker["mounts"])
    for bind in ("/dev:/dev", "/lib/modules:/lib/modules", "/etc/resolv.conf:/etc/resolv.conf",
                 "/var/run/docker:/var/run", "/var/lib/docker:/var/lib/docker", "/var/run/worker:/worker"):
        assert bind in docker["binds"]
    # LinuxKit's root is read-only: /etc/docker (daemon.json, certs.d) lives in hook-docker's own
    # writable rootfs, never a bind or a runtime.mkdir of the host's /etc.
    assert not any(b.split(":")[0].startswith("/etc/docker") for b in docker["binds"])
    assert not any(d.startswith("/etc") for d in docker["runtime"]["mkdir"])
    assert bootkit["net"] == "host"
    # the same socket folder, and the console for its warnings and milestones; nothing more
    assert bootkit["binds"] == ["/var/run/docker:/var/run", "/dev/console:/dev/console"]
    assert "/dev/console:/dev/console" in docker["binds"]
    assert "env" not in bootkit and "env" not in docker  # LinuxKit's env: would replace the images' PATH
    assert "capabilities" not in bootkit
    assert all(ref.startswith("linuxkit/") or ref.startswith("quay.io/") for ref in linuxkit.images_of(config))
    # udev: the coldplug onboot, then the service, both with the host's /run (the database)
    onboot = {e["name"]: e for e in config["onboot"]}
    assert onboot["udev"]["image"] == services["udevd"]["image"] == VALUES["hook_events"]
    assert "/run:/run" in onboot["udev"]["binds"] and "/run:/run" in services["udevd"]["binds"]
    assert [e["name"] for e in config["onboot"]].index("udev") > [e["name"] for e in config["onboot"]].index("modprobe")
    assert "cdc_ncm" in onboot["modprobe"]["command"]
    assert services["acpid"]["pid"] == "host"  # its handler signals the OS's init


def test_yaml_12_booleans_stay_strings() -> None:
    data = linuxkit.Yaml12Loader("a: on\nb: yes\nc: true\n").get_single_data()
    assert data == {"a": "on", "b": "yes", "c": True}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hook.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    text = linuxkit.render(ROOT / "linuxkit" / "hook.yaml", VALUES).replace("    net: host\n    pid: host",
                                                                            "    nett: host\n    pid: host")
    with pytest.raises(HookError) as err:
        linuxkit.parse(text, "linuxkit/hook.yaml")
    assert "linuxkit/hook.yaml: services[5]:" in str(err.value)  # hook-docker, after getty, rngd, ntpd, udevd, acpid
    assert "'nett' was unexpected" in str(err.value)


def test_unquoted_mode_is_refused() -> None:
    text = 'files:\n  - path: etc/x\n    contents: "x"\n    mode: 0644\n'
    with pytest.raises(HookError, match=r"files\[0\]\.mode: 420 is not of type 'string'"):
        linuxkit.parse(text, "hook.yaml")


def test_malformed_yaml_names_line_and_column() -> None:
    with pytest.raises(HookError, match=r"^hook.yaml:4:9: malformed YAML: expected ',' or ']'"):
        linuxkit.parse("kernel:\n  image: x\n  cmdline: [a\nservices: []\n", "hook.yaml")


def test_unknown_placeholder_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "kernel:\n  image: ${kernal}\n")
    with pytest.raises(HookError, match=r"hook.yaml:2: unknown placeholder \$\{kernal\}"):
        linuxkit.render(path, VALUES)


def test_ssh_keys_refused_when_none(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="no ssh public key found"):
        linuxkit.ssh_public_keys([str(tmp_path / "*.pub")])
    (tmp_path / "id.pub").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(HookError, match="is not an ssh public key"):
        linuxkit.ssh_public_keys([str(tmp_path / "*.pub")])
    (tmp_path / "id.pub").write_text("ssh-ed25519 AAAAC3 me@host\n\n")
    assert linuxkit.ssh_public_keys([str(tmp_path / "*.pub")]) == "ssh-ed25519 AAAAC3 me@host\n"


def test_embedded_images_folder_and_generated_config() -> None:
    """hook.yaml always has /usr/share/hook/embedded (hook-docker binds it read-only); the config
    tasks/hookos/embed.py generates for the archives passes LinuxKit's schema."""
    from tasks.hookos.embed import OS_DIR, embed_config

    config = linuxkit.parse(linuxkit.render(ROOT / "linuxkit" / "hook.yaml", VALUES), "hook.yaml")
    docker = next(s for s in config["services"] if s["name"] == "hook-docker")
    assert f"/{OS_DIR}:/{OS_DIR}:ro" in docker["binds"]
    assert {"path": OS_DIR, "directory": True, "mode": "0755"} in config["files"]
    generated = linuxkit.parse(embed_config([{"file": "embedded/00-a_b_1.tar"}]), "embed.yaml")
    assert generated == {"files": [{"path": f"{OS_DIR}/00-a_b_1.tar", "source": "embedded/00-a_b_1.tar",
                                    "mode": "0444"}]}
