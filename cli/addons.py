"""`berth addons ...`: a tenant's PostgreSQL and Redis; `berth psql` and `berth
redis-cli` open them from inside the app (through `berth run`'s terminal).

The platform's job workers do the slow part; these commands ask for it and, unless
--no-wait, follow the addon's state and last step with a spinner until it is done.
"""
from __future__ import annotations

import shlex
import time
from typing import Any

import click
from rich.table import Table

from cli import appname
from cli.client import Client
from cli.output import console, step
from cli.run import run as run_command
from controller.addons import AddonState
from messaging.errors import BerthError

ENGINES = ("postgres", "redis")
PLANS = ("shared", "dedicated", "ha")
ENV_PREFIX = {"postgres": "DATABASE", "redis": "REDIS"}
POLL = 0.1


def _ago(ts: float) -> str:
    secs = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def state_of(addon: dict[str, Any]) -> AddonState:
    """The addon's state as the enum (the API sends its value)."""
    return AddonState(addon.get("state"))


def _names(addon: dict[str, Any]) -> str:
    return ", ".join(addon["env_keys"]) or "-"


def _table(addons: list[dict[str, Any]]) -> Table:
    table = Table("addon", "app", "engine", "plan", "state", "env", "last step", "created",
                  box=None)
    for a in addons:
        table.add_row(a["id"], a["app"], a["engine"], a["plan"], state_of(a).value, _names(a),
                      a["step"] or "-", _ago(a["created_at"]))
    return table


@click.group("addons", invoke_without_command=True)
@appname.app_option
@click.option("--all", "everything", is_flag=True,
              help="Every app's addons (operators), destroyed ones included.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def addons(ctx: click.Context, app: str | None, everything: bool, as_json: bool) -> None:
    """An app's databases: PostgreSQL and Redis (lists them without a subcommand)."""
    ctx.obj = {"app": app}
    if ctx.invoked_subcommand is not None:
        return
    client = Client()
    if everything:
        found = client.get("/v1/addons?all=1")["addons"]
    else:
        found = client.get(f"/v1/apps/{appname.resolve(app)}/addons")["addons"]
    if as_json:
        console.print_json(data={"addons": found})
    elif not found:
        click.echo("No addons. Make one: berth addons create postgres --plan shared")
    else:
        console.print(_table(found))


def wait(client: Client, addon: dict[str, Any], until: str, timeout: float
         ) -> dict[str, Any]:
    """Follow the addon until its op in flight is over; the spinner shows the step."""
    deadline = time.monotonic() + timeout
    with console.status(f"{addon['id']}: {addon['step']}") as status:
        while addon["op"] is not None:
            if time.monotonic() > deadline:
                raise BerthError(f"{addon['id']} is still {state_of(addon).value} after "
                                 f"{timeout:.0f}s ({addon['step']})",
                                 f"it goes on in the background: `berth addons info "
                                 f"{addon['id']}`", code="timeout", status=504)
            time.sleep(POLL)
            addon = client.get(f"/v1/addons/{addon['id']}")["addon"]
            status.update(f"{addon['id']}: {addon['step']}")
    if addon["error"] and (state_of(addon) is AddonState.FAILED or until == "rotated"):
        err = addon["error"]
        raise BerthError(f"{addon['id']}: {err.get('message')}",
                         err.get("hint") or f"see `berth addons info {addon['id']}`",
                         code=err.get("code") or "addon_failed", status=502)
    return addon


@addons.command("create")
@click.argument("engine", type=click.Choice(ENGINES))
@click.option("--plan", type=click.Choice(PLANS), default="shared", show_default=True,
              help="shared: a database on the platform's server; dedicated: a server of "
                   "its own; ha: with a standby.")
@appname.app_option
@click.option("--as", "alias", help="Attach under this name instead of DATABASE/REDIS "
                                    "(STORAGE gives STORAGE_URL).")
@click.option("--quota-mb", type=int, help="Storage quota (operators; default by plan).")
@click.option("--no-wait", is_flag=True, help="Return at once; `berth addons info` follows it.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
@click.pass_context
def create(ctx: click.Context, engine: str, plan: str, app: str | None, alias: str | None,
           quota_mb: int | None, no_wait: bool, timeout: float) -> None:
    """Make a PostgreSQL or Redis addon for the app; its URL reaches the app as
    DATABASE_URL / REDIS_URL in a new release."""
    name = appname.resolve(app or (ctx.obj or {}).get("app"))
    client = Client()
    body: dict[str, Any] = {"engine": engine, "plan": plan}
    if alias:
        body["as"] = alias
    if quota_mb is not None:
        body["quota_mb"] = quota_mb
    started = time.monotonic()
    addon = client.post(f"/v1/apps/{name}/addons", body)["addon"]
    if no_wait:
        step(f"Provisioning {addon['id']} ({engine} {plan}) for {name}; follow it with "
             f"`berth addons info {addon['id']}`")
        click.echo(addon["id"])
        return
    addon = wait(client, addon, "ready", timeout)
    took = time.monotonic() - started
    release = client.get(f"/v1/apps/{name}")["release"]
    where = f"release v{release['version']}" if release else "its first release"
    step(f"Created {addon['id']} ({engine} {plan}) for {name} in {took:.2f}s: "
         f"{_names(addon)} in {where}")
    click.echo(addon["id"])


@addons.command("info")
@click.argument("addon")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(addon: str, as_json: bool) -> None:
    """An addon's state, last step, where it listens and the names it is attached as."""
    a = Client().get(f"/v1/addons/{addon}")["addon"]
    if as_json:
        console.print_json(data=a)
        return
    table = Table(box=None, show_header=False)
    rows = [("addon", a["id"]), ("app", a["app"]), ("engine", f"{a['engine']} ({a['plan']})"),
            ("state", state_of(a).value + (f" ({a['op']} in flight)" if a["op"] else "")),
            ("last step", a["step"] or "-"), ("url", a["url"] or "-"),
            ("env", _names(a)),
            ("attached as", ", ".join(f"{x['name']} ({x['style']})"
                                      for x in a["attachments"]) or "-"),
            ("created", _ago(a["created_at"])), ("updated", _ago(a["updated_at"]))]
    if a["quota_mb"]:
        used = f"{a['usage_mb']:.1f} MB of " if a["usage_mb"] is not None else ""
        rows.append(("quota", f"{used}{a['quota_mb']} MB ({a['quota_state'] or 'unchecked'})"))
    for server in a.get("servers") or []:
        rows.append((f"{server['proc']} {server['instance'].removeprefix(a['id'] + '-')}",
                     f"{server['state']} on {server['host']} ({server['address']}:"
                     f"{server['port']}), {server['restarts']} restarts"
                     + (f": {server['reason']}" if server["reason"] else "")))
    if a["final_dump"]:
        rows.append(("final dump", a["final_dump"]))
    if a["error"]:
        rows.append(("error", a["error"].get("message", "")))
        if a["error"].get("hint"):
            rows.append(("hint", a["error"]["hint"]))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


@addons.command("destroy")
@click.argument("addon")
@click.option("--confirm", help="The app's name (asked for when not given).")
@click.option("--no-wait", is_flag=True, help="Return once its variables are gone.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
def destroy(addon: str, confirm: str | None, no_wait: bool, timeout: float) -> None:
    """Destroy an addon: its variables leave the app (a new release), then the
    database goes, after a final dump that is kept."""
    client = Client()
    a = client.get(f"/v1/addons/{addon}")["addon"]
    if confirm is None:
        click.echo(f"This destroys {a['id']} ({a['engine']} {a['plan']}) of {a['app']} and "
                   "everything in it (a final dump is kept).")
        confirm = click.prompt(f"Type the app's name ({a['app']}) to confirm", default="",
                               show_default=False)
    if confirm != a["app"]:
        raise BerthError(f"'{confirm}' is not the app's name; nothing was destroyed",
                         f"type {a['app']}, or pass --confirm {a['app']}", code="usage")
    answer = client.post(f"/v1/addons/{addon}/destroy", {"confirm": confirm})
    if answer["release"]:
        step(f"{', '.join(a['env_keys']) or 'Its variables'} left {a['app']}: release "
             f"v{answer['release']}")
    if no_wait:
        step(f"Destroying {addon}; `berth addons info {addon}` follows it")
        return
    done = wait(client, answer["addon"], "destroyed", timeout)
    step(f"Destroyed {addon}" + (f"; final dump: {done['final_dump']}"
                                 if done["final_dump"] else ""))


@addons.group("credentials")
def credentials() -> None:
    """An addon's credentials."""


@credentials.command("rotate")
@click.argument("addon")
@click.option("--no-wait", is_flag=True, help="Return at once.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait.")
def rotate(addon: str, no_wait: bool, timeout: float) -> None:
    """A new password: the old one stops working, and a new release gives the app
    the new one (its instances roll)."""
    client = Client()
    answer = client.post(f"/v1/addons/{addon}/rotate")
    if no_wait:
        step(f"Rotating the credentials of {addon}")
        return
    a = wait(client, answer["addon"], "rotated", timeout)
    release = client.get(f"/v1/apps/{a['app']}")["release"]
    step(f"New credentials for {addon}: release v{release['version']}" if release
         else f"New credentials for {addon}")


@addons.command("attach")
@click.argument("addon")
@click.option("--as", "alias", required=True,
              help="The name: STORAGE gives STORAGE_URL (or, with --split, STORAGE_HOST, "
                   "_PORT, _NAME, _USER, _PASSWORD).")
@click.option("--split", is_flag=True, help="Host, port, name, user and password apart.")
def attach(addon: str, alias: str, split: bool) -> None:
    """More names for an addon in its app's environment (a new release)."""
    answer = Client().post(f"/v1/addons/{addon}/attachments",
                           {"as": alias, "style": "split" if split else "url"})
    a = answer["addon"]
    rel = f": release v{answer['release']}" if answer["release"] else ""
    step(f"Attached {addon} as {alias.upper()} on {a['app']}{rel} ({_names(a)})")


@addons.command("detach")
@click.argument("addon")
@click.argument("alias")
def detach(addon: str, alias: str) -> None:
    """Take one of an addon's names out of its app's environment (a new release)."""
    answer = Client().delete(f"/v1/addons/{addon}/attachments/{alias.upper()}")
    rel = f": release v{answer['release']}" if answer["release"] else ""
    step(f"Detached {addon} as {alias.upper()}{rel}")


def _url_var(client: Client, app: str, engine: str, addon: str | None) -> str:
    """The variable holding the addon's URL in the app: $DATABASE_URL by default."""
    if addon is None:
        return f"{ENV_PREFIX[engine]}_URL"
    a = client.get(f"/v1/addons/{addon}")["addon"]
    if a["engine"] != engine or a["app"] != app:
        raise BerthError(f"{addon} is not a {engine} addon of '{app}'",
                         f"`berth addons -a {app}` lists its addons", code="usage")
    urls = [f"{x['name']}_URL" for x in a["attachments"] if x["style"] == "url"]
    if not urls or state_of(a) is not AddonState.READY:
        raise BerthError(f"{addon} is {state_of(a).value} and gives the app no URL",
                         f"`berth addons info {addon}`", code="usage")
    return urls[0]


def _open(ctx: click.Context, app: str | None, engine: str, addon: str | None,
          program: str, args: tuple[str, ...]) -> None:
    name = appname.resolve(app)
    var = _url_var(Client(), name, engine, addon)
    line = f'{program} "${var}"' + "".join(" " + shlex.quote(a) for a in args)
    ctx.invoke(run_command, app=name, no_tty=False, detach=False, command=(line,))


@click.command("psql", context_settings={"ignore_unknown_options": True})
@appname.app_option
@click.option("--addon", help="Which PostgreSQL addon (default: the one in DATABASE_URL).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def psql(ctx: click.Context, app: str | None, addon: str | None, args: tuple[str, ...]
         ) -> None:
    """psql on the app's own database, run inside the app (as `berth run` does);
    ARGS go to psql, e.g. `berth psql -- -c 'select 1'`."""
    _open(ctx, app, "postgres", addon, "psql", args)


@click.command("redis-cli", context_settings={"ignore_unknown_options": True})
@appname.app_option
@click.option("--addon", help="Which Redis addon (default: the one in REDIS_URL).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def redis_cli(ctx: click.Context, app: str | None, addon: str | None,
              args: tuple[str, ...]) -> None:
    """redis-cli on the app's own Redis, run inside the app; ARGS go to redis-cli,
    e.g. `berth redis-cli -- ping`."""
    _open(ctx, app, "redis", addon, "redis-cli -u", args)
