"""Logging for the in-image programs: one line per event on stderr, secrets masked everywhere."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from types import TracebackType
from urllib.parse import quote, quote_plus

MASK = "***"

_secrets: set[str] = set()
_lock = threading.Lock()


def add_secret(secret: str) -> None:
    """Mask secret (and its URL- and JSON-escaped forms) in every log line from now on."""
    if not secret:
        return
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    with _lock:
        _secrets.update(f for f in forms if f)


def mask(text: str) -> str:
    """text with every registered secret replaced by ***, longest first."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class MaskingFormatter(logging.Formatter):
    """Masks the whole formatted record, exception text included."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


#: Where warnings, errors and milestone lines also go, when set (the OS's hook.yaml: /dev/console).
CONSOLE_ENV = "HOOK_CONSOLE"


def _on_console(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or bool(getattr(record, "console", False))


def console_handler(path: str) -> logging.Handler | None:
    """A handler that writes warnings, errors and records logged with extra={"console": True} to
    path (the serial console an operator watches), masked like every other line; None if unwritable."""
    try:
        stream = open(path, "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - process-long
    except OSError:
        return None
    handler = logging.StreamHandler(stream)
    handler.setFormatter(MaskingFormatter("%(name)s: %(levelname)s %(message)s"))
    handler.addFilter(_on_console)
    return handler


def setup_logging(program: str, *, debug: bool = False) -> logging.Logger:
    """Log to stderr as 'TIME PROGRAM LEVEL message' and route uncaught exceptions there too.

    With $HOOK_CONSOLE set (hook.yaml: /dev/console), warnings, errors and milestone lines
    (extra={"console": True}) are also written there, so the serial console shows why a machine
    waits or reboots.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter("%(asctime)sZ %(name)s %(levelname)s %(message)s",
                                          datefmt="%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    console = os.environ.get(CONSOLE_ENV, "")
    extra = console_handler(console) if console else None
    if extra is not None:
        root.handlers.append(extra)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # urllib3 and docker log connection details at DEBUG only; keep them quiet unless asked.
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    log = logging.getLogger(program)

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.critical("unexpected error, this is a bug: %s",
                     "".join(traceback.format_exception(kind, exc, tb)).rstrip())

    sys.excepthook = excepthook
    threading.excepthook = lambda a: excepthook(a.exc_type, a.exc_value or a.exc_type(), a.exc_traceback)
    return log


def reason(exc: BaseException) -> str:
    """A one-line description of an exception for a log line (type name only when it is unclear)."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text
