"""`berth backup ...`: the snapshots of tenant data, for backup admins.

list, show, snapshot, restore, verify and prune go through the API, which asks for a
token of the backup-admin role (the controller writes the first one to its data dir's
backup-admin.token: `BERTH_CLI_TOKEN=$(cat .../backup-admin.token) berth backup list`);
an ordinary token is refused (403). `pull` runs on the offsite host itself, as its
own user, and talks to no API: it pulls from a served host's read-only module or
forced command (backup/offsite.py), so nothing on the served hosts can reach what it
holds.
"""
from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from backup.timespec import parse_at
from cli.client import Client
from cli.output import console, step
from messaging.errors import BerthError

RESTORE_STEPS = 6      # chosen, checksums, stop, keep + swap, start, done
VERIFY_STEPS = 4       # checksums, PostgreSQL, verified, done


@click.group("backup")
def backup() -> None:
    """Snapshots of tenant data (app data dirs, dedicated databases, shared-database
    tenants' dumps): list, restore by time, verify, prune; `pull` on the offsite host."""


def _at(text: str | None) -> str | None:
    if not text:
        return None
    at = parse_at(text)
    step(f"As of {at:%Y-%m-%d %H:%M:%S} UTC")
    return at.isoformat()


def _snapshotters(volumes: list[dict[str, Any]]) -> None:
    """Which snapshotter is in use, and what it cannot guarantee, once per kind."""
    seen: dict[str, str] = {}
    for v in volumes:
        seen.setdefault(v["snapshotter"], v["guarantees"])
    for kind, text in seen.items():
        console.print(f"[bold]Snapshotter {kind}[/]: {text}.", soft_wrap=True)


@backup.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_volumes(as_json: bool) -> None:
    """Every backed-up volume, its snapshotter and its newest snapshot."""
    volumes = Client().get("/v1/backups")["volumes"]
    if as_json:
        click.echo(json.dumps(volumes, indent=2))
        return
    if not volumes:
        step("No volumes to back up yet (no app data dirs, no dedicated addons)")
        return
    _snapshotters(volumes)
    table = Table("volume", "kind", "owner", "snapshotter", "snapshots", "newest (UTC)",
                  box=None)
    for v in volumes:
        snaps = v["snapshots"]
        table.add_row(v["name"], v["kind"], v["owner"], v["snapshotter"], str(len(snaps)),
                      snaps[-1]["time"] if snaps else "-")
    console.print(table)
    for v in volumes:
        for note in v["notes"]:
            console.print(f"Note: {v['name']}: {note}", soft_wrap=True)


@backup.command("show")
@click.argument("volume")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(volume: str, as_json: bool) -> None:
    """VOLUME's snapshots, oldest first, and whether each is verified."""
    v = Client().get(f"/v1/backups/{volume}")
    if as_json:
        click.echo(json.dumps(v, indent=2))
        return
    _snapshotters([v])
    step(f"{v['name']} ({v['kind']} of {v['owner']}) at {v['path']}; policy {v['policy']}")
    table = Table("snapshot", "time (UTC)", "manifest", "verified", box=None)
    for s in v["snapshots"]:
        table.add_row(s["name"], s["time"], "yes" if s["manifest"] else "no",
                      "yes" if s["verified"] else "-")
    console.print(table)


@backup.command("snapshot")
@click.argument("volume")
def snapshot(volume: str) -> None:
    """Snapshot VOLUME now (beat does it on its schedule)."""
    step(f"Snapshot {Client(timeout=3600).post(f'/v1/backups/{volume}/snapshots')['snapshot']}")


def _follow(lines: Iterator[str], total: int, title: str) -> dict[str, Any]:
    """Show the job's steps as a progress bar; return its result or raise its error."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(title, total=total)
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if "step" in event:
                bar.update(task, description=event["step"], advance=1)
                console.print(f"-----> {event['step']}", soft_wrap=True)
            elif "error" in event:
                raise BerthError.from_dict(event["error"])
            elif "done" in event:
                bar.update(task, description="done", completed=total)
                return dict(event["done"])
    raise BerthError("the API ended the job's stream without a result",
                     "see the controller's log; the job may have been interrupted")


@backup.command("restore")
@click.argument("volume")
@click.option("--at", "at_text", help="The newest snapshot at or before this time: "
              "'14:00 yesterday', '3 hours ago', '2026-11-30T14:00Z' (default: newest).")
@click.option("--into", help="Restore into a new volume of this name (the live one "
              "stays as it is) instead of in place.")
@click.option("--from-copies", type=click.Path(path_type=Path),
              help="Restore from the verified offsite copies in this directory (on the "
              "controller's host: brought back from the offsite host) instead of the "
              "local snapshots.")
@click.option("--yes", is_flag=True, help="Do not ask before replacing the live data.")
def restore(volume: str, at_text: str | None, into: str | None, from_copies: Path | None,
            yes: bool) -> None:
    """Put VOLUME back as of --at: in place (its consumers stopped, the current data
    kept as a snapshot, the copy swapped in, the consumers started) or --into a new
    volume."""
    at = _at(at_text)
    if into is None and not yes:
        click.confirm(f"Replace {volume}'s live data (it is kept as a snapshot)?",
                      abort=True)
    lines = Client().stream(f"/v1/backups/{volume}/restore", "POST",
                            {"at": at, "into": into,
                             "from_copies": str(from_copies.resolve()) if from_copies
                             else None})
    done = _follow(lines, RESTORE_STEPS if into is None else 3, f"restoring {volume}")
    step(f"Restored {done['volume']} from {done['source']} in {done['seconds']:.2f} s "
         f"at {done['path']}")
    if done.get("kept"):
        step(f"The replaced data is kept as {done['kept']}")


@backup.command("verify")
@click.argument("volume")
@click.option("--at", "at_text", help="Which snapshot, by time (default: the newest).")
@click.option("--copies", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="On the offsite host: check its copy in this directory instead (every "
              "file hashed again; a PostgreSQL copy started as this user), no API.")
def verify(volume: str, at_text: str | None, copies: Path | None) -> None:
    """Check a snapshot against its checksums; a PostgreSQL one is also started in a
    scratch directory and queried."""
    if copies is not None:
        from datetime import datetime

        from backup import offsite
        when = datetime.fromisoformat(_at(at_text) or "") if at_text else None
        with console.status(f"checking the copy of {volume} in {copies}"):
            checked = offsite.check_copy(copies, volume, when)
        step(f"{checked.copy.name}: {checked.files} files match the manifest")
        if checked.databases is not None:
            step(f"PostgreSQL started from it in {checked.start_seconds:.2f} s; "
                 f"databases: {', '.join(checked.databases)}")
        return
    at = _at(at_text)
    done = _follow(Client().stream(f"/v1/backups/{volume}/verify", "POST", {"at": at}),
                   VERIFY_STEPS, f"verifying {volume}")
    files = done.get("files")
    step(f"{done['snapshot']}: " + (f"{files} files match the manifest" if files is not None
                                    else done.get("note", "no manifest")))
    if "databases" in done:
        step(f"PostgreSQL started from it in {done['start_seconds']:.2f} s; databases: "
             + ", ".join(done["databases"]))


@backup.command("prune")
@click.option("--dry-run", is_flag=True, help="Say what would go and why; delete nothing.")
@click.option("--volume", help="Only this volume.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(dry_run: bool, volume: str | None, as_json: bool) -> None:
    """Apply the retention policy now (beat does it on its schedule)."""
    out = Client(timeout=3600).post("/v1/backups/prune",
                                    {"dry_run": dry_run, "volume": volume})
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    step(f"Policy {out['policy']}" + (" (dry run: nothing deleted)" if dry_run else ""))
    for name, decisions in out["volumes"].items():
        if out.get("policies", {}).get(name, out["policy"]) != out["policy"]:
            step(f"{name}: policy {out['policies'][name]}")
        for d in decisions:
            verb = "keep " if d["keep"] else ("would prune " if dry_run else "pruned ")
            click.echo(f"{name}: {verb}{d['snapshot']}: {d['why']}")


@backup.command("pull")
@click.option("--from", "source", help="The served host's read-only rsync module, "
              "rsync://HOST[:PORT]/MODULE (the rsync flavour).")
@click.option("--forced-command", help="The command reaching the served host's forced "
              "command (btrfs flavour), e.g. 'ssh -i KEY backup@served'; the request is "
              "appended, or put where {request} is.")
@click.option("--copies", type=click.Path(path_type=Path), required=True,
              help="This host's directory of copies.")
@click.option("--password-file", type=click.Path(path_type=Path, exists=True),
              help="The rsync module's password file.")
@click.option("--address", help="This (offsite) host's own address to pull from, the one "
              "the served host's module allows (rsync flavour).")
@click.option("--rehash", is_flag=True, help="Hash every file of each new copy, also "
              "those sharing blocks with the previous verified copy.")
def pull(source: str | None, forced_command: str | None, copies: Path,
         password_file: Path | None, address: str | None, rehash: bool) -> None:
    """On the offsite host: pull every new snapshot, verify each against its manifest.
    An interrupted pull never replaces a complete copy."""
    from backup import btrfs, offsite
    if bool(source) == bool(forced_command):
        raise BerthError("give one of --from (rsync module) or --forced-command (btrfs)",
                         "see `berth backup pull --help`", code="usage", status=400)
    copies.mkdir(parents=True, exist_ok=True, mode=0o700)
    pulled: list[offsite.Pulled] = []
    if forced_command:
        if not btrfs.is_btrfs(copies):
            raise BerthError(f"{copies} is not on btrfs: a btrfs pull receives subvolumes",
                             "put --copies on btrfs, or pull with --from (rsync)",
                             code="not_btrfs", status=400)
        template = shlex.split(forced_command)

        def remote(request: list[str]) -> list[str]:
            if any("{request}" in part for part in template):
                return [p.replace("{request}", shlex.join(request)) for p in template]
            return [*template, *request]
        step("Pulling with btrfs send/receive (incremental against the newest copy)")
        with console.status("receiving and verifying"):
            pulled = offsite.pull_btrfs(remote, copies, rehash=rehash)
    else:
        assert source is not None
        step("Pulling with rsync --link-dest (unchanged files are links to the last copy)")
        have = {p.name for p in offsite.complete_copies(copies)}
        todo = [n for n in offsite.list_remote(source, password_file=password_file,
                                               address=address) if n not in have]
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("pulling", total=len(todo))
            for name in sorted(todo, key=lambda n: n.rsplit("@", 1)[1]):
                bar.update(task, description=name)
                pulled.append(offsite.pull(source, name, copies, password_file=password_file,
                                           address=address, rehash=rehash))
                bar.advance(task)
    for p in pulled:
        step(f"{p.name}: {p.bytes_received / 1e6:.2f} MB in {p.seconds:.2f} s, verified"
             + (f" (incremental on {p.previous.name})" if p.previous else ""))
    if not pulled:
        step("Nothing new to pull")
