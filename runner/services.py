"""The addon servers this host supervises: PostgreSQL nodes, PgBouncers, Redis nodes
and Sentinels (messaging.shapes.ServiceSpec), each an `Instance` of runner/process.py,
so a server that dies is restarted with backoff and gives up (FATAL) exactly as an
app instance does, and the tenant's log hears it.

What differs from an app instance, and why:
- No slug, no venv, no gunicorn: the spec's argv runs in the foreground (PostgreSQL
  `postgres -D`, `pgbouncer <ini>`, `redis-server <conf> --daemonize no`), as the
  spec's system user (`setpriv`; PostgreSQL refuses root), in its own session.
- Its output goes straight to the spec's log file, not through a pipe the runner
  reads: a database server must not block on a full pipe while its runner is being
  restarted.
- Adoption by pidfile: the provisioner made and started the server (initdb, roles,
  replication need it running); `serve` finds that process through the pidfile
  (checked by /proc/<pid>/exe) and watches it through a pidfd instead of starting a
  second one. A restarted runner adopts what the last one started the same way,
  when the controller sends `serve` again.
- Stopping uses the spec's signal (PostgreSQL: SIGINT, a fast shutdown; SIGTERM
  would wait for PgBouncer's connections to end).
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from messaging.errors import BerthError
from messaging.shapes import InventoryItem, ServiceSpec, State
from runner.adopt import AdoptedProcess
from runner.jobs import Pool
from runner.process import (
    Hooks,
    Instance,
    InstanceSpec,
    Policy,
    ProcessOps,
    SpawnRequest,
    SpawnResult,
    do_spawn,
)

log = logging.getLogger(__name__)

SETPRIV = "/usr/bin/setpriv"


class ServiceOps(ProcessOps):
    """Spawn with output to the log file; signal the process itself when it does not
    lead a process group (an adopted daemon that never called setsid)."""

    def __init__(self, log_file: str) -> None:
        self.log_file = log_file

    def spawn(self, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(self.log_file or os.devnull, "ab")
        try:
            return subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            out.close()

    def signal_group(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            try:
                os.kill(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        except PermissionError:
            pass


def running_from_pidfile(spec: ServiceSpec) -> AdoptedProcess | None:
    """The live process the spec's pidfile names, when it is the spec's program."""
    if not spec.pidfile:
        return None
    try:
        first = Path(spec.pidfile).read_text().split("\n", 1)[0].strip()
        pid = int(first)
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        # checked once the pidfd pins it: a reused pid fails here
        if os.path.realpath(f"/proc/{pid}/exe") != os.path.realpath(spec.argv[0]):
            raise ProcessLookupError(pid)
    except OSError:
        os.close(pidfd)
        return None
    return AdoptedProcess(pid, pidfd, open(os.devnull, "rb"), open(os.devnull, "rb"))


def spawn_or_adopt(spec: ServiceSpec, ops: ProcessOps, request: SpawnRequest) -> SpawnResult:
    """Start the server, unless its pidfile names one already running (the
    provisioner started it again meanwhile): then that one is watched, and no second
    server fails on the taken port and data dir. Safe in any thread."""
    found = running_from_pidfile(spec)
    if found is not None:
        return SpawnResult(request.generation, found)
    return do_spawn(ops, request)


def command_of(spec: ServiceSpec) -> str:
    """The spec's argv as the shell command an Instance runs (with exec semantics),
    switched to its user when we are root."""
    argv = list(spec.argv)
    if os.geteuid() == 0 and spec.user != "root":
        argv = [SETPRIV, f"--reuid={spec.user}", f"--regid={spec.user}", "--init-groups",
                "--", *argv]
    return shlex.join(argv)


class Services(Hooks):
    """The table of supervised servers, owned by the runner's loop thread like its
    instances. Spawns go to the runner's spawn pool; their results come back as
    JobDone events tagged ("service_spawn", ...), which the daemon hands to
    `spawn_done`."""

    def __init__(self, policy: Policy, instances_dir: Path, spawns: Pool,
                 emit: Callable[[Instance, str], None]) -> None:
        self.policy = policy
        self.instances_dir = instances_dir
        self.spawns = spawns
        self.emit = emit
        self.table: dict[str, Instance] = {}
        self.specs: dict[str, ServiceSpec] = {}

    def serve(self, spec: ServiceSpec) -> dict[str, Any]:
        existing = self.table.get(spec.id)
        if existing is not None and existing.state is not State.STOPPING:
            self.specs[spec.id] = spec          # the next restart uses the newest
            return {"accepted": True, "existing": True, "state": existing.state.value}
        if existing is not None:
            raise BerthError(f"service {spec.id} is still stopping",
                             "send serve again once it left the heartbeat",
                             code="busy", status=409)
        inst = Instance(
            InstanceSpec(instance=spec.id, app=spec.app, release=0, proc=spec.kind,
                         command=command_of(spec), env={}, slug="", slug_url="",
                         stop_signal=getattr(signal, f"SIG{spec.stop_signal}")),
            self.policy, self.instances_dir / spec.id, ops=ServiceOps(spec.log_file),
            hooks=self)
        self.table[spec.id] = inst
        self.specs[spec.id] = spec
        bin_dir, cwd = Path(spec.argv[0]).parent, Path(spec.cwd)
        found = running_from_pidfile(spec)
        if found is not None:
            inst.adopt(found, spec.port, cwd, bin_dir, False, None, None, 0, 0, True)
        else:
            inst.prepared(cwd, bin_dir, False)
        log.info("serving", extra={"service": spec.id, "addon": spec.addon,
                                   "app": spec.app, "adopted": found is not None,
                                   "state": inst.state.value})
        return {"accepted": True, "adopted": found is not None}

    def unserve(self, service: str, grace: float | None) -> dict[str, Any]:
        inst = self.table.get(service)
        if inst is None:
            return {"stopping": False, "known": False}
        inst.stop(grace)
        return {"stopping": True, "known": True}

    def stop_all(self, grace: float) -> None:
        for inst in self.table.values():
            inst.stop(grace)

    def step(self) -> bool:
        """Tick every server; forget the stopped ones. True when a heartbeat is due."""
        changed = False
        for inst in list(self.table.values()):
            changed |= inst.tick()
            if inst.state is State.STOPPED:
                del self.table[inst.id]
                self.specs.pop(inst.id, None)
                changed = True
        return changed

    def items(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for inst in self.table.values():
            spec = self.specs.get(inst.id)
            item: InventoryItem = inst.inventory()
            if spec is not None:
                item = replace(item, address=spec.address, port=spec.port)
            out.append(item.to_wire())
        return out

    def kill_all(self) -> None:
        for inst in self.table.values():
            if inst.proc is not None:
                inst.ops.signal_group(inst.proc.pid, signal.SIGKILL)
                inst.ops.reap(inst.proc)

    # -- Hooks ------------------------------------------------------------------
    def spawn(self, inst: Instance, request: SpawnRequest) -> None:
        spec = self.specs[inst.id]
        self.spawns.submit(("service_spawn", inst, request.generation), spawn_or_adopt,
                           spec, inst.ops, request)

    def spawn_done(self, inst: Instance, result: SpawnResult) -> None:
        awaited = self.table.get(inst.id) is inst and inst.spawn_done(result)
        if not awaited and result.proc is not None:     # nobody waits for it: end it
            inst.ops.signal_group(result.proc.pid, signal.SIGKILL)
            inst.ops.reap(result.proc)

    def event(self, inst: Instance, text: str) -> None:
        self.emit(inst, text)
