"""What the controller's loop does for one-off runs (controller/runs.py holds the runs).

`start` is the controller's internal API for a run (thread-safe: it reads the store
and hands the run to the loop); everything else runs on the loop thread, which
alone touches the attach socket: `step` places queued runs on runners (preferring a
host that runs the app's release already, whose venv is warm), passes each client's
input, resizes and signals on, acknowledges output the sink delivered, ends runs
whose client went away or never came, and fails runs whose runner was lost or no
longer lists them; `on_message` takes what runners send on the attach channel.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from controller import appenv
from controller.commands import Command
from controller.errors import Conflict, Invalid, no_runner, runner_lost
from controller.runs import (
    ATTACH_WAIT,
    LOST_AFTER,
    NO_RUNNER_WAIT,
    START_TIMEOUT,
    Attachment,
    Callbacks,
    Run,
    Runs,
    RunState,
    Sink,
    new_run_id,
)
from controller.store import Release
from messaging import runframes
from messaging.envelope import Message, make, pack_bytes, unpack_bytes
from messaging.errors import BerthError
from messaging.shapes import HostReport, Limits, RunItem, State

if TYPE_CHECKING:
    from controller.daemon import Controller

log = logging.getLogger(__name__)

MAX_COMMAND = 10000         # characters in a run's command
END_RETRY = 10.0            # seconds between run_end to a host for a run nobody carries


class RunLoop:
    def __init__(self, controller: Controller, send: Callable[[str, Message], None],
                 wake: Callable[[], None]) -> None:
        self.c = controller
        self._send = send           # (host, message) on the attach socket
        self.wake = wake
        self.runs = Runs(wake)
        self._ends_sent: dict[tuple[str, str], float] = {}   # (host, run) -> when

    # ---- the internal API (any thread) --------------------------------------------------
    def start(self, app: str, command: str, *, release: int | None = None,
              tty: bool = False, cols: int = 80, rows: int = 24, detach: bool = False,
              env: dict[str, str] | None = None, timeout: float | None = None,
              sink: Sink | None = None,
              on_output: Callable[[str, bytes], None] | None = None,
              on_exit: Callable[[Run], None] | None = None,
              candidate: Release | None = None) -> Run:
        """Start `command` once in the app's release (default: the current one), on a
        runner, as the app's instances run. Output goes to `sink`, or to `on_output`
        (stream, bytes) and the end to `on_exit(run)`, both on the loop thread; a
        detached run's output goes to the app's logs. `candidate` is a release not
        made yet (the release phase runs the new code before it exists)."""
        store = self.c.store
        store.require_app(app)
        if candidate is not None:
            rel: Release | None = candidate
        else:
            rel = store.release(app, release) if release is not None \
                else store.current_release(app)
        if rel is None or not rel.slug:
            raise Conflict(f"app '{app}' has no code to run yet",
                           f"push it first with `berth push -a {app}`")
        if not command.strip() or len(command) > MAX_COMMAND:
            raise Invalid("give a command to run (at most 10000 characters)",
                          f"e.g. `berth run -a {app} -- python manage.py migrate`")
        for name, value in (("cols", cols), ("rows", rows)):
            if not 1 <= value <= 0xFFFF:
                raise Invalid(f"{name} must be from 1 to 65535, got {value}")
        s = self.c.settings
        limit = s.run_detached_max_seconds if detach else s.run_max_seconds
        limits = store.limits(app)
        # the environment, interpreter and limits its instances get
        names = appenv.hostnames(app, s.base_domain, store.domains(app).get(app, []))
        run = Run(id=new_run_id(), app=app, release=rel.version, slug=rel.slug,
                  command=command,
                  env={**appenv.instance_env(rel.config, rel.manifest, names), **(env or {})},
                  sink=sink or Callbacks(on_output, on_exit), tty=tty and not detach,
                  cols=cols, rows=rows, detach=detach,
                  timeout=min(timeout, limit) if timeout else limit,
                  memory_mb=limits.get("memory_mb") or rel.manifest.memory_mb,
                  pids_max=limits.get("pids_max"), manifest=rel.manifest.to_wire())
        if isinstance(run.sink, Attachment):
            run.sink.wake = self.wake
        self.runs.submit(run)
        log.info("run submitted", extra={"app": app, "run": run.id, "release": rel.version,
                                         "detach": detach, "tty": run.tty})
        return run

    def attachment(self, run_id: str) -> Attachment:
        """The run's client end, claimed once (any thread)."""
        run = self.runs.lookup(run_id)
        if run is None:
            raise BerthError(f"run {run_id} not found",
                             "runs can be attached to only while they run, and only by "
                             "the `berth run` that started them", code="not_found",
                             status=404)
        if not isinstance(run.sink, Attachment) or not run.sink.claim():
            raise Conflict(f"run {run_id} has a client already, or is detached",
                           "see its output with `berth logs`")
        return run.sink

    # ---- the loop ----------------------------------------------------------------------
    def step(self, now: float) -> None:
        self.runs.take_new(now)
        observed = self.c.observed(now)
        for run in self.runs.in_state(RunState.QUEUED):
            self._place(run, observed, now)
        listed = {(h, r.run): r for h, report in observed.items() for r in report.runs}
        for run in list(self.runs.active.values()):
            if run.done:
                continue
            if run.host is not None:
                self._pump(run, now)
            self._watch(run, observed, listed, now)
        self._end_strays(listed, now)
        self.runs.forget_done(now)

    def _place(self, run: Run, observed: dict[str, HostReport], now: float) -> None:
        observed = {h: r for h, r in observed.items() if r.runs_apps}
        if not observed:
            if now - run.queued_at > NO_RUNNER_WAIT:
                self._over(run, now, error=no_runner())
            return

        def score(host: str) -> tuple[int, int, int]:
            inv = observed[host].inventory
            mine = [i for i in inv if i.app == run.app]
            return (-any(i.release == run.release for i in mine), -len(mine), len(inv))
        host = min(sorted(observed), key=score)
        limits = Limits(memory_mb=run.memory_mb, pids_max=run.pids_max)
        self.c.commands.send(
            host, "run",
            {"run": run.id, "app": run.app, "release": run.release, "command": run.command,
             "env": run.env, "slug": run.slug, "slug_url": self.c.slug_url(run.slug),
             "tty": run.tty, "cols": run.cols, "rows": run.rows, "detach": run.detach,
             "timeout": run.timeout, "limits": limits.to_wire(), "manifest": run.manifest},
            subject=run.id, now=now, on_error=functools.partial(self._refused, run))
        run.sent(host, now)
        log.info("run placed", extra={"app": run.app, "run": run.id, "runner": host})

    def _refused(self, run: Run, cmd: Command, err: BerthError, body: dict[str, Any]) -> None:
        if not run.done:
            self._over(run, cmd.sent_at, error=err)

    def _pump(self, run: Run, now: float) -> None:
        """Client -> runner: input, size, signals, hang-up; output acknowledgements."""
        assert run.host is not None
        delivered = run.sink.delivered()
        if delivered:
            self._send(run.host, make("run_ack", self.c.settings.host_id, run=run.id,
                                      bytes=delivered))
        att = run.sink if isinstance(run.sink, Attachment) else None
        if att is None or run.end_sent:
            return
        for event in att.take_input():
            if event.kind == runframes.STDIN:
                run.input_in_flight += len(event.data)
                msg = make("run_input", self.c.settings.host_id, run=run.id,
                           data=pack_bytes(event.data))
            elif event.kind == runframes.STDIN_EOF:
                msg = make("run_input", self.c.settings.host_id, run=run.id, data="",
                           eof=True)
            elif event.kind == runframes.RESIZE:
                msg = make("run_resize", self.c.settings.host_id, run=run.id,
                           cols=event.cols, rows=event.rows)
            else:
                msg = make("run_signal", self.c.settings.host_id, run=run.id,
                           signal=event.signal)
            self._send(run.host, msg)
        if run.detach:
            return
        if att.gone():
            self._end(run, "the client went away")
        elif not att.claimed and now - run.queued_at > ATTACH_WAIT:
            self._end(run, f"no client attached within {ATTACH_WAIT:g}s")

    def _end(self, run: Run, reason: str) -> None:
        assert run.host is not None
        run.end_sent = True
        self._send(run.host, make("run_end", self.c.settings.host_id, run=run.id,
                                  reason=reason))
        log.info("ending run", extra={"app": run.app, "run": run.id, "reason": reason})

    def _watch(self, run: Run, observed: dict[str, HostReport],
               listed: dict[tuple[str, str], RunItem], now: float) -> None:
        if run.state is RunState.QUEUED:
            return
        assert run.host is not None
        if run.host not in observed:
            self._over(run, now, error=runner_lost(run.host))
            return
        if (run.host, run.id) in listed:
            run.seen_at = now
        if run.state is RunState.STARTING and now - run.sent_at > START_TIMEOUT:
            self._end(run, "it did not start in time")
            self._over(run, now, error=BerthError(
                f"run {run.id} did not start within {START_TIMEOUT:g}s on {run.host}",
                "see the app's logs (`berth logs`) for its build output",
                code="timeout", status=503))
        elif run.state is RunState.RUNNING and now - run.seen_at > LOST_AFTER:
            self._over(run, now, error=BerthError(
                f"runner {run.host} no longer has run {run.id}",
                "the runner restarted; start the command again", code="run_lost",
                status=503))

    def _end_strays(self, listed: dict[tuple[str, str], RunItem], now: float) -> None:
        """An attached run no one here carries (the controller restarted) has no
        client: end it. Detached ones run on and show in `berth ps`."""
        for (host, run_id), item in listed.items():
            if item.detach or self.runs.lookup(run_id) is not None:
                continue
            if now - self._ends_sent.get((host, run_id), -END_RETRY) >= END_RETRY:
                self._ends_sent[(host, run_id)] = now
                self._send(host, make("run_end", self.c.settings.host_id, run=run_id,
                                      reason="no client: the controller restarted"))
        for key in set(self._ends_sent) - set(listed):
            del self._ends_sent[key]

    def _over(self, run: Run, now: float, code: int = 1, reason: str = "",
              error: BerthError | None = None) -> None:
        if error is not None:
            run.fail(now, error)
        else:
            run.exited(now, code, reason)
        run.sink.ended(run)
        log.info("run over", extra={"app": run.app, "run": run.id, "code": run.code,
                                    "state": run.state.value, "reason": run.reason})

    # ---- from runners ------------------------------------------------------------------
    def on_message(self, msg: Message, now: float) -> None:
        run = self.runs.active.get(str(msg.get("run", "")))
        if run is None or run.done:
            return
        if msg.type == "run_started":
            run.started(now)
        elif msg.type == "run_output":
            run.started(now)
            run.sink.output(str(msg["stream"]), unpack_bytes(msg["data"]))
        elif msg.type == "run_exit":
            error = msg.get("error")
            if error:
                self._over(run, now, error=BerthError.from_dict(error, status=503))
            else:
                self._over(run, now, int(msg["code"]), str(msg.get("reason") or ""))
        elif msg.type == "run_ack":
            n = int(msg["bytes"])
            run.input_in_flight = max(0, run.input_in_flight - n)
            if isinstance(run.sink, Attachment):
                run.sink.input_acked(n)

    # ---- what `berth ps` shows ------------------------------------------------------------
    def items(self, observed: dict[str, HostReport]) -> list[RunItem]:
        """Runs as their hosts report them, and those no host reports yet."""
        reported = [r for report in observed.values() for r in report.runs]
        known = {r.run for r in reported}
        for run in list(self.runs.active.values()):
            if run.id not in known and not run.done:
                reported.append(RunItem(run=run.id, app=run.app, release=run.release,
                                        command=run.command, state=State.PENDING,
                                        detach=run.detach, tty=run.tty, since=run.wall,
                                        host=run.host or ""))
        return reported
