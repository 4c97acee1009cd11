"""`berth tokens [create|revoke]`: API tokens (admins). A team's token reaches only
that team's apps; an admin token (`berth up` writes one) reaches everything."""
from __future__ import annotations

import click
from rich.table import Table

from cli.client import Client
from cli.output import console, step


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def tokens(ctx: click.Context, as_json: bool) -> None:
    """List the API tokens: name, team (none: admin) and when each was made."""
    if ctx.invoked_subcommand is not None:
        return
    data = Client().get("/v1/tokens")
    if as_json:
        console.print_json(data=data)
        return
    table = Table("name", "team", box=None)
    for t in data["tokens"]:
        table.add_row(t["name"], t["team"] or "(admin)")
    console.print(table)


@tokens.command("create")
@click.argument("name")
@click.option("--team", default=None, help="The team it acts for; without, an admin token.")
def create(name: str, team: str | None) -> None:
    """Make a token called NAME and print it (only this once: the platform keeps a
    hash)."""
    data = Client().post("/v1/tokens", {"name": name, "team": team})
    who = f"team {team}" if team else "an admin"
    step(f"Created token {name} for {who}; log in with `berth login --token TOKEN`:")
    click.echo(data["token"])


@tokens.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke the token called NAME: it stops working at once."""
    Client().delete(f"/v1/tokens/{name}")
    step(f"Revoked token {name}")
