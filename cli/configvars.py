"""`berth config get|set|unset`: each change makes a new release."""
from __future__ import annotations

import click

from cli import appname
from cli.client import Client
from cli.output import console, step
from messaging.errors import BerthError


@click.group("config")
def config_group() -> None:
    """Environment variables of an app."""


@config_group.command("get")
@click.argument("key", required=False)
@appname.app_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def get(key: str | None, app: str | None, as_json: bool) -> None:
    """Show all config vars, or one KEY's value."""
    name = appname.resolve(app)
    config = Client().get(f"/v1/apps/{name}/config")["config"]
    if key:
        if key not in config:
            raise BerthError(f"config var {key} is not set on '{name}'",
                             f"set it with `berth config set {key}=value -a {name}`",
                             code="not_found", status=404)
        click.echo(config[key])
    elif as_json:
        console.print_json(data=config)
    else:
        for k in sorted(config):
            click.echo(f"{k}={config[k]}")


@config_group.command("set")
@click.argument("pairs", nargs=-1, required=True)
@appname.app_option
def set_(pairs: tuple[str, ...], app: str | None) -> None:
    """Set KEY=value pairs (makes a new release)."""
    name = appname.resolve(app)
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BerthError(f"{pair!r} is not KEY=value", "write it like GREETING=hello",
                             code="usage")
        changes[key] = value
    rel = Client().patch(f"/v1/apps/{name}/config", changes)
    step(f"Set {', '.join(changes)} on {name}: release v{rel['release']}")


@config_group.command("unset")
@click.argument("keys", nargs=-1, required=True)
@appname.app_option
def unset(keys: tuple[str, ...], app: str | None) -> None:
    """Remove config vars (makes a new release)."""
    name = appname.resolve(app)
    rel = Client().patch(f"/v1/apps/{name}/config", {k: None for k in keys})
    step(f"Unset {', '.join(keys)} on {name}: release v{rel['release']}")
