"""`berth stats`: live per-app figures; `berth hosts`: what every runner runs."""
from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import click
from rich.table import Table

from cli import appname
from cli.client import Client
from cli.output import console, step
from messaging.shapes import InventoryItem


def _line(name: str, fig: dict[str, Any]) -> str:
    status = " ".join(f"{k}={v}" for k, v in sorted(fig["status"].items()))
    lat = "  ".join(f"{k[:3]}={fig[k]}ms" for k in ("p50_ms", "p95_ms", "p99_ms")
                    if fig.get(k) is not None)
    return (f"{time.strftime('%H:%M:%S')} {name}: req={fig['requests']} {status} "
            f"{lat} open={fig['open']} in={fig['bytes_in']}B out={fig['bytes_out']}B")


@click.command()
@appname.app_option
@click.option("--all", "all_apps", is_flag=True, help="Every app (operators).")
@click.option("-f", "--follow", is_flag=True, help="A line per app every second.")
@click.option("--count", default=0, help="With -f: stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(app: str | None, all_apps: bool, follow: bool, count: int, as_json: bool) -> None:
    """Requests, status classes, latency and bytes per second, from the balancers."""
    path = "/v1/stats" if all_apps else f"/v1/apps/{appname.resolve(app)}/stats"
    client = Client()
    snapshots: Iterable[dict[str, Any]]
    if not follow:
        snapshots = [client.get(path)]
    else:
        query = "?follow=1" + (f"&count={count}" if count else "")
        snapshots = (json.loads(line) for line in client.stream(path + query) if line)
    for snap in snapshots:
        if as_json:
            click.echo(json.dumps(snap))
            continue
        if not snap["apps"]:
            click.echo(f"{time.strftime('%H:%M:%S')} no requests in the last interval "
                       f"(figures from {len(snap['hosts'])} hosts)")
        for name, fig in sorted(snap["apps"].items()):
            click.echo(_line(name, fig))


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def hosts(ctx: click.Context, as_json: bool) -> None:
    """Every runner host: its roles, memory given and free, and what it runs
    (operators). `berth hosts drain HOST` empties one."""
    if ctx.invoked_subcommand is not None:
        return
    data = Client().get("/v1/hosts")
    if as_json:
        console.print_json(data=data)
        return
    for name, info in sorted(data["runners"].items()):
        static = (f", static files on port {info['static_port']}"
                  if info.get("static_port") else "")
        cap = info.get("capacity_mb") or 0
        memory = (f"{info.get('used_mb', 0)} of {cap} MB given" if cap
                  else f"{info.get('used_mb', 0)} MB given, no cap")
        roles = ",".join(info.get("roles") or ())
        draining = " DRAINING" if info.get("draining") else ""
        click.echo(f"=== {name} ({info['address']}){draining}: roles {roles}; "
                   f"{info['instances']} instances; {memory}{static}")
        table = Table("instance", "app", "proc", "release", "state", "port", "restarts",
                      box=None)
        for i in (InventoryItem.from_wire(raw) for raw in info["inventory"]):
            table.add_row(i.instance, i.app, i.proc, f"v{i.release}", i.state.value.lower(),
                          str(i.port or "-"), str(i.restarts))
        console.print(table)
    click.echo(f"stats from: {', '.join(data['stats_from']) or 'nobody yet'}")


@hosts.command("drain")
@click.argument("host")
@click.option("--undo", is_flag=True, help="Let the host take work again.")
@click.option("--wait/--no-wait", default=True, help="Wait until nothing runs there.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
def drain(host: str, undo: bool, wait: bool, timeout: float) -> None:
    """Move everything off HOST (each instance is replaced elsewhere first, then
    stopped: no request fails), or with --undo let it take work again."""
    client = Client()
    client.post(f"/v1/hosts/{host}/drain", {"drain": not undo})
    if undo:
        step(f"{host} takes work again")
        return
    if not wait:
        step(f"Draining {host}; `berth hosts` follows it")
        return
    deadline = time.monotonic() + timeout
    with console.status(f"Draining {host}") as status:
        while True:
            info = client.get("/v1/hosts")["runners"].get(host)
            left = len(info["inventory"]) if info else 0
            if not left:
                break
            if time.monotonic() > deadline:
                raise click.ClickException(f"{host} still runs {left} instances after "
                                           f"{timeout:.0f}s; `berth hosts` shows which")
            status.update(f"Draining {host}: {left} instances left")
            time.sleep(0.5)
    step(f"{host} is empty; it takes no work until `berth hosts drain {host} --undo`")
