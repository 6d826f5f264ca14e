"""The shared kernel command line parser, config, masking and retry of the in-image programs."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator

import programs_helpers  # noqa: F401 - puts containers/common on sys.path
import pytest
from hookcommon import log as hooklog
from hookcommon.cmdline import KEYS, HookConfig, parse_cmdline, registry_host, syslog_address
from hookcommon.retry import Backoff, GaveUp, StepError, Stopping, StopSignal, retry
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("   \n", {}),
        ("a=1 b=2", {"a": "1", "b": "2"}),
        ("registry_password=pa=ss==", {"registry_password": "pa=ss=="}),
        ("quiet debug", {"quiet": None, "debug": None}),
        ("k=", {"k": ""}),
        ('k="a b  c" x=y', {"k": "a b  c", "x": "y"}),
        ('"k=a b" x', {"k": "a b", "x": None}),
        ('"flag with space"', {"flag with space": None}),
        ('k=a"b c"d', {"k": 'a"b c"d'}),
        ('k="unterminated value', {"k": "unterminated value"}),
        ("k=1 k=2 k=3", {"k": "3"}),
        ("k=1 k", {"k": None}),
        ("a=1 -- b=2 init_arg", {"a": "1"}),
        ("a=1 --x=2 -- b", {"a": "1", "--x": "2"}),
        ("\ta=1\t\tb=2\n", {"a": "1", "b": "2"}),
        ("=x=1", {"=x": "1"}),
        ('k=""', {"k": ""}),
    ],
)
def test_parse_like_the_kernel(text: str, expected: dict[str, str | None]) -> None:
    assert parse_cmdline(text) == expected


def test_garbage_bytes_do_not_break_the_parser() -> None:
    params = parse_cmdline(b"a=\xff\xfe b=ok\x00c=1 \x80")
    assert params["a"] == "\ufffd\ufffd"
    assert params["b"] == "ok"
    assert params["c"] == "1"
    assert params["\ufffd"] is None


@given(st.binary(max_size=300))
def test_any_bytes_parse_to_a_dict_of_strings(data: bytes) -> None:
    params = parse_cmdline(data)
    assert all(isinstance(k, str) and k for k in params)
    assert all(v is None or isinstance(v, str) for v in params.values())
    HookConfig.from_params(params)


_word = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='"='), min_size=1)
_value = st.text(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='"'), max_size=20)


@given(st.dictionaries(_word.filter(lambda k: k != "--"), _value, max_size=8))
def test_quoted_values_round_trip(params: dict[str, str]) -> None:
    text = " ".join(f'{k}="{v}"' for k, v in params.items())
    assert parse_cmdline(text) == params


def test_config_from_every_key() -> None:
    cfg = HookConfig.from_text(
        "console=ttyS0 tink_worker_image=reg:5000/tw:v1 docker_registry=reg:5000 registry_username=u "
        'registry_password="p=ss w" grpc_authority=tink:42113 worker_id=00:11 tinkerbell_tls=false '
        "tinkerbell_insecure_tls syslog_host=10.0.0.1 insecure_registries=a:1,,b:2,a:1 "
        "HTTP_PROXY=http://p:3128 HTTPS_PROXY=http://p:3129 NO_PROXY=10.0.0.0/8,.lan "
        "packet_base_url=http://10.0.0.1/misc tinkerbell=http://10.0.0.1 grpc_cert_url=http://10.0.0.1/cert"
    )
    assert cfg == HookConfig(
        tink_worker_image="reg:5000/tw:v1", docker_registry="reg:5000", registry_username="u",
        registry_password="p=ss w", grpc_authority="tink:42113", worker_id="00:11", tinkerbell_tls="false",
        tinkerbell_insecure_tls="true", syslog_host="10.0.0.1", insecure_registries=("a:1", "b:2"),
        http_proxy="http://p:3128", https_proxy="http://p:3129", no_proxy="10.0.0.0/8,.lan",
        packet_base_url="http://10.0.0.1/misc", tinkerbell="http://10.0.0.1",
        grpc_cert_url="http://10.0.0.1/cert",
    )
    assert cfg.secrets == ["p=ss w"]
    assert "p=ss w" not in repr(cfg)
    assert cfg.proxy_env() == {"HTTP_PROXY": "http://p:3128", "HTTPS_PROXY": "http://p:3129",
                               "NO_PROXY": "10.0.0.0/8,.lan"}
    assert set(KEYS) == {"tink_worker_image", "docker_registry", "registry_username", "registry_password",
                         "grpc_authority", "worker_id", "tinkerbell_tls", "tinkerbell_insecure_tls",
                         "syslog_host", "insecure_registries", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                         "packet_base_url", "tinkerbell", "grpc_cert_url", "ipam", "vlan_id", "hw_addr", "interface"}


def test_network_keys_are_kept_verbatim() -> None:
    """ipam= holds ':' and ',' (and a hyphenated MAC); hookcommon/network.py parses the values."""
    value = "52-54-00-12-34-56:30:10.0.2.15:255.255.255.0:10.0.2.2:h.example:10.0.2.3,1.1.1.1:a.example:"
    cfg = HookConfig.from_text(f"ipam={value} vlan_id=30 hw_addr=52:54:00:12:34:56 interface=eth1")
    assert (cfg.ipam, cfg.vlan_id, cfg.hw_addr, cfg.interface) == (value, "30", "52:54:00:12:34:56", "eth1")
    assert HookConfig.from_text("ipam interface=").ipam == "" and HookConfig.from_text("interface=").interface == ""


def test_empty_cmdline_is_an_empty_config() -> None:
    cfg = HookConfig.from_text("")
    assert cfg == HookConfig()
    assert cfg.secrets == [] and cfg.proxy_env() == {}


@pytest.mark.parametrize(
    ("value", "host"),
    [("reg:5000", "reg:5000"), ("https://reg.example/", "reg.example"), ("reg/path", "reg"),
     (" 10.0.0.1:80 ", "10.0.0.1:80")],
)
def test_registry_host(value: str, host: str) -> None:
    assert registry_host(value) == host


@pytest.mark.parametrize("value", ["", "https://", "..", "a b"])
def test_registry_host_rejects_garbage(value: str) -> None:
    with pytest.raises(ValueError):
        registry_host(value)


@pytest.mark.parametrize(
    ("host", "address"),
    [("10.0.0.1", "udp://10.0.0.1:514"), ("logs.lan", "udp://logs.lan:514"),
     ("logs.lan:1514", "udp://logs.lan:1514"), ("fd00::1", "udp://[fd00::1]:514")],
)
def test_syslog_address(host: str, address: str) -> None:
    assert syslog_address(host) == address


def test_masking_covers_escaped_forms_and_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    secret = 'pa ss"w/rd='
    hooklog.add_secret(secret)
    hooks = sys.excepthook, threading.excepthook
    log = hooklog.setup_logging("hook-test")
    sys.excepthook, threading.excepthook = hooks
    log.info("raw %s", secret)
    log.info("url http://x/?p=pa%20ss%22w%2Frd%3D and json {\"p\": \"pa ss\\\"w/rd=\"}")
    try:
        raise RuntimeError(f"failed with {secret}")
    except RuntimeError:
        log.exception("boom")
    err = capsys.readouterr().err
    assert "raw ***" in err
    assert secret not in err and "pa%20ss" not in err and 'pa ss\\"w' not in err
    assert "failed with ***" in err
    logging.getLogger().handlers.clear()


def test_console_gets_warnings_and_milestones_masked(tmp_path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """HOOK_CONSOLE (the images set /dev/console): warnings, errors and lines marked as milestones go
    there too, masked; plain info lines only to stderr."""
    console = tmp_path / "console"
    console.write_text("")
    monkeypatch.setenv("HOOK_CONSOLE", str(console))
    hooklog.add_secret("c0nsole-secret")
    hooks = sys.excepthook, threading.excepthook
    log = hooklog.setup_logging("hook-test")
    sys.excepthook, threading.excepthook = hooks
    try:
        log.info("an ordinary step")
        log.info("tink-worker is running", extra={"console": True})
        log.error("pulling failed with c0nsole-secret; retrying in 2.0s")
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
        logging.getLogger().handlers.clear()
    assert console.read_text().splitlines() == [
        "hook-test: INFO tink-worker is running",
        "hook-test: ERROR pulling failed with ***; retrying in 2.0s",
    ]
    assert "an ordinary step" in capsys.readouterr().err
    monkeypatch.setenv("HOOK_CONSOLE", str(tmp_path / "no" / "such" / "console"))
    log = hooklog.setup_logging("hook-test")  # an unwritable console is no error: stderr only
    sys.excepthook, threading.excepthook = hooks
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger().handlers.clear()


def test_backoff_doubles_and_is_capped() -> None:
    delays = Backoff(initial=1, maximum=8, factor=2, jitter=0).delays()
    assert [next(delays) for _ in range(6)] == [1, 2, 4, 8, 8, 8]


def test_retry_logs_every_failure_and_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def fails() -> None:
        calls.append(1)
        raise StepError("registry says no")

    stop = StopSignal(raise_in_main=False)
    with caplog.at_level(logging.INFO), pytest.raises(GaveUp, match="after 3 attempts: registry says no"):
        retry(fails, what="pulling x", log=logging.getLogger("t"), stop=stop,
              backoff=Backoff(initial=0, maximum=0), attempts=3)
    assert len(calls) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "pulling x failed (attempt 1/3): registry says no; retrying in 0.0s"
    assert lines[-1] == "pulling x failed (attempt 3/3): registry says no; giving up"


def test_retry_names_unexpected_errors_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    results: Iterator[Exception | int] = iter([KeyError("k"), 42])

    def flaky() -> int:
        value = next(results)
        if isinstance(value, Exception):
            raise value
        return value

    stop = StopSignal(raise_in_main=False)
    assert retry(flaky, what="x", log=logging.getLogger("t"), stop=stop, backoff=Backoff(initial=0)) == 42
    assert "x failed (attempt 1): KeyError: 'k'; retrying" in caplog.text
    assert "Traceback" not in caplog.text


def test_retry_stops_when_asked() -> None:
    stop = StopSignal(raise_in_main=False)
    stop.event.set()
    with pytest.raises(Stopping):
        retry(lambda: None, what="x", log=logging.getLogger("t"), stop=stop, backoff=Backoff())
