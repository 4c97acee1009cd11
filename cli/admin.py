"""`berth admin`: the platform operator's one-time chores. `init` makes the CURVE
keys of the ZeroMQ channels (messaging/curve.py): the controller's pair and one per
host, each admitted; `add-host` admits one more host (the controller re-reads its
admitted/ directory on the next connection: no restart)."""
from __future__ import annotations

from pathlib import Path

import click

from cli.output import console, step
from messaging import curve


@click.group("admin")
def admin() -> None:
    """Platform operator's set-up: CURVE keys for the ZeroMQ channels."""


@admin.command("init")
@click.option("--keys-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the keys go (0700); every daemon's keys_dir setting names it.")
@click.option("--host", "hosts", multiple=True,
              help="A runner's or balancer's host_id to make and admit a pair for "
                   "(repeat it).")
def init(keys_dir: Path, hosts: tuple[str, ...]) -> None:
    """Make the controller's pair (once) and a pair per --host, admitted."""
    made = curve.init(keys_dir, list(hosts))
    step(f"Keys in {keys_dir}: " + (", ".join(made) + " made" if made else "all there"))
    console.print(f"Set keys_dir: {keys_dir} for the controller, runners and balancers; "
                  "a host whose key is not in admitted/ is refused on every channel. "
                  "On separate machines give each host only hosts/<its name>.key* and "
                  "controller.key.")


@admin.command("add-host")
@click.option("--keys-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.argument("name")
def add_host(keys_dir: Path, name: str) -> None:
    """Make and admit a pair for host NAME."""
    if not (keys_dir / f"{curve.SERVER}.key").exists():
        raise click.ClickException(f"no controller key in {keys_dir}: run `berth admin "
                                   f"init --keys-dir {keys_dir}` first")
    made = curve.init(keys_dir, [name])
    step(f"{name} admitted" + (" (new keys)" if name in made else ""))
