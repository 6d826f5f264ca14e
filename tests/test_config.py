"""Settings: doit variable > HOOK_* environment > default, validated up front."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.settings import SETTINGS, load_settings


def settings(vars: dict[str, str] | None = None, env: dict[str, str] | None = None, root: Path | None = None):
    vars = vars or {}
    env = {"HOOK_VERSION": "v1", "SOURCE_DATE_EPOCH": "1700000000", **(env or {})}
    return load_settings(lambda name, default=None: vars.get(name, default), env, given=vars,
                         **({"root": root} if root else {}))


def test_defaults() -> None:
    s = settings()
    assert s.org == "quay.io/tinkerbell"
    assert s.arches is None
    assert s.compression == "gzip"
    assert s.kernel == ""  # ours: hook-kernel, built by the pipeline
    assert (s.kernel_flavour, s.kernel_suite, s.kernel_version) == ("debian", "bookworm", "")
    assert s.version == "v1" and s.source_date_epoch == 1700000000


def test_doit_variable_beats_environment() -> None:
    s = settings({"org": "ghcr.io/me"}, {"HOOK_ORG": "quay.io/other", "HOOK_ARCHES": "aarch64,amd64"})
    assert s.org == "ghcr.io/me"
    assert s.arches == (Arch.AARCH64, Arch.X86_64)


@pytest.mark.parametrize(
    ("vars", "message"),
    [
        ({"compression": "lz4"}, "compression='lz4' is not one of gzip, zstd"),
        ({"arches": "x86_64,sparc"}, "unknown arch 'sparc'"),
        ({"org": "Quay.io/Me"}, "setting org='Quay.io/Me' is not a registry/org"),
        ({"kernel": "linuxkit/kernel:6.6 71"}, "setting kernel="),
        ({"build_args": "NOVALUE"}, "'NOVALUE' is not KEY=VALUE"),
        ({"orgg": "x"}, "unknown setting 'orgg' (did you mean org?)"),
        ({"version": "1 2"}, "setting version='1 2' may hold only"),
        ({"source_date_epoch": "yesterday"}, "source_date_epoch='yesterday' is not a non-negative integer"),
        ({"build_ca": "/nonexistent/ca.pem"}, "build_ca='/nonexistent/ca.pem': no such file"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(vars: dict[str, str], message: str) -> None:
    with pytest.raises(HookError) as err:
        settings(vars)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_version_from_git(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True, env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                              "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                                              "GIT_COMMITTER_DATE": "@1650000000 +0000",
                                              "GIT_AUTHOR_DATE": "@1650000000 +0000", "PATH": "/usr/bin:/bin"}
                              ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a").write_text("a")
    git("add", "a")
    git("commit", "-qm", "a")
    sha = git("rev-parse", "--short", "HEAD")
    s = load_settings(lambda n, d=None: d, {}, root=tmp_path)
    assert (s.version, s.source_date_epoch) == (sha, 1650000000)
    (tmp_path / "a").write_text("changed")
    assert load_settings(lambda n, d=None: d, {}, root=tmp_path).version == f"{sha}-dirty"


def test_outside_git_version_must_be_given(tmp_path: Path) -> None:
    with pytest.raises(HookError, match="is not a git checkout: set version="):
        load_settings(lambda n, d=None: d, {}, root=tmp_path)


def test_every_setting_has_an_env_name_and_doc() -> None:
    for setting in SETTINGS:
        assert setting.env == "HOOK_" + setting.name.upper()
        assert setting.doc


def test_iso_signing_key_and_certificate_are_checked_up_front(tmp_path: Path) -> None:
    """iso_sign_key and iso_sign_cert go together, as PEM files, the key without a passphrase; a
    refusal names the setting and never quotes the key."""
    secret = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7hooksecretmaterial"
    key, cert = tmp_path / "hook.key", tmp_path / "hook.crt"
    key.write_text(f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text(f"-----BEGIN ENCRYPTED PRIVATE KEY-----\n{secret}\n-----END ENCRYPTED PRIVATE KEY-----\n")
    der = tmp_path / "hook.der"
    der.write_bytes(b"0\x82\x03\x1d0\x82\x02\x05\xa0\x03\x02\x01\x02")
    assert settings().iso_sign is None
    assert settings({"iso_sign_key": str(key), "iso_sign_cert": str(cert)}).iso_sign == (key, cert)
    refusals = {
        "iso_sign_key needs iso_sign_cert too": {"iso_sign_key": str(key)},
        "iso_sign_cert needs iso_sign_key too": {"iso_sign_cert": str(cert)},
        f"iso_sign_key='{tmp_path}/none.key': cannot read it (No such file or directory)":
            {"iso_sign_key": str(tmp_path / "none.key"), "iso_sign_cert": str(cert)},
        "iso_sign_key='{cert}' is not a PEM private key": {"iso_sign_key": str(cert), "iso_sign_cert": str(cert)},
        f"iso_sign_cert='{der}' is not a PEM certificate": {"iso_sign_key": str(key), "iso_sign_cert": str(der)},
        f"iso_sign_key='{encrypted}' is encrypted: the build signs unattended":
            {"iso_sign_key": str(encrypted), "iso_sign_cert": str(cert)},
    }
    for message, given in refusals.items():
        with pytest.raises(HookError) as err:
            settings(given)
        assert message.replace("{cert}", str(cert)) in str(err.value), str(err.value)
        assert "\n" not in str(err.value) and secret not in str(err.value)


def test_the_readme_documents_every_setting() -> None:
    """Every setting has its row in the README's settings table (name, default, meaning)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = set(re.findall(r"^\| `([a-z0-9_]+)`(?: \(`[a-z]+=`\))? \|", readme, re.M))
    assert [s.name for s in SETTINGS if s.name not in rows] == []
