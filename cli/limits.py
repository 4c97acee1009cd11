"""`berth maintenance on|off`, `berth limits`: per-app switches the balancer enforces."""
from __future__ import annotations

import click

from cli import appname
from cli.client import Client
from cli.output import step


@click.command()
@click.argument("state", type=click.Choice(["on", "off"]), required=False)
@appname.app_option
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
@click.option("--memory-mb", type=int,
              help="Memory limit of each instance (MB); the kernel kills a process beyond.")
@click.option("--pids-max", type=int, help="Most processes and threads in each instance.")
@click.option("--default", "use_default", is_flag=True,
              help="Go back to the platform defaults (for the limits named, or all).")
@appname.app_option
def limits(max_body_mb: int | None, memory_mb: int | None, pids_max: int | None,
           use_default: bool, app: str | None) -> None:
    """Show or set the app's limits. New process limits apply to instances started
    from then on (the next deploy, restart or `berth scale`)."""
    name = appname.resolve(app)
    client = Client()
    given: dict[str, int | None] = {
        k: v for k, v in (("max_body_mb", max_body_mb), ("memory_mb", memory_mb),
                          ("pids_max", pids_max)) if v is not None}
    if use_default:
        given = {k: None for k in (given or ("max_body_mb", "memory_mb", "pids_max"))}
    data = client.patch(f"/v1/apps/{name}/limits", given) if given \
        else client.get(f"/v1/apps/{name}/limits")
    limit = data["max_body_mb"] or data["default_max_body_mb"]
    source = "set for the app" if data["max_body_mb"] else "platform default"
    click.echo(f"max body: {limit} MB ({source})")
    for key, label, unit in (("memory_mb", "memory", " MB"), ("pids_max", "processes", "")):
        value = data.get(key)
        click.echo(f"{label}: {value}{unit} (set for the app)" if value
                   else f"{label}: runner default")
    click.echo(f"maintenance: {'on' if data['maintenance'] else 'off'}")
