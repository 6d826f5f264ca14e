"""The glue between our stages and doit: actions that fail with one line, and a reporter that prints it."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from doit.exceptions import TaskFailed
from doit.reporter import ConsoleReporter

from tasks.errors import HookError


def action(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Callable[..., Any], tuple[Any, ...], dict]:
    """A doit python-action that turns a HookError into a failed task with that one line."""

    @functools.wraps(fn)
    def wrapped() -> TaskFailed | None:
        try:
            fn(*args, **kwargs)
        except HookError as exc:
            return TaskFailed(str(exc))
        except KeyboardInterrupt:
            return TaskFailed("interrupted: nothing half-written was kept; run the same command again")
        return None

    return (wrapped, (), {})


class HookReporter(ConsoleReporter):
    """doit's console reporter, with our failures as one line: `hook: <task> failed: <why>`."""

    desc = "hook: one line per failure"

    def _write_failure(self, result: dict[str, Any], write_exception: bool = True) -> None:
        fail = result["exception"]
        if isinstance(fail, TaskFailed) and not fail.traceback:
            sys.stderr.write(f"hook: {result['task'].name} failed: {fail.message}\n")
        else:
            super()._write_failure(result, write_exception)
