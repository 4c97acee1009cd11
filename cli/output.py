"""Exit codes and the one place errors are printed (httpie's style: an enum): `fail`,
called by `Group.invoke` for every command."""
from __future__ import annotations

import enum
import sys
from typing import Any

import click
from rich.console import Console

from config import SettingsError
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
    if isinstance(err, SettingsError):
        return Exit.USAGE
    return {401: Exit.AUTH, 404: Exit.NOT_FOUND, 503: Exit.UNAVAILABLE}.get(err.status, Exit.ERROR)


def fail(err: BerthError) -> None:
    err_console.print(f"[bold red]Error:[/] {err.message}", markup=True, soft_wrap=True)
    if err.hint:
        err_console.print(f"Hint: {err.hint}", markup=False, soft_wrap=True)
    sys.exit(int(exit_code(err)))


def interrupted() -> None:
    err_console.print("Interrupted.")
    sys.exit(130)


class Group(click.Group):
    """The `berth` group: the one place a command's error is reported. A BerthError
    raised anywhere below it (any subcommand, any subgroup) becomes `Error:`/`Hint:`
    lines and a non-zero exit; Ctrl-C becomes "Interrupted." and exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BerthError as err:
            fail(err)
        except KeyboardInterrupt:
            interrupted()


def step(text: str) -> None:
    """A piku-style progress line."""
    click.echo(f"-----> {text}")
