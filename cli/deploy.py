"""`berth push`, `berth releases`, `berth rollback`."""
from __future__ import annotations

import time
from pathlib import Path

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from cli import appname, pack
from cli.client import Client
from cli.output import console, err_console, step
from cli.settings import SPEC
from messaging.errors import BerthError
from messaging.shapes import InventoryItem, State

TAIL_WAIT = 4.0      # seconds to wait for a crashed instance's last lines to arrive
STABLE = 1.2         # ...and how long they must stay unchanged (> a heartbeat)


def _web_of(client: Client, app: str) -> tuple[int, list[InventoryItem]]:
    ps = client.get(f"/v1/apps/{app}/ps")
    return (ps["formation"].get("web", 0),
            [i for i in map(InventoryItem.from_wire, ps["instances"]) if i.web])


def wait_for_release(client: Client, app: str, version: int, timeout: float) -> None:
    """Block until the release's web instances run, or explain why they don't: a web
    process that dies before it is healthy is reported at its first crash, with its
    last output lines (the traceback), while the platform keeps retrying it."""
    deadline = time.monotonic() + timeout
    with console.status(f"Starting release v{version}..."):
        while time.monotonic() < deadline:
            want, web = _web_of(client, app)
            mine = [i for i in web if i.release == version]
            if want == 0 or sum(1 for i in mine if i.state is State.RUNNING) >= want:
                return
            crashed = [i for i in mine if i.state in (State.BACKOFF, State.FATAL)]
            if crashed:
                _report_crash(client, app, version, crashed[0])
            time.sleep(0.3)
    raise BerthError(f"release v{version} did not start within {timeout:.0f}s",
                     f"see `berth ps -a {app}` and `berth logs -a {app}`", code="timeout")


def _report_crash(client: Client, app: str, version: int, inst: InventoryItem) -> None:
    # the crash's last lines travel in heartbeats (every interval) after the state
    # change: keep reading until they have not grown for STABLE seconds, so the
    # traceback is whole; keep the fullest seen (a restart clears them)
    tail, changed, until = list(inst.last_output), time.monotonic(), time.monotonic() + TAIL_WAIT
    while time.monotonic() < until and (not tail or time.monotonic() - changed < STABLE):
        time.sleep(0.3)
        _, web = _web_of(client, app)
        now = next((i for i in web if i.instance == inst.instance), None)
        if now is not None and now.last_output and now.last_output != tail:
            tail, changed, inst = list(now.last_output), time.monotonic(), now
    _, web = _web_of(client, app)
    others = [i for i in web if i.release != version and i.state is State.RUNNING]
    if tail:
        err_console.print(f"-----> Last output of {inst.proc}.{inst.instance}:",
                          markup=False, soft_wrap=True)
        for line in tail:
            err_console.print(f"       {line}", markup=False, soft_wrap=True)
    serving = (f"release v{others[0].release} keeps serving" if others
               else "nothing else is serving the app")
    raise BerthError(f"release v{version} crashed on start: {inst.reason}",
                     f"fix it and push again ({serving}; Berth keeps retrying v{version}, "
                     f"see `berth ps -a {app}` and `berth logs -a {app}`)", code="crashed")


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@appname.app_option
@click.option("--no-wait", is_flag=True, help="Return once the build is done.")
def push(directory: Path, app: str | None, no_wait: bool) -> None:
    """Deploy DIRECTORY (default: here) to the app."""
    started = time.monotonic()
    name = appname.resolve(app, directory)
    client = Client()
    client.get(f"/v1/apps/{name}")
    tarball, count = pack.pack(directory)
    try:
        size = tarball.stat().st_size
        step(f"Packed {count} files ({size / 1024:.0f} kB) from {directory.resolve()}")
        with Progress("[progress.description]{task.description}", BarColumn(),
                      DownloadColumn(), TransferSpeedColumn(), console=console,
                      transient=True) as progress:
            task = progress.add_task("Uploading", total=size)
            build = client.upload(f"/v1/apps/{name}/builds", tarball,
                                  lambda n: progress.advance(task, n))
    finally:
        tarball.unlink(missing_ok=True)
    step(f"Uploaded; build {build['build']}")
    for line in client.stream(f"/v1/builds/{build['build']}/log"):
        click.echo(line)
    result = client.get(f"/v1/builds/{build['build']}")
    if result["status"] != "succeeded":
        err = result.get("error") or {}
        raise BerthError(f"the build failed: {err.get('message', 'see the log above')}",
                         err.get("hint") or "fix the problem shown above and push again",
                         code="build_failed")
    info = client.get(f"/v1/apps/{name}")
    if not no_wait:
        wait_for_release(client, name, result["release"], SPEC.load().deploy_timeout)
    took = time.monotonic() - started
    step(f"Deployed {name} v{result['release']} in {took:.1f}s")
    click.echo(f"       {info['url']}")


@click.command()
@appname.app_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def releases(app: str | None, as_json: bool) -> None:
    """List the app's releases, newest first."""
    name = appname.resolve(app)
    data = Client().get(f"/v1/apps/{name}/releases")
    if as_json:
        console.print_json(data=data)
        return
    table = Table("version", "description", "slug", "created", box=None)
    for r in data["releases"]:
        mark = " (current)" if r["version"] == data["current"] else ""
        table.add_row(f"v{r['version']}{mark}", r["description"], (r["slug"] or "-")[:12],
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])))
    console.print(table)


@click.command()
@click.argument("version", required=False)
@appname.app_option
def rollback(version: str | None, app: str | None) -> None:
    """Make a new release from an earlier one (default: the previous deploy)."""
    name = appname.resolve(app)
    number = None
    if version is not None:
        try:
            number = int(version.lstrip("v"))
        except ValueError:
            raise BerthError(f"{version!r} is not a release number",
                             "use `berth rollback 3` or `berth rollback v3`",
                             code="usage") from None
    rel = Client().post(f"/v1/apps/{name}/rollback", {"version": number})["release"]
    step(f"{rel['description']}: release v{rel['version']}")
