"""`berth maintenance on|off`, `berth limits`: per-app switches the balancer enforces."""
from __future__ import annotations

import click

from cli import appname
from cli.client import Client
from cli.output import handle_errors, step


@click.command()
@click.argument("state", type=click.Choice(["on", "off"]), required=False)
@appname.app_option
@handle_errors
def maintenance(state: str | None, app: str | None) -> None:
    """Show, or turn on/off, maintenance mode (the balancer answers 503)."""
    name = appname.resolve(app)
    client = Client()
    if state is None:
        on = client.get(f"/v1/apps/{name}/limits")["maintenance"]
    else:
        on = client.patch(f"/v1/apps/{name}/limits", {"maintenance": state == "on"})["maintenance"]
    step(f"Maintenance mode for {name} is {'on' if on else 'off'}")


@click.command()
@click.option("--max-body-mb", type=int, help="Largest request body the app accepts (MB).")
@click.option("--default", "use_default", is_flag=True, help="Go back to the platform default.")
@appname.app_option
@handle_errors
def limits(max_body_mb: int | None, use_default: bool, app: str | None) -> None:
    """Show or set the app's request limits."""
    name = appname.resolve(app)
    client = Client()
    if max_body_mb is not None or use_default:
        data = client.patch(f"/v1/apps/{name}/limits",
                            {"max_body_mb": None if use_default else max_body_mb})
    else:
        data = client.get(f"/v1/apps/{name}/limits")
    limit = data["max_body_mb"] or data["default_max_body_mb"]
    source = "set for the app" if data["max_body_mb"] else "platform default"
    click.echo(f"max body: {limit} MB ({source})")
    click.echo(f"maintenance: {'on' if data['maintenance'] else 'off'}")
