"""Logging for the in-image programs: one line per event on stderr, secrets masked everywhere."""

from __future__ import annotations

import json
import logging
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


def setup_logging(program: str, *, debug: bool = False) -> logging.Logger:
    """Log to stderr as 'TIME PROGRAM LEVEL message' and route uncaught exceptions there too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter("%(asctime)sZ %(name)s %(levelname)s %(message)s",
                                          datefmt="%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
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
