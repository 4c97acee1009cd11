"""`berth login`, `berth apps ...`"""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from cli import appname, credentials
from cli.client import Client
from cli.credentials import Credentials
from cli.output import console, step
from messaging import channels


@click.command()
@click.option("--api", "api_url", default=channels.api_url(), show_default=True,
              help="Controller API URL.")
@click.option("--token", prompt=True, hide_input=True, help="Your API token.")
def login(api_url: str, token: str) -> None:
    """Save the API URL and token after checking them."""
    Client(Credentials(api_url.rstrip("/"), token.strip())).get("/v1/apps")
    path = credentials.save(api_url, token.strip())
    step(f"Logged in to {api_url} (saved in {path})")


@click.group()
def apps() -> None:
    """Create, list and destroy apps."""


@apps.command("create")
@click.argument("name")
@click.option("--team", default=None,
              help="The team that owns it (admins only; a team's token makes its own).")
def create(name: str, team: str | None) -> None:
    """Create an app called NAME."""
    app = Client().post("/v1/apps", {"name": name, **({"team": team} if team else {})})
    owner = f" (team {app['team']})" if app.get("team") else ""
    step(f"Created {name}{owner}: {app['url']}")
    marker = appname.remember(Path.cwd(), name)
    if marker:
        step(f"Wrote {marker.name}: commands here now default to -a {name}")


@apps.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """List apps."""
    data = Client().get("/v1/apps")
    if as_json:
        console.print_json(data=data)
        return
    if not data["apps"]:
        click.echo("No apps yet. Create one with `berth apps create NAME`.")
        return
    table = Table("app", "release", "url", "role", box=None)
    for a in data["apps"]:
        table.add_row(a["name"], f"v{a['release']}" if a["release"] else "-", a["url"],
                      a.get("role") or "-")
    console.print(table)


@apps.command("info")
@appname.app_option
def info(app: str | None) -> None:
    """Show an app's release, formation and URL."""
    name = appname.resolve(app)
    console.print_json(data=Client().get(f"/v1/apps/{name}"))


@apps.command("destroy")
@click.argument("name")
@click.option("--confirm", help="The app's name again, to skip the prompt.")
def destroy(name: str, confirm: str | None) -> None:
    """Destroy app NAME: stop its processes and forget its releases."""
    if confirm != name:
        typed = click.prompt(f"Type the app name ({name}) to destroy it", default="",
                             show_default=False)
        if typed != name:
            raise click.UsageError("names did not match; nothing was destroyed")
    Client().delete(f"/v1/apps/{name}")
    step(f"Destroyed {name}")
