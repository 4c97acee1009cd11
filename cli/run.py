"""`berth run [--no-tty] [--detach] [-a APP] -- COMMAND...`: a one-off command in the
app's current release (its code, venv, config and user, in a jail with the app's
limits) on a runner.

With a local terminal the command gets a remote one: the local terminal goes raw
(restored on every way out), keys go to the remote terminal as they are typed (so ^C
interrupts the remote foreground job, not this CLI), window size changes follow
(SIGWINCH), and the command's exit code is this command's (128+N for death by
signal N). Without one (stdin not a terminal, or --no-tty) stdin, stdout and stderr
stay apart, stdin's EOF reaches the command and ^C is passed on as SIGINT.
--detach returns at once with the run's name; its output goes to `berth logs`.

The session is the frames of messaging/runframes.py over an upgraded API connection.
All sending happens on the main thread (signal handlers only note what happened and
wake it through a pipe); one thread writes what arrives to stdout/stderr.
"""
from __future__ import annotations

import os
import select
import shlex
import signal
import socket
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from cli import appname
from cli.client import Client
from cli.output import err_console
from messaging import runframes
from messaging.errors import BerthError, ProtocolError

READ_SIZE = 16 * 1024


def command_line(words: tuple[str, ...]) -> str:
    """One word is taken as shell code (`berth run 'a && b'`); several are quoted."""
    return words[0] if len(words) == 1 else shlex.join(words)


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@appname.app_option
@click.option("--no-tty", is_flag=True,
              help="No remote terminal: stdin, stdout and stderr stay apart (the "
                   "default when stdin is not a terminal).")
@click.option("-d", "--detach", is_flag=True,
              help="Return at once; the output goes to `berth logs`, `berth ps` shows "
                   "the run while it runs.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(app: str | None, no_tty: bool, detach: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND once in the app's current release, e.g.
    `berth run -- python manage.py migrate` or `berth run bash`."""
    name = appname.resolve(app)
    line = command_line(command)
    use_tty = not no_tty and not detach and os.isatty(0)
    cols, rows = _size() if use_tty else (80, 24)
    client = Client()
    body: dict[str, Any] = {"command": line, "tty": use_tty, "cols": cols, "rows": rows,
                            "detach": detach}
    if use_tty and os.environ.get("TERM"):
        body["term"] = os.environ["TERM"]
    started = client.post(f"/v1/apps/{name}/runs", body)
    proc = started["proc"]
    if detach:
        click.echo(f"Running `{line}` on {name} (release v{started['release']}) as "
                   f"{proc}, detached.")
        click.echo(f"Its output: `berth logs -a {name}`; while it runs: `berth ps -a {name}`.")
        click.echo(proc)
        return
    if use_tty:
        err_console.print(f"Running `{line}` on {name} (release v{started['release']}) as "
                          f"{proc}...", markup=False, highlight=False)
    sock, leftover = client.upgrade(f"/v1/runs/{started['run']}/attach", runframes.UPGRADE)
    code = Session(sock, leftover, use_tty).run()
    sys.exit(code)


def _size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0)
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24


@contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """The local terminal in raw mode, restored however the block ends."""
    if not enabled:
        yield
        return
    saved = termios.tcgetattr(0)
    try:
        tty.setraw(0, termios.TCSADRAIN)       # keys typed ahead are kept
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


class Session:
    def __init__(self, sock: socket.socket, leftover: bytes, use_tty: bool) -> None:
        self.sock = sock
        self.leftover = leftover
        self.tty = use_tty
        self.code: int | None = None
        self.error: BerthError | None = None
        self.quit_signal: int | None = None
        self.done = threading.Event()
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def run(self) -> int:
        handled = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        if self.tty:
            handled.append(signal.SIGWINCH)
        old = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        receiver = threading.Thread(target=self._receive, name="run-output", daemon=True)
        try:
            with raw_terminal(self.tty):
                receiver.start()
                self._send_loop()
                receiver.join(5.0)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.sock.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self.quit_signal is not None:
            return 128 + self.quit_signal
        if self.error is not None:
            raise self.error
        if self.code is None:
            raise BerthError("lost the connection to the run before it ended",
                             "see `berth logs` for what it printed; the run was ended",
                             code="disconnected", status=503)
        return self.code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.done.set()

    def _send_loop(self) -> None:
        stdin_open = True
        while not self.done.is_set():
            fds = [self._wake_r] + ([0] if stdin_open else [])
            try:
                ready, _, _ = select.select(fds, [], [], 1.0)
            except InterruptedError:
                ready = []
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGWINCH:
                    self._send(runframes.resize(*_size()))
                elif signum == signal.SIGINT:
                    self._send(runframes.signal("INT"))
                else:                                   # SIGTERM / SIGHUP: we go
                    self.quit_signal = signum
                    self.done.set()
            if stdin_open and 0 in ready:
                data = os.read(0, READ_SIZE)
                if data:
                    self._send(runframes.frame(runframes.STDIN, data))
                else:
                    stdin_open = False
                    if self.tty:
                        break                           # the terminal itself went away
                    self._send(runframes.frame(runframes.STDIN_EOF))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)        # the controller ends the run
        except OSError:
            pass

    def _receive(self) -> None:
        reader = runframes.FrameReader()
        data = self.leftover
        try:
            while True:
                for kind, payload in reader.feed(data):
                    self._on_frame(kind, payload)
                if self.code is not None or self.error is not None:
                    return
                data = self.sock.recv(65536)
                if not data:
                    return
        except (OSError, ProtocolError) as exc:
            if isinstance(exc, ProtocolError):
                self.error = exc
        finally:
            self.done.set()
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        if kind == runframes.OUTPUT:
            _write_all(1, payload)
        elif kind == runframes.STDERR:
            _write_all(2, payload)
        elif kind == runframes.EXIT:
            self.code = int(runframes.parse_json(payload).get("code", 1))
        elif kind == runframes.ERROR:
            err = runframes.parse_json(payload)
            self.error = BerthError.from_dict(err, status=503)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]
