"""`berth logs [-f]`"""
from __future__ import annotations

import click

from cli import appname
from cli.client import Client


@click.command()
@appname.app_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=100, show_default=True, help="Lines of history.")
def logs(app: str | None, follow: bool, lines: int) -> None:
    """Print the app's output, router and platform lines."""
    name = appname.resolve(app)
    path = f"/v1/apps/{name}/logs?lines={lines}" + ("&follow=1" if follow else "")
    for line in Client().stream(path):
        click.echo(line)
