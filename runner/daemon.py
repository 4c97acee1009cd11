"""The runner daemon: one per app host.

It connects to the controller's control ROUTER (DEALER, identity = host id) and logs
PULL (PUSH), answers commands, heartbeats its full inventory every interval and
supervises instances. One thread (the loop) owns the sockets and the instances; each
`step` is bounded: poll the control socket for at most LOOP_POLL, drain at most
MAX_EVENTS events from worker threads (fewer once a heartbeat is due: the rest wait
for the next step), tick every instance, heartbeat when due. Nothing slow runs on it:
preparing (fetch, venv, cgroup) is a job, spawning is a job in a pool of
`max_parallel_spawns` threads, and cleaning up after an instance is a job.

When the controller goes away nothing changes on this host (static stability): the
instances keep running and restarting, heartbeats keep being sent for when it returns.
When the runner itself dies, its instances keep running, and the next runner on the
same data dir adopts them (runner/adopt.py) before its first heartbeat, so neither
the controller nor the balancers see them go.
"""
from __future__ import annotations

import functools
import logging
import queue
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import zmq

from messaging import curve
from messaging.channels import connect
from messaging.envelope import Message, make, recv, reply, send
from messaging.errors import BerthError, ProtocolError
from messaging.heartbeat import PeerTracker
from messaging.manifest import Manifest
from messaging.shapes import (
    Limits,
    ServiceSpec,
    State,
    static_prefix_ok,
    static_roots_to_wire,
)
from messaging.waker import Waker
from runner import actions, adopt, leftovers
from runner.addonports import AddonPorts
from runner.beat import Beat
from runner.errors import BuildError, CommandError, RunnerError
from runner.frameworks import Detected, Frameworks
from runner.health import HealthChecks, answers
from runner.interpreters import Interpreters
from runner.isolation import NOBODY, InstanceJail, Isolation
from runner.jobs import JobDone, Jobs, OutputLine
from runner.process import (
    Hooks,
    Instance,
    InstanceSpec,
    Policy,
    Process,
    SpawnRequest,
    SpawnResult,
    do_spawn,
)
from runner.retention import prune_app
from runner.runs import Run
from runner.runtable import Runs, spec_from_args
from runner.services import Services
from runner.slug import SlugStore
from runner.staticsup import StaticSupervisor
from runner.venv import BuildContext, Venv, VenvBuilder, has_control_socket, kill_builds

log = logging.getLogger(__name__)

LOOP_POLL_MS = 50
MAX_MESSAGES = 100          # control messages handled per step
MAX_EVENTS = 1000           # worker events handled per step
SHUTDOWN_SLACK = 5.0        # seconds past stop_grace before remaining groups are killed
APPS_EVERY = 2.0            # seconds between listings of the apps this host holds
ADOPT_PROBE = 2.0           # seconds for health-checking adopted instances, in all
CONTROLLER = "controller"


class Runner(Hooks):
    def __init__(self, settings: SimpleNamespace, ctx: zmq.Context | None = None) -> None:
        self.settings = settings
        self.host = settings.host_id
        self.data_dir = Path(settings.data_dir).resolve()
        self.apps_dir = Path(settings.apps_dir).resolve() if settings.apps_dir \
            else self.data_dir / "apps"
        wheel_dir = Path(settings.wheel_cache_dir).resolve() if settings.wheel_cache_dir \
            else self.data_dir / "wheels"
        self.isolation = Isolation(settings, self.apps_dir)
        self.slugs = SlugStore(self.data_dir, settings.runner_token,
                               settings.max_unpacked_mb << 20, settings.max_files)
        self.venvs = VenvBuilder(wheel_dir, settings.python, self.data_dir / "locks")
        self.interpreters = Interpreters(settings.python, list(settings.interpreters))
        self.frameworks = Frameworks(self.data_dir / "locks", settings.settings_dir)
        self.policy = Policy(address=settings.address,
                             health_timeout=settings.health_timeout,
                             stop_grace=settings.stop_grace,
                             start_retries=settings.start_retries,
                             backoff_max=settings.backoff_max)
        self.ctx = ctx or zmq.Context.instance()
        self.events: queue.Queue[Any] = queue.Queue()
        self.waker = Waker()            # job threads and run readers end the poll early
        self.jobs = Jobs(self.events, self.waker.wake)
        self.spawns = self.jobs.pool("spawn", settings.max_parallel_spawns)
        self.health = HealthChecks(self._health_done)
        self._cleaning: dict[str, int] = {}         # app -> instance cleanups running
        self.instances: dict[str, Instance] = {}
        # the host's static file server (runner/staticsup.py), and per instance the
        # static files its release collected: (static dir, URL prefix)
        self.static = StaticSupervisor(
            settings.address, settings.static_port, self.apps_dir,
            (NOBODY, NOBODY) if self.isolation.enabled else None) \
            if settings.serve_static else None
        self._static_of: dict[str, tuple[Path, str]] = {}
        self.addon_ports = AddonPorts(
            self.isolation.firewall if self.isolation.enabled else None, self.jobs,
            self.data_dir / "addon_ports.json")
        self.services = Services(self.policy, self.data_dir / "services", self.spawns,
                                 self.platform)
        self.runs = Runs(self.host, self._send_attach, self.jobs, self.waker.wake,
                         settings.stop_grace, marks=self.data_dir / "instances")
        self.controller = PeerTracker(settings.heartbeat_interval, settings.dead_after)
        self.controller_alive = False
        self.done = False
        self.shutting_down = False
        self._shutdown_at = 0.0
        self._signals: list[int] = []
        self._seq = 0
        self._next_heartbeat = 0.0
        self._log_files: dict[str, IO[str]] = {}
        self.loop_at = time.monotonic()         # when the loop last stepped (for beats)
        self.beat: Beat | None = None
        self._build_lines: dict[str, int] = {}      # build id -> lines sent
        self._destroying: dict[str, Message] = {}   # app -> destroy_app command
        # apps destroyed here: late output of their last processes must not bring
        # back the log file the destroy removed (until the app is deployed again)
        self._gone: set[str] = set()
        self._apps: list[str] = []                  # apps with anything here (cached)
        self._apps_at = 0.0
        self.control: zmq.Socket | None = None
        self.logs: zmq.Socket | None = None
        self.attach: zmq.Socket | None = None
        self.poller = zmq.Poller()

    # ---- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        curve.use_setting(self.settings.keys_dir,
                          self.settings.key_name or self.settings.host_id)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # the platform's own files are root's alone; app users may only pass through
        # the data dir on the way to their own dir when apps_dir lies inside it
        self.data_dir.chmod(0o711 if self.data_dir in self.apps_dir.parents else 0o700)
        for sub in ("slugs", "logs", "instances", "locks", "services"):
            (self.data_dir / sub).mkdir(exist_ok=True)
            (self.data_dir / sub).chmod(0o700)
        self.isolation.start()
        for stale in self.apps_dir.glob("*/releases/.unpack-*"):
            shutil.rmtree(stale, ignore_errors=True)      # left by a killed unpack
        adoptable = adopt.find(self.data_dir / "instances")
        leftovers.end(self.data_dir / "instances", self.settings.stop_grace,
                      keep=frozenset(record.instance for record, _ in adoptable))
        if self.static is not None:
            self.static.start(time.monotonic())
        self.control = connect(self.ctx, "control", self.settings.control_endpoint,
                               identity=self.host)
        self.logs = connect(self.ctx, "logs", self.settings.logs_endpoint)
        self.attach = connect(self.ctx, "attach", self.settings.attach_endpoint,
                              identity=self.host)
        for sock in (self.control, self.attach, self.waker):
            self.poller.register(sock, zmq.POLLIN)
        self._adopt(adoptable)
        self.beat = Beat(self.ctx, self.settings.control_endpoint, self.host,
                         self.settings.heartbeat_interval, lambda: self.loop_at)
        self.beat.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("runner started", extra={"address": self.settings.address,
                                          "control": self.settings.control_endpoint,
                                          "data_dir": str(self.data_dir)})

    def _adopt(self, found: list[tuple[adopt.Record, adopt.AdoptedProcess]]) -> None:
        """Take over what a killed runner left running (before the first heartbeat):
        web instances that answer their health check at once are RUNNING, the others
        STARTING with their health check running; nothing is restarted."""
        if not found:
            return
        started = time.monotonic()
        answering = self._probe([r for r, _ in found if r.proc == "web" and r.port])
        for record, proc in found:
            spec = InstanceSpec(
                instance=record.instance, app=record.app, release=record.release,
                proc=record.proc, command=record.command, env=record.env, slug=record.slug,
                slug_url=record.slug_url, host_header=record.host_header,
                memory_mb=record.memory_mb, pids_max=record.pids_max,
                manifest=Manifest.from_wire(record.manifest))
            inst = Instance(spec, self.policy, self.data_dir / "instances" / spec.instance,
                            hooks=self)
            try:
                jail: InstanceJail | None = self.isolation.instance(
                    spec.app, spec.instance, spec.limits(self.isolation.defaults))
            except BerthError as exc:
                log.warning("adopted an instance without its limits: %s", exc.message,
                            extra={"app": spec.app, "instance": spec.instance})
                jail = None
            self.instances[inst.id] = inst
            if record.static is not None:
                self._static_of[inst.id] = (Path(record.static[0]), record.static[1])
            inst.adopt(proc, record.port, Path(record.release_dir), Path(record.venv_bin),
                       record.control_socket, jail,
                       Path(record.data_dir) if record.data_dir else None,
                       record.generation, record.restarts, record.instance in answering)
            self._watch(inst, proc, spec, record.port, record.generation)
            log.info("adopted an instance", extra={
                "app": spec.app, "instance": spec.instance, "release": spec.release,
                "pid": proc.pid, "port": record.port, "state": inst.state.value})
        log.info("adopted %d instances in %.2fs", len(found), time.monotonic() - started)

    def _probe(self, records: list[adopt.Record]) -> set[str]:
        """The web instances among `records` that answer their health check, asked in
        parallel and bounded by ADOPT_PROBE seconds in all."""
        if not records:
            return set()
        pool = ThreadPoolExecutor(min(16, len(records)), thread_name_prefix="adopt")
        futures = {pool.submit(
            answers, self.settings.address, r.port or 0,
            r.host_header or f"{self.settings.address}:{r.port}", 1.0,
            Manifest.from_wire(r.manifest).healthcheck): r.instance for r in records}
        done, _ = wait(futures, timeout=ADOPT_PROBE)
        pool.shutdown(wait=False, cancel_futures=True)
        return {futures[f] for f in done if f.result()}

    def run(self) -> int:
        try:
            while not self.done:
                self.step()
        finally:
            self.close()
        log.info("runner stopped")
        return 0

    def stop(self, grace: float | None = None) -> None:
        """Begin a graceful shutdown: stop every instance, exit once all are gone."""
        grace = self.settings.stop_grace if grace is None else grace
        if not self.shutting_down:
            log.info("shutting down", extra={"instances": len(self.instances)})
            self.shutting_down = True
            self._shutdown_at = time.monotonic() + grace + SHUTDOWN_SLACK
        for inst in list(self.instances.values()):
            inst.stop(grace)
        self.services.stop_all(grace)
        self.runs.end(time.monotonic(), "the runner is shutting down", grace=grace)

    def close(self) -> None:
        if self.beat is not None:
            self.beat.stop()
        kill_builds()
        if self.static is not None:
            self.static.close()
        for fh in self._log_files.values():
            fh.close()
        self._log_files.clear()
        for sock in (self.control, self.logs, self.attach):
            if sock is not None:
                sock.close(linger=0)
        self.waker.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)     # the loop dispatches; nothing else here

    # ---- the loop ----------------------------------------------------------------
    def step(self) -> None:
        self.loop_at = time.monotonic()
        while self._signals:
            signum = self._signals.pop(0)
            # a second signal while shutting down: no more grace
            self.stop(0.0 if self.shutting_down else None)
            log.info("got %s", signal.Signals(signum).name)
        assert self.control is not None and self.attach is not None
        # events left over from the last step (a heartbeat cut it short): no waiting
        ready = dict(self.poller.poll(0 if not self.events.empty() else LOOP_POLL_MS))
        if self.waker.fileno() in ready:
            self.waker.clear()
        if self.attach in ready:
            self._drain_attach()
        if self.control in ready:
            for _ in range(MAX_MESSAGES):
                if time.monotonic() >= self._next_heartbeat:
                    break       # the heartbeat first; the rest next step
                try:
                    _, msg = recv(self.control, zmq.NOBLOCK)
                except zmq.Again:
                    break
                except ProtocolError as exc:
                    log.warning("dropped a bad control message: %s", exc)
                    continue
                self._on_message(msg)
        for _ in range(MAX_EVENTS):
            if time.monotonic() >= self._next_heartbeat:
                break       # the heartbeat first; the rest next step
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            self._on_event(event)
        changed = False
        for inst in list(self.instances.values()):
            changed |= inst.tick()
            if inst.state is State.STOPPED:
                del self.instances[inst.id]
                self._static_of.pop(inst.id, None)
                self._clean_up(inst.spec.app, inst.jail, inst.instance_dir)
                changed = True
        changed |= self.services.step()
        now = time.monotonic()
        changed |= self.runs.step(now)
        if self.static is not None:
            changed |= self.static.want(self._static_wanted())
            changed |= self.static.step(now)
        self._start_destroys()
        if changed or now >= self._next_heartbeat:
            self._heartbeat(now)
        self._watch_controller(now)
        for fh in self._log_files.values():
            fh.flush()
        if self.shutting_down:
            if not self.instances and not self.runs.table and not self.services.table:
                self.done = True
            elif now >= self._shutdown_at:
                log.warning("instances still up after the grace; killing them")
                for inst in self.instances.values():
                    if inst.proc is not None:
                        inst.ops.signal_group(inst.proc.pid, signal.SIGKILL)
                        inst.ops.reap(inst.proc)
                self.services.kill_all()
                self.done = True

    def _heartbeat(self, now: float) -> None:
        self._seq += 1
        self._next_heartbeat = now + self.settings.heartbeat_interval
        self._send(make("heartbeat", self.host, host=self.host,
                        interval=self.settings.heartbeat_interval,
                        address=self.settings.address, inventory=self.inventory(),
                        seq=self._seq, apps=self._apps_here(now),
                        services=self.services.items(),
                        roles=[str(r).strip() for r in self.settings.roles],
                        capacity_mb=self.settings.capacity_mb,
                        default_memory_mb=self.settings.memory_mb,
                        runs=self.runs.items(), **self._static_fields()))

    def _static_wanted(self) -> dict[tuple[str, int], tuple[Path, str]]:
        """The static roots the host's static server holds: those of the releases its
        instances run (old ones too while they drain: pages they served still ask)."""
        return {(inst.spec.app, inst.spec.release): self._static_of[inst.id]
                for inst in self.instances.values() if inst.id in self._static_of}

    def _static_fields(self) -> dict[str, Any]:
        port = self.static.up_port if self.static is not None else None
        if port is None:
            return {}
        assert self.static is not None
        return {"static_port": port,
                "static_roots": static_roots_to_wire(self.static.served())}

    def _apps_here(self, now: float) -> list[str]:
        """What the host holds of which apps (dirs, users, cgroups): read at most every
        APPS_EVERY seconds, not on every heartbeat of a busy loop."""
        if now >= self._apps_at:
            self._apps, self._apps_at = self.isolation.apps(), now + APPS_EVERY
        return self._apps

    def inventory(self) -> list[dict[str, Any]]:
        return [inst.inventory().to_wire() for inst in self.instances.values()]

    def _watch_controller(self, now: float) -> None:
        alive = bool(self.controller.alive(now))
        if alive != self.controller_alive:
            self.controller_alive = alive
            if alive:
                log.info("controller is up")
            else:
                log.warning("controller is away; keeping everything running but "
                            "attached runs, whose clients it carried")
                self.runs.end(now, "the controller went away", attached_only=True)

    def _send(self, msg: Message) -> None:
        assert self.control is not None
        try:
            send(self.control, msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("control queue full; dropped a %s", msg.type)

    # ---- control messages --------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        if msg.type == "heartbeat":
            self.controller.seen(CONTROLLER, dict(msg.fields))
            self.addon_ports.want(msg.get("addon_ports"))
            return
        if msg.type != "command":
            return
        self.controller.seen(CONTROLLER)
        try:
            result = actions.dispatch(self, msg)
        except BerthError as exc:
            self._send(reply(msg, self.host, error=exc.to_dict()))
            return
        if result is not None:
            self._send(reply(msg, self.host, result=result))

    @actions.action("prepare")
    def handle_prepare(self, msg: Message, args: dict[str, Any]) -> None:
        """prepare {build, app, slug, slug_url, manifest?, env?}: replies when the venv
        is ready (and a Django project's static files collected) with {venv, reused,
        seconds, release_dir, detected} or error build_failed / slug_failed."""
        app, build = str(args["app"]), str(args["build"])
        self._gone.discard(app)
        manifest = _manifest_arg(args)
        env = args.get("env") or {}
        if not isinstance(env, dict):
            raise CommandError("prepare arg 'env' must be a mapping of config vars")

        def sink(line: str) -> None:
            self.jobs.post(OutputLine(app, line, "build", build=build))
        self.jobs.submit(("prepare", msg), self._prepare_app, app, str(args["slug"]),
                         str(args["slug_url"]), sink, manifest,
                         {str(k): str(v) for k, v in env.items()})

    @actions.action("start")
    def handle_start(self, msg: Message, args: dict[str, Any]) -> dict[str, Any]:
        """start {instance, app, release, proc, command, env, slug, slug_url,
        host_header?}: replies {accepted: true} at once; the instance then shows in
        heartbeats as PREPARING, STARTING, RUNNING..."""
        if self.shutting_down:
            raise CommandError("runner is shutting down", "place the instance elsewhere",
                               code="shutting_down")
        spec = _start_spec(args)
        self._gone.discard(spec.app)
        existing = self.instances.get(spec.instance)
        if existing is not None and existing.state is not State.STOPPING:
            return {"accepted": True, "existing": True, "state": existing.state.value}
        if existing is not None:
            raise CommandError(f"instance {spec.instance} is still stopping",
                               "send start again once it left the inventory",
                               code="busy")
        inst = Instance(spec, self.policy, self.data_dir / "instances" / spec.instance,
                        hooks=self)
        self.instances[spec.instance] = inst
        self.prepare(inst)
        self._next_heartbeat = 0.0
        return {"accepted": True}

    @actions.action("stop")
    def handle_stop(self, msg: Message, args: dict[str, Any]) -> dict[str, Any]:
        """stop {instance, grace?}: replies at once {stopping: bool}; the instance
        leaves the inventory once its process group is gone."""
        inst = self.instances.get(str(args["instance"]))
        if inst is None:
            return {"stopping": False, "known": False}
        grace = args.get("grace")
        inst.stop(float(grace) if isinstance(grace, (int, float)) else None)
        return {"stopping": True, "known": True}

    @actions.action("serve")
    def handle_serve(self, msg: Message, args: dict[str, Any]) -> dict[str, Any]:
        """serve {service}: replies {accepted} at once; the server then shows in
        heartbeats under `services` (runner/services.py)."""
        if self.shutting_down:
            raise CommandError("runner is shutting down", "serve it on another host",
                               code="shutting_down")
        try:
            spec = ServiceSpec.from_wire(args["service"])
        except ProtocolError as exc:
            raise CommandError(f"bad serve command: {exc}",
                               "the controller sent a malformed service spec") from exc
        if "db" not in [str(r).strip() for r in self.settings.roles] \
                and spec.address != self.settings.address:
            raise CommandError(f"this runner has no db role and {spec.address} is not "
                               "its address", "serve addon servers on a runner whose "
                               "`roles` has db", code="wrong_role")
        result = self.services.serve(spec)
        self._next_heartbeat = 0.0
        return result

    @actions.action("unserve")
    def handle_unserve(self, msg: Message, args: dict[str, Any]) -> dict[str, Any]:
        """unserve {service, grace?}: replies at once {stopping, known}."""
        grace = args.get("grace")
        return self.services.unserve(str(args["service"]),
                                     float(grace) if isinstance(grace, (int, float)) else None)

    @actions.action("run")
    def handle_run(self, msg: Message, args: dict[str, Any]) -> dict[str, Any]:
        """run {run, app, release, command, env, slug, slug_url, tty?, cols?, rows?,
        detach?, timeout?, limits?, manifest?}: replies {accepted: true} at once; the run then
        streams on the attach channel (runner/runtable.py) and shows in heartbeats."""
        if self.shutting_down:
            raise CommandError("runner is shutting down", "run it elsewhere",
                               code="shutting_down")
        run = self.runs.add(spec_from_args(args))
        if run is None:
            return {"accepted": True, "existing": True}
        spec = run.spec

        def sink(line: str) -> None:
            self.jobs.post(OutputLine(spec.app, line, "build", instance=spec.run,
                                      release=spec.release))
        # as an instance of the release is prepared: its interpreter, its framework
        self.jobs.submit(("run_prepare", run), self._prepare_app, spec.app, spec.slug,
                         spec.slug_url, sink, _manifest_arg(args), spec.env)
        self._next_heartbeat = 0.0
        return {"accepted": True}

    def _done_run_prepare(self, event: JobDone) -> None:
        run: Run = event.tag[1]
        if event.error is not None:
            self.runs.failed(run, _error_dict(event.error))
            return
        prepared: Prepared = event.result
        spec = run.spec
        try:
            jail = self.isolation.instance(spec.app, spec.instance,
                                           spec.limits(self.isolation.defaults))
        except BerthError as exc:
            self.runs.failed(run, exc.to_dict())
            return
        # the settings layers' variables (runner/frameworks.py) join its config
        self.runs.prepared(run, prepared.release_dir, prepared.venv.bin,
                           self.isolation.paths(spec.app).data, jail, prepared.env)

    def _drain_attach(self) -> None:
        assert self.attach is not None
        for _ in range(MAX_MESSAGES):
            try:
                _, msg = recv(self.attach, zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                log.warning("dropped a bad attach message: %s", exc)
                continue
            self.runs.on_message(msg)

    def _send_attach(self, msg: Message) -> bool:
        assert self.attach is not None
        try:
            send(self.attach, msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    @actions.action("destroy_app")
    def handle_destroy_app(self, msg: Message, args: dict[str, Any]) -> None:
        """destroy_app {app}: stops the app's instances, then removes every file, cgroup
        and the user it had on this host; replies {destroyed: app} when done."""
        app = str(args["app"])
        for inst in self.instances.values():
            if inst.spec.app == app:
                inst.stop(0.0)
        self.runs.end(time.monotonic(), "the app is being destroyed", app=app, grace=0.0)
        self._destroying[app] = msg

    def _start_destroys(self) -> None:
        for app in list(self._destroying):
            if any(inst.spec.app == app for inst in self.instances.values()) \
                    or self.runs.of_app(app) or self._cleaning.get(app):
                continue            # wait until its instances and runs are gone
            msg = self._destroying.pop(app)
            self._gone.add(app)
            fh = self._log_files.pop(app, None)
            if fh is not None:
                fh.close()
            self.jobs.submit(("destroy", msg), self._destroy, app)

    def _destroy(self, app: str) -> str:
        """Job thread: everything the app had on this host."""
        self.isolation.destroy(app)
        (self.data_dir / "logs" / f"{app}.log").unlink(missing_ok=True)
        self._prune_slugs()
        log.info("destroyed app", extra={"app": app})
        return app

    def _done_addon_ports(self, event: JobDone) -> None:
        self.addon_ports.done(event)

    def _done_destroy(self, event: JobDone) -> None:
        msg: Message = event.tag[1]
        self._apps_at = 0.0         # the next heartbeat says what is left
        if event.error is not None:
            self._send(reply(msg, self.host, error=_error_dict(event.error)))
        else:
            self._send(reply(msg, self.host, result={"destroyed": event.result}))

    def _clean_up(self, app: str, jail: InstanceJail | None, instance_dir: Path) -> None:
        """An instance is gone: its cgroup (kill what is left, rmdir) and its dir go in
        a job, as removing a cgroup may wait for the kernel."""
        self._cleaning[app] = self._cleaning.get(app, 0) + 1
        self.jobs.submit(("clean_up", app, instance_dir.name), _clean_up, jail, instance_dir)

    def _done_clean_up(self, event: JobDone) -> None:
        app = event.tag[1]
        self._cleaning[app] -= 1
        if not self._cleaning[app]:
            del self._cleaning[app]
        if event.error is not None:
            log.warning("could not clean up after an instance: %s", event.error,
                        extra={"app": app, "instance": event.tag[2]})

    def _prune_slugs(self) -> None:
        kept = {p.name for p in self.apps_dir.glob("*/releases/*") if p.is_dir()}
        self.slugs.prune(kept)

    # ---- jobs --------------------------------------------------------------------
    def _prepare(self, app: str, sha: str, url: str,
                 sink: Callable[[str], None], python: str | None = None) -> tuple[Path, Venv]:
        """Job thread: slug fetched and unpacked as the app's user, venv built or reused
        (from interpreter `python`, else the runner's default)."""
        paths, user = self.isolation.ensure_app(app)
        wrap = functools.partial(self.isolation.wrap, app)
        sink(f"-----> Fetching slug {sha[:12]}")
        release_dir, had = self.slugs.ensure(
            app, sha, url, paths.releases, wrap, (user.uid, user.gid) if user else None)
        if had:
            sink(f"-----> Slug {sha[:12]} already unpacked")
        ctx = BuildContext(paths.venvs, paths.cache, wrap, self.isolation.wrap_fetch,
                           self.isolation.fetch_owner())
        venv = self.venvs.ensure(ctx, release_dir / "requirements.txt", sink, python)
        instances = [i for i in list(self.instances.values()) if i.spec.app == app]
        runs = [r for r in list(self.runs.table.values()) if r.spec.app == app]
        prune_app(paths, self.settings.keep_releases,
                  {release_dir} | {i.release_dir for i in instances if i.release_dir}
                  | {r.release_dir for r in runs if r.release_dir},
                  {venv.path} | {i.venv_bin.parent for i in instances if i.venv_bin}
                  | {r.venv_bin.parent for r in runs if r.venv_bin})
        self._prune_slugs()
        return release_dir, venv

    def _prepare_app(self, app: str, sha: str, url: str, sink: Callable[[str], None],
                     manifest: Manifest, env: dict[str, str]) -> Prepared:
        """Job thread: `_prepare` with the interpreter the manifest asks for, then what
        the app's framework needs (runner/frameworks.py: settings layers, static)."""
        python = self.interpreters.pick(manifest.python)
        if manifest.python:
            sink(f"-----> Python {manifest.python} (berth.yaml): {python}")
        release_dir, venv = self._prepare(app, sha, url, sink, python)
        user = self.isolation.user(app)
        detected, extra = self.frameworks.prepare(
            release_dir, venv, env, manifest, functools.partial(self.isolation.wrap, app),
            (user.uid, user.gid) if user else None, self.isolation.paths(app).data, sink)
        return Prepared(release_dir, venv, detected, extra)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, OutputLine):
            self._emit(event)
        elif isinstance(event, JobDone):
            getattr(self, f"_done_{event.tag[0]}")(event)

    def _done_prepare(self, event: JobDone) -> None:
        msg: Message = event.tag[1]
        # lines go on the logs socket, the reply on control: tell the controller how
        # many lines to wait for so the build log it streams is complete
        lines = self._build_lines.pop(str(msg["args"]["build"]), 0)
        if event.error is not None:
            error = {**_error_dict(event.error), "log_lines": lines}
            self._send(reply(msg, self.host, error=error))
            return
        prepared: Prepared = event.result
        venv = prepared.venv
        self._send(reply(msg, self.host, result={
            "venv": venv.key, "reused": venv.reused, "seconds": round(venv.seconds, 3),
            "release_dir": str(prepared.release_dir), "log_lines": lines,
            "detected": prepared.detected.to_wire()}))

    def _prepare_instance(self, inst_id: str, spec: InstanceSpec, sink: Callable[[str], None]
                          ) -> tuple[Prepared, InstanceJail | BerthError]:
        """Job thread: `_prepare_app`, then the instance's jail and cgroup (a failure
        to set limits is returned: it is retried, unlike a failed build)."""
        prepared = self._prepare_app(spec.app, spec.slug, spec.slug_url, sink,
                                     spec.manifest, spec.env)
        try:
            jail = self.isolation.instance(spec.app, inst_id,
                                           spec.limits(self.isolation.defaults))
        except BerthError as exc:
            return prepared, exc
        return prepared, jail

    def _done_instance_prepare(self, event: JobDone) -> None:
        inst: Instance = event.tag[1]
        current = self.instances.get(inst.id) is inst and inst.state is State.PREPARING
        if event.error is not None:
            if not current:
                return      # stopped (and maybe started anew) meanwhile
            err = event.error
            message = err.message if isinstance(err, BerthError) else repr(err)
            self.platform(inst, f"prepare failed: {message}")
            inst.prepare_failed(message, retry=not isinstance(err, BuildError))
            return
        prepared: Prepared
        jail: InstanceJail | BerthError
        prepared, jail = event.result
        if not current:
            # stopped (and maybe started anew) meanwhile: the cgroup made for it goes
            if isinstance(jail, InstanceJail) and jail is not inst.jail:
                self._clean_up(inst.spec.app, jail, inst.instance_dir)
            return
        if isinstance(jail, BerthError):
            self.platform(inst, f"cannot set limits: {jail.message}")
            inst.prepare_failed(jail.message, retry=True)
            return
        # the settings layers' variables (runner/frameworks.py) join its config
        inst.spec = spec = replace(inst.spec, env={**inst.spec.env, **prepared.env})
        inst.prepared(prepared.release_dir, prepared.venv.bin,
                      has_control_socket(prepared.venv.path), jail,
                      self.isolation.paths(spec.app).data)
        found = prepared.detected
        if found.static_dir is not None and static_prefix_ok(found.static_url or ""):
            self._static_of[inst.id] = (found.static_dir, str(found.static_url))

    def _done_spawn(self, event: JobDone) -> None:
        inst: Instance = event.tag[1]
        result: SpawnResult = event.result
        if event.error is not None:     # do_spawn returns its errors: this is a bug
            log.error("spawn job failed", exc_info=event.error,
                      extra={"app": inst.spec.app, "instance": inst.id})
            result = SpawnResult(event.tag[2], error=repr(event.error))
        if self.instances.get(inst.id) is inst and inst.spawn_done(result):
            return
        if result.proc is not None:     # awaited by nobody (should not happen): end it
            log.warning("ending a process nobody awaited", extra={
                "app": inst.spec.app, "instance": inst.id, "pid": result.proc.pid})
            inst.ops.signal_group(result.proc.pid, signal.SIGKILL)
            self.jobs.submit(("reaped",), inst.ops.reap, result.proc)

    def _done_reaped(self, event: JobDone) -> None:
        pass

    def _done_service_spawn(self, event: JobDone) -> None:
        inst: Instance = event.tag[1]
        result: SpawnResult = event.result if event.error is None else \
            SpawnResult(event.tag[2], error=repr(event.error))
        self.services.spawn_done(inst, result)

    def _health_done(self, tag: tuple[Any, ...], healthy: bool) -> None:
        """A health check's end (a HealthChecks thread): an event for the loop."""
        self.jobs.post(JobDone(tag, result=healthy))
        self.jobs.wake()

    def _done_health(self, event: JobDone) -> None:
        inst: Instance = event.tag[1]
        if event.result and self.instances.get(inst.id) is inst:
            inst.healthy(event.tag[2])

    # ---- Hooks (called by instances, on the loop thread) -------------------------
    def prepare(self, inst: Instance) -> None:
        spec = inst.spec

        def sink(line: str) -> None:
            self.jobs.post(OutputLine(spec.app, line, "build", instance=spec.instance,
                                      release=spec.release))
        self.jobs.submit(("instance_prepare", inst), self._prepare_instance, inst.id, spec,
                         sink)

    def spawn(self, inst: Instance, request: SpawnRequest) -> None:
        assert inst.release_dir is not None and inst.venv_bin is not None
        spec, static = inst.spec, self._static_of.get(inst.id)
        # what the next runner needs to adopt it, should this one die (pid: the job)
        record = adopt.Record(
            instance=spec.instance, app=spec.app, release=spec.release, proc=spec.proc,
            command=spec.command, env=spec.env, slug=spec.slug, slug_url=spec.slug_url,
            host_header=spec.host_header, memory_mb=spec.memory_mb, pids_max=spec.pids_max,
            manifest=spec.manifest.to_wire(), pid=0, port=inst.port,
            generation=request.generation, restarts=inst.restarts,
            release_dir=str(inst.release_dir), venv_bin=str(inst.venv_bin),
            data_dir=str(inst.data_dir) if inst.data_dir else None,
            control_socket=inst.control_socket,
            static=(str(static[0]), static[1]) if static else None)
        self.spawns.submit(("spawn", inst, request.generation), self._spawn_job, inst,
                           request, record, spec)

    def _spawn_job(self, inst: Instance, request: SpawnRequest, record: adopt.Record,
                   spec: InstanceSpec) -> SpawnResult:
        """Spawn-pool thread: fork/exec, the record for adoption, then the threads that
        watch the new process (its output, its health check), all started here rather
        than on the loop."""
        result = do_spawn(inst.ops, request)
        if result.proc is None:
            return result
        try:
            replace(record, pid=result.proc.pid).write(request.instance_dir)
        except OSError as exc:
            log.warning("could not record an instance; a restarted runner would end it "
                        "rather than adopt it: %s", exc,
                        extra={"app": record.app, "instance": record.instance})
        self._watch(inst, result.proc, spec, record.port, request.generation)
        return result

    def _watch(self, inst: Instance, proc: Process, spec: InstanceSpec, port: int | None,
               generation: int) -> None:
        """Read the process's output; health-check a web process while it is STARTING
        (any thread)."""
        assert proc.stdout is not None and proc.stderr is not None
        for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            self.jobs.read_lines(pipe, functools.partial(
                _app_line, spec=spec, stream=stream))
        if spec.web and port is not None:
            host_header = spec.host_header or f"{self.settings.address}:{port}"
            self.health.add(
                ("health", inst, generation), self.settings.address, port, host_header,
                self.settings.health_timeout,
                lambda: inst.generation == generation and inst.state is State.STARTING,
                spec.manifest.healthcheck)

    def event(self, inst: Instance, text: str) -> None:
        self.platform(inst, text)

    def platform(self, inst: Instance, text: str) -> None:
        self._emit(OutputLine(inst.spec.app, text, "platform", "stdout", inst.id,
                              inst.spec.release))

    # ---- logs --------------------------------------------------------------------
    def _emit(self, out: OutputLine) -> None:
        """Send one tenant-visible line to the controller and the app's local log."""
        fields: dict[str, Any] = {"app": out.app, "line": out.line, "proc": out.proc,
                                  "host": self.host, "stream": out.stream}
        for name in ("instance", "release", "build"):
            value = getattr(out, name)
            if value is not None:
                fields[name] = value
        assert self.logs is not None
        if out.instance is not None and out.proc not in ("build", "platform"):
            inst = self.instances.get(out.instance)
            if inst is not None:
                inst.output_tail.append(out.line)
        if out.build is not None:
            self._build_lines[out.build] = self._build_lines.get(out.build, 0) + 1
        try:
            send(self.logs, make("log", self.host, **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass        # controller away and the queue is full: the local file has it
        who = out.build and f"build.{out.build}" or f"{out.proc}.{out.instance or '-'}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        if out.app not in self._gone:
            self._log_file(out.app).write(f"{ts} {who} {out.stream}: {out.line}\n")

    def _log_file(self, app: str) -> IO[str]:
        fh = self._log_files.get(app)
        if fh is None:
            fh = open(self.data_dir / "logs" / f"{app}.log", "a", encoding="utf-8")
            self._log_files[app] = fh
        return fh


def _app_line(line: str, *, spec: InstanceSpec, stream: str) -> OutputLine:
    return OutputLine(spec.app, line, spec.proc, stream, spec.instance, spec.release)


@dataclass(frozen=True)
class Prepared:
    """A release ready to run here: its files, venv, framework and the env for it."""
    release_dir: Path
    venv: Venv
    detected: Detected
    env: dict[str, str]


def _manifest_arg(args: dict[str, Any]) -> Manifest:
    try:
        return Manifest.from_wire(args.get("manifest"))
    except ProtocolError as exc:
        raise CommandError(f"arg 'manifest' is wrong: {exc.message}") from exc


def _start_spec(args: dict[str, Any]) -> InstanceSpec:
    def text(name: str) -> str:
        value = args[name]
        if not isinstance(value, str) or not value:
            raise CommandError(f"start arg {name!r} must be a non-empty string")
        return value
    release = args["release"]
    if not isinstance(release, int) or isinstance(release, bool):
        raise CommandError("start arg 'release' must be an integer")
    env = args["env"]
    if not isinstance(env, dict):
        raise CommandError("start arg 'env' must be a mapping of config vars")
    host_header = args.get("host_header")
    try:
        limits = Limits.from_wire(args.get("limits"))
    except ProtocolError as exc:
        raise CommandError(f"start arg 'limits' is wrong: {exc.message}") from exc
    return InstanceSpec(
        instance=text("instance"), app=text("app"), release=release, proc=text("proc"),
        command=text("command"), env={str(k): str(v) for k, v in env.items()},
        slug=text("slug"), slug_url=text("slug_url"),
        host_header=str(host_header) if host_header else None,
        memory_mb=limits.memory_mb, pids_max=limits.pids_max, manifest=_manifest_arg(args))


def _error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, BerthError):
        return exc.to_dict()
    log.error("prepare failed unexpectedly", exc_info=exc)
    return RunnerError(f"prepare failed: {exc!r}", "see the runner's log").to_dict()


def _clean_up(jail: InstanceJail | None, instance_dir: Path) -> None:
    """Job thread: what a stopped instance leaves (its cgroup, its dir)."""
    try:
        if jail is not None:
            jail.remove()
    finally:
        shutil.rmtree(instance_dir, ignore_errors=True)
