"""`berth up` / `berth down`: the platform on one machine for a newcomer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.markup import escape

from cli import credentials
from cli.localplatform import LocalPlatform, Ports
from cli.output import err_console, step
from cli.supervisor import Supervisor
from messaging.channels import API_PORT, BALANCER_PORT
from messaging.errors import BerthError

PIDFILE = "up.pid"


@click.command()
@click.option("--data-dir", default=".berth-data", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where state, slugs, virtualenvs and logs live; reuse it to resume.")
@click.option("--port", default=BALANCER_PORT, show_default=True,
              help="Balancer port on 127.0.0.1.")
@click.option("--api-port", default=API_PORT, show_default=True,
              help="Controller API port; the ZeroMQ channels take the ports after it.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; stop with `berth down`.")
def up(data_dir: Path, port: int, api_port: int, detach: bool) -> None:
    """Start controller, runner and balancer here and keep them up (one that dies is
    restarted, with backoff); Ctrl-C stops them all."""
    data_dir = data_dir.resolve()
    running = _running_pid(data_dir)
    if running:
        raise BerthError(f"berth up is already running from {data_dir} (pid {running})",
                         f"use it as it is, or stop it with `berth down --data-dir {data_dir}`")
    if detach:
        return _detach(data_dir, port, api_port)
    platform = LocalPlatform(data_dir, Ports.after_api(api_port, balancer=port))
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        platform.start()
        path = credentials.save(platform.api_url, platform.admin_token)
        (data_dir / PIDFILE).write_text(str(os.getpid()))
        step(f"Berth is up: balancer http://127.0.0.1:{port}  API {platform.api_url}")
        step(f"Admin token saved in {path}; state in {data_dir}")
        step("Push an app: berth apps create hello && berth push examples/hello")
        step("Started " + ", ".join(f"{name} (pid {proc.pid})"
                                    for name, proc in platform.procs.items()))
        step("Ctrl-C stops everything; a process that dies is restarted")
        supervisor = Supervisor(platform, step, _shout)
        while not stopping:
            supervisor.step()
            time.sleep(0.1)
    finally:
        if platform.procs:
            step("Stopping balancer, runner and controller...")
        platform.stop()
        pidfile = data_dir / PIDFILE
        if pidfile.exists() and pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()            # only ours: a refused second `up` leaves it alone


def _shout(text: str) -> None:
    err_console.print(f"[bold red]Error:[/] {escape(text)}", markup=True, soft_wrap=True,
                      highlight=False)


def _running_pid(data_dir: Path) -> int | None:
    pidfile = data_dir / PIDFILE
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _detach(data_dir: Path, port: int, api_port: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "up.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--data-dir", str(data_dir),
                             "--port", str(port), "--api-port", str(api_port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    pidfile = data_dir / PIDFILE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (data_dir / "up.log").read_text(errors="replace").splitlines()[-15:]
            raise BerthError("berth up failed to start:\n" + "\n".join(tail),
                             f"see {data_dir / 'up.log'}")
        if pidfile.exists() and pidfile.read_text().strip() == str(proc.pid):
            step(f"Berth is up in the background (pid {proc.pid}); balancer "
                 f"http://127.0.0.1:{port}; stop it with `berth down --data-dir {data_dir}`")
            return
        time.sleep(0.2)
    proc.terminate()
    raise BerthError("berth up did not become ready within 90s", f"see {data_dir / 'up.log'}")


@click.command()
@click.option("--data-dir", default=".berth-data", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def down(data_dir: Path) -> None:
    """Stop a `berth up --detach` running from DATA_DIR."""
    pidfile = data_dir.resolve() / PIDFILE
    if not pidfile.exists():
        raise BerthError(f"no running `berth up` found in {data_dir}",
                         "pass the --data-dir you started it with")
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        step("It had already stopped.")
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            step("Berth stopped.")
            return
        time.sleep(0.2)
    raise BerthError(f"berth up (pid {pid}) did not stop within 60s",
                     f"look at {data_dir / 'up.log'}; `kill {pid}` ends it")
