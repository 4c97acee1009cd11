"""Exit codes and the one place errors are printed (httpie's style: an enum)."""
from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from messaging.errors import BerthError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    AUTH = 3
    NOT_FOUND = 4
    UNAVAILABLE = 5


def exit_code(err: BerthError) -> Exit:
    return {401: Exit.AUTH, 404: Exit.NOT_FOUND, 503: Exit.UNAVAILABLE}.get(err.status, Exit.ERROR)


def fail(err: BerthError) -> None:
    err_console.print(f"[bold red]Error:[/] {err.message}", markup=True, soft_wrap=True)
    if err.hint:
        err_console.print(f"Hint: {err.hint}", markup=False, soft_wrap=True)
    sys.exit(int(exit_code(err)))


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any BerthError into `Error:`/`Hint:` lines and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BerthError as err:
            fail(err)
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            sys.exit(130)
    return wrapper


def step(text: str) -> None:
    """A piku-style progress line."""
    click.echo(f"-----> {text}")
