"""Which app a command is about: -a/--app, $BERTH_APP, or a .berth-app file."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from messaging.errors import BerthError

MARKER = ".berth-app"


def app_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-a", "--app", envvar="BERTH_APP",
                        help="App name (default: $BERTH_APP or the .berth-app file here).")(fn)


def resolve(app: str | None, directory: Path | None = None) -> str:
    if app:
        return app
    for d in filter(None, (directory, Path.cwd())):
        marker = d / MARKER
        if marker.is_file():
            return marker.read_text().strip()
    raise BerthError("no app given", "pass -a NAME, or run `berth apps create NAME` in the "
                     "app's directory", code="usage", status=400)


def remember(directory: Path, app: str) -> Path | None:
    """Write .berth-app in an app directory (one with a Procfile or requirements.txt)."""
    if any((directory / f).exists() for f in ("Procfile", "requirements.txt")):
        marker = directory / MARKER
        marker.write_text(app + "\n")
        return marker
    return None
