"""The runner's one-off runs and their traffic on the attach channel.

Owned by the runner's loop thread, like the instances: the daemon hands it the
`run` commands it accepted, the prepared releases, the attach messages the
controller sent (input, resize, signal, end, acks), and calls `step` every turn of
the loop, which writes pending input, sends output within each run's credit window,
and, once a run has exited and its output is out, sends run_exit and forgets it.
`send` returns False when the socket cannot take a message now (it is retried);
nothing here blocks.
"""
from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from messaging.envelope import Message, make, pack_bytes, unpack_bytes
from messaging.errors import ProtocolError
from messaging.shapes import Limits as WireLimits
from messaging.shapes import State
from runner.errors import CommandError
from runner.isolation import InstanceJail
from runner.jobs import Jobs, OutputLine
from runner.runs import Mode, Run, RunSpec

log = logging.getLogger(__name__)

MAX_TIMEOUT = 7 * 24 * 3600.0


def spec_from_args(args: dict[str, Any]) -> RunSpec:
    """The `run` command's args, checked."""
    def text(name: str) -> str:
        value = args[name]
        if not isinstance(value, str) or not value:
            raise CommandError(f"run arg {name!r} must be a non-empty string")
        return value

    def number(name: str, default: float, low: float, high: float) -> float:
        value = args.get(name, default)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not low <= value <= high:
            raise CommandError(f"run arg {name!r} must be a number from {low:g} to {high:g}")
        return float(value)

    release = args["release"]
    if not isinstance(release, int) or isinstance(release, bool):
        raise CommandError("run arg 'release' must be an integer")
    env = args["env"]
    if not isinstance(env, dict):
        raise CommandError("run arg 'env' must be a mapping of config vars")
    try:
        limits = WireLimits.from_wire(args.get("limits"))
    except ProtocolError as exc:
        raise CommandError(f"run arg 'limits' is wrong: {exc.message}") from exc
    run = text("run")
    if not run.replace("-", "").isalnum():
        raise CommandError(f"run id {run!r} must be letters, digits and dashes")
    mode = Mode.DETACHED if args.get("detach") else Mode.TTY if args.get("tty") \
        else Mode.PIPES
    return RunSpec(
        run=run, app=text("app"), release=release, command=text("command"),
        env={str(k): str(v) for k, v in env.items()}, slug=text("slug"),
        slug_url=text("slug_url"), mode=mode,
        cols=int(number("cols", 80, 1, 0xFFFF)), rows=int(number("rows", 24, 1, 0xFFFF)),
        timeout=number("timeout", 3600.0, 1, MAX_TIMEOUT),
        memory_mb=limits.memory_mb, pids_max=limits.pids_max)


class Runs:
    def __init__(self, host: str, send: Callable[[Message], bool], jobs: Jobs,
                 wake: Callable[[], None], grace: float,
                 clock: Callable[[], float] = time.monotonic,
                 marks: Path | None = None) -> None:
        self.host = host
        # a dir per spawned run (the runner's instances dir): a restarted runner ends
        # the processes of the runs a killed one left (runner/leftovers.py)
        self.marks = marks
        self._send = send
        self.jobs = jobs
        self.wake = wake
        self.grace = grace
        self.clock = clock
        self.table: dict[str, Run] = {}
        self._acks: dict[str, int] = {}         # input bytes written, to acknowledge
        self._outbox: list[Message] = []        # control-ish messages not yet sent

    # ---- from the daemon ------------------------------------------------------------
    def add(self, spec: RunSpec) -> Run | None:
        """A new run (PREPARING), or None when one with that id is known already."""
        if spec.run in self.table:
            return None
        run = Run(spec, self.clock(), time.time())
        self.table[spec.run] = run
        return run

    def prepared(self, run: Run, release_dir: Path, venv_bin: Path | None,
                 data_dir: Path | None, jail: InstanceJail,
                 env: dict[str, str] | None = None) -> None:
        if self.table.get(run.id) is not run or run.state is not State.PREPARING:
            jail.remove()               # ended while preparing
            return
        if env:
            run.spec = replace(run.spec, env={**run.spec.env, **env})
        try:
            if self.marks is not None:
                (self.marks / run.spec.instance).mkdir(exist_ok=True)
            run.spawn(release_dir, venv_bin, data_dir, jail, self.wake)
        except (OSError, ValueError) as exc:
            jail.remove()
            self.failed(run, CommandError(f"cannot start `{run.spec.command}`: {exc}",
                                          "check the command", code="run_failed").to_dict())
            return
        if run.spec.mode is Mode.DETACHED:
            assert run.proc is not None and run.proc.stdout and run.proc.stderr
            for stream, pipe in (("stdout", run.proc.stdout), ("stderr", run.proc.stderr)):
                self.jobs.read_lines(pipe, functools.partial(_line, run=run, stream=stream))
        self._platform(run, f"{run.spec.proc} started ({run.spec.mode.value}): "
                            f"{run.spec.command}")
        self._queue(make("run_started", self.host, run=run.id, pid=run.pid or 0))

    def failed(self, run: Run, error: dict[str, Any]) -> None:
        """It never started: STOPPED with an error, reported on the next step."""
        if self.table.get(run.id) is not run:
            return
        run.state, run.error, run.code = State.STOPPED, error, 1
        run.reason = str(error.get("message", "failed"))

    def on_message(self, msg: Message) -> None:
        run = self.table.get(str(msg.get("run", "")))
        if run is None:
            if msg.type == "run_input":     # free the sender's window all the same
                self._queue(make("run_ack", self.host, run=msg["run"],
                                 bytes=len(unpack_bytes(msg["data"]))))
            return
        if msg.type == "run_input":
            run.feed(unpack_bytes(msg["data"]), bool(msg.get("eof")))
        elif msg.type == "run_resize":
            run.resize(int(msg["cols"]), int(msg["rows"]))
        elif msg.type == "run_signal":
            run.send_signal(str(msg["signal"]))
        elif msg.type == "run_end":
            run.end(self.clock(), self.grace, str(msg.get("reason") or "ended by the "
                                                   "controller"))
        elif msg.type == "run_ack":
            run.acked(int(msg["bytes"]))

    def end(self, now: float, reason: str, *, app: str | None = None,
            attached_only: bool = False, grace: float | None = None) -> None:
        for run in self.table.values():
            if (app is None or run.spec.app == app) and \
                    not (attached_only and run.spec.mode is Mode.DETACHED):
                run.end(now, self.grace if grace is None else grace, reason)

    def of_app(self, app: str) -> list[Run]:
        return [r for r in self.table.values() if r.spec.app == app]

    def items(self) -> list[dict[str, Any]]:
        return [r.item().to_wire() for r in self.table.values()]

    # ---- every turn of the loop --------------------------------------------------------
    def step(self, now: float) -> bool:
        """True when a run started or ended (a heartbeat should say so)."""
        changed = False
        for run in list(self.table.values()):
            before = run.state
            run.tick(now, self.grace)
            written = run.write_input()
            if written:
                self._acks[run.id] = self._acks.get(run.id, 0) + written
            self._flush_output(run)
            if run.drained(now):
                self._finish(run)
                changed = True
            changed |= run.state is not before
        for run_id, n in list(self._acks.items()):
            self._queue(make("run_ack", self.host, run=run_id, bytes=n))
        self._acks.clear()
        self._flush_outbox()
        return changed

    def _flush_output(self, run: Run) -> None:
        if run.spec.mode is Mode.DETACHED or self._outbox:
            return                      # keep order: earlier messages first
        chunks = run.take_output()
        for i, (stream, data) in enumerate(chunks):
            msg = make("run_output", self.host, run=run.id, data=pack_bytes(data),
                       stream=stream)
            if not self._send(msg):
                run.unsent(chunks[i:])
                return

    def _finish(self, run: Run) -> None:
        run.finish()
        del self.table[run.id]
        if self.marks is not None:
            shutil.rmtree(self.marks / run.spec.instance, ignore_errors=True)
        code = run.code if run.code is not None else 1
        fields: dict[str, Any] = {"run": run.id, "code": code, "reason": run.reason}
        if run.error is not None:
            fields["error"] = run.error
        self._platform(run, f"{run.spec.proc} {run.reason}" if run.error is None
                       else f"{run.spec.proc} failed: {run.reason}")
        self._queue(make("run_exit", self.host, **fields))
        log.info("run over", extra={"app": run.spec.app, "run": run.id, "code": code,
                                    "reason": run.reason})

    def _queue(self, msg: Message) -> None:
        self._outbox.append(msg)
        self._flush_outbox()

    def _flush_outbox(self) -> None:
        while self._outbox:
            if not self._send(self._outbox[0]):
                return
            self._outbox.pop(0)

    def _platform(self, run: Run, text: str) -> None:
        # through the event queue, behind the lines of a detached run's output
        self.jobs.post(OutputLine(run.spec.app, text, "platform", "stdout", run.id,
                             run.spec.release))


def _line(line: str, *, run: Run, stream: str) -> OutputLine:
    return OutputLine(run.spec.app, line, run.spec.proc, stream, run.id, run.spec.release)
