"""`berth domains [add|remove]`: custom hostnames routed to the app."""
from __future__ import annotations

import click

from cli import appname
from cli.client import Client
from cli.output import step


@click.group(invoke_without_command=True)
@appname.app_option
@click.pass_context
def domains(ctx: click.Context, app: str | None) -> None:
    """List the app's hostnames."""
    if ctx.invoked_subcommand is None:
        data = Client().get(f"/v1/apps/{appname.resolve(app)}/domains")
        click.echo(f"{data['default']} (default)")
        for d in data["domains"]:
            click.echo(d)


@domains.command("add")
@click.argument("hostname")
@appname.app_option
def add(hostname: str, app: str | None) -> None:
    """Route HOSTNAME to the app."""
    name = appname.resolve(app)
    Client().post(f"/v1/apps/{name}/domains", {"hostname": hostname})
    step(f"Added {hostname} to {name}")


@domains.command("remove")
@click.argument("hostname")
@appname.app_option
def remove(hostname: str, app: str | None) -> None:
    """Stop routing HOSTNAME to the app."""
    name = appname.resolve(app)
    Client().delete(f"/v1/apps/{name}/domains/{hostname}")
    step(f"Removed {hostname} from {name}")
