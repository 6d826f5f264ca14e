"""Retries with capped exponential backoff, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import random
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TypeVar

from hookcommon.log import reason

T = TypeVar("T")


class Stopping(BaseException):
    """A stop was requested (SIGTERM/SIGINT): unwind and exit cleanly.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
    """


class StepError(Exception):
    """A step failed for a reason worth retrying; the message says what and why."""


class GaveUp(Exception):
    """A step failed on every allowed attempt."""


@dataclass(frozen=True)
class Backoff:
    """Delays of initial, initial*factor, ... capped at maximum, each with +-jitter."""

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield max(0.0, delay * (1 + random.uniform(-self.jitter, self.jitter)))
            delay = min(self.maximum, delay * self.factor)


class StopSignal:
    """A stop flag set by SIGTERM/SIGINT; waits on it are interruptible."""

    def __init__(self, *, raise_in_main: bool) -> None:
        """raise_in_main: also raise Stopping in the main thread, to break a blocking call."""
        self.event = threading.Event()
        self.signal_name = ""
        self._raise = raise_in_main
        self._callbacks: list[Callable[[int], None]] = []

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        for signum in signals:
            signal.signal(signum, self._handle)

    def on_stop(self, callback: Callable[[int], None]) -> None:
        """Call callback(signum) from the signal handler (e.g. to forward the signal)."""
        self._callbacks.append(callback)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.event.is_set()
        if first:
            self.signal_name = signal.Signals(signum).name
            self.event.set()
        for callback in self._callbacks:
            callback(signum)
        if first and self._raise:
            raise Stopping(self.signal_name)

    @property
    def stopping(self) -> bool:
        return self.event.is_set()

    def sleep(self, seconds: float) -> None:
        """Sleep, but raise Stopping as soon as a stop is requested."""
        if self.event.wait(seconds):
            raise Stopping(self.signal_name)

    def check(self) -> None:
        if self.event.is_set():
            raise Stopping(self.signal_name)


def retry(
    action: Callable[[], T],
    *,
    what: str,
    log: logging.Logger,
    stop: StopSignal,
    backoff: Backoff,
    attempts: int = 0,
    level: int = logging.ERROR,
) -> T:
    """Run action until it returns; after each failure log why and wait with backoff.

    attempts=0 retries for ever; failures are logged at level (an optional step logs warnings).
    A StepError is an expected failure (its message is logged as is); any other exception is
    logged with its type, never as a traceback, and retried the same way.
    Raises GaveUp after the last allowed attempt, Stopping when a stop is requested.
    """
    delays = backoff.delays()
    attempt = 0
    while True:
        stop.check()
        attempt += 1
        try:
            return action()
        except StepError as exc:
            why = reason(exc)
        except Exception as exc:
            why = f"{type(exc).__name__}: {reason(exc)}"
        of = f"/{attempts}" if attempts else ""
        if attempts and attempt >= attempts:
            log.log(level, "%s failed (attempt %d%s): %s; giving up", what, attempt, of, why)
            raise GaveUp(f"{what} failed after {attempt} attempts: {why}")
        delay = next(delays)
        log.log(level, "%s failed (attempt %d%s): %s; retrying in %.1fs", what, attempt, of, why, delay)
        stop.sleep(delay)


def add_backoff_options(parser: argparse.ArgumentParser) -> None:
    """The retry-delay options both programs take."""
    parser.add_argument("--backoff-initial", type=float, default=1.0, metavar="SECONDS",
                        help="first retry delay, doubled after each failure (default: %(default)s)")
    parser.add_argument("--backoff-max", type=float, default=30.0, metavar="SECONDS",
                        help="longest retry delay (default: %(default)s)")


def backoff_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Backoff:
    """The Backoff the options ask for; a usage error when they make no sense."""
    if args.backoff_initial < 0 or args.backoff_max < args.backoff_initial:
        parser.error("0 <= --backoff-initial <= --backoff-max is required")
    return Backoff(initial=args.backoff_initial, maximum=args.backoff_max)
