"""`berth access [add|remove]`: which teams may do what to an app. The app's own team
is its owner; the owner (or an admin) grants other teams viewer, deployer or owner."""
from __future__ import annotations

import click
from click.core import ParameterSource
from rich.table import Table

from cli import appname
from cli.client import Client
from cli.output import console, step
from messaging.shapes import ROLES


def _access_of(app: str | None) -> tuple[str, str]:
    """The app's name (-a, $BERTH_APP or .berth-app) and its access endpoint; a
    subcommand without its own -a takes the group's (`berth access -a APP add ...`)."""
    ctx = click.get_current_context()
    if ctx.parent is not None and ctx.get_parameter_source("app") is not \
            ParameterSource.COMMANDLINE:
        app = ctx.parent.params.get("app") or app
    name = appname.resolve(app)
    return name, f"/v1/apps/{name}/access"


@click.group(invoke_without_command=True)
@appname.app_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def access(ctx: click.Context, app: str | None, as_json: bool) -> None:
    """List the teams with a role on the app: its owner team and every grant."""
    if ctx.invoked_subcommand is not None:
        return
    data = Client().get(_access_of(app)[1])
    if as_json:
        console.print_json(data=data)
        return
    table = Table("team", "role", box=None)
    table.add_row(data["owner"] or "(admins)", "owner (the app's team)")
    for grant in data["grants"]:
        table.add_row(grant["team"], grant["role"])
    console.print(table)


@access.command("add")
@click.argument("team")
@click.option("--role", required=True, type=click.Choice(ROLES),
              help="viewer: read its state; deployer: also push, scale, config, run; "
                   "owner: also destroy, domains, addons, access.")
@appname.app_option
def add(team: str, role: str, app: str | None) -> None:
    """Give TEAM a role on the app (or change the role it has)."""
    name, path = _access_of(app)
    data = Client().post(path, {"team": team, "role": role})
    was = f" (was {data['before']})" if data.get("before") else ""
    step(f"Team {team} is now {role} on {name}{was}")


@access.command("remove")
@click.argument("team")
@appname.app_option
def remove(team: str, app: str | None) -> None:
    """Take TEAM's role on the app away."""
    name, path = _access_of(app)
    data = Client().delete(f"{path}/{team}")
    step(f"Team {team} has no role on {name} any more (was {data['revoked']})")
