"""`berth ps`, `berth scale`."""
from __future__ import annotations

import time

import click
from rich.table import Table

from cli import appname
from cli.client import Client
from cli.output import console, step
from messaging.errors import BerthError
from messaging.shapes import InventoryItem, RunItem


def _age(since: float | None) -> str:
    if not since:
        return "-"
    secs = int(time.time() - since)
    return f"{secs}s" if secs < 120 else f"{secs // 60}m" if secs < 7200 else f"{secs // 3600}h"


def _note(inst: InventoryItem) -> str:
    note, ooms = inst.reason, inst.oom_kills
    if ooms and "out of memory" not in note:
        note += f" (out of memory: {ooms} process{'es' if ooms > 1 else ''} killed)"
    return note


@click.command()
@appname.app_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ps(app: str | None, as_json: bool) -> None:
    """Show the app's instances (state, host, release, restarts) and one-off runs."""
    name = appname.resolve(app)
    data = Client().get(f"/v1/apps/{name}/ps")
    if as_json:
        console.print_json(data=data)
        return
    formation = ", ".join(f"{k}={v}" for k, v in sorted(data["formation"].items()))
    click.echo(f"=== {name} ({formation})")
    table = Table("instance", "proc", "release", "state", "address", "restarts", "age",
                  "note", box=None)
    insts = sorted(map(InventoryItem.from_wire, data["instances"]),
                   key=lambda i: (i.proc, i.instance))
    for i in insts:
        addr = f"{i.address or '?'}:{i.port}" if i.port else i.host
        table.add_row(i.instance, i.proc, f"v{i.release}", i.state.value.lower(), addr,
                      str(i.restarts), _age(i.since), _note(i))
    for r in sorted(map(RunItem.from_wire, data.get("runs", [])), key=lambda r: r.since):
        table.add_row(r.run, r.proc, f"v{r.release}", r.state.value.lower(), r.host or "-",
                      "-", _age(r.since), r.command + (" (detached)" if r.detach else ""))
    console.print(table)


@click.command()
@click.argument("pairs", nargs=-1, required=True)
@appname.app_option
def scale(pairs: tuple[str, ...], app: str | None) -> None:
    """Set process counts, e.g. `berth scale web=2 worker=1`."""
    name = appname.resolve(app)
    counts = {}
    for pair in pairs:
        proc, sep, count = pair.partition("=")
        if not sep or not count.isdigit():
            raise BerthError(f"{pair!r} is not TYPE=COUNT", "write it like web=2", code="usage")
        counts[proc] = int(count)
    formation = Client().post(f"/v1/apps/{name}/formation", counts)["formation"]
    step("Scaled " + name + " to " + ", ".join(f"{k}={v}" for k, v in sorted(formation.items())))
