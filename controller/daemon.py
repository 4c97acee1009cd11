"""The controller daemon: one class, one loop.

The loop polls the control, snapshot and logs sockets, sends heartbeats and route
ticks every interval, hands queued builds to runners and runs the reconciler. For its
first WARM_UP_INTERVALS heartbeat intervals it only listens: a (re)started
controller has heard from no runner yet, and routes planned from nothing would take
every backend away from the balancers, which keep routing with what they have. So
no reconcile, no route tick, and route snapshot requests wait until every live
runner has had the time to report its inventory. The
HTTP API runs in its own threads and talks to the loop only through the store,
`submit_build`, `wake` and the read-only views (`instances`, `hosts`), so the
ZeroMQ sockets are touched by the loop thread alone.
"""
from __future__ import annotations

import functools
import logging
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import zmq

from controller import appenv, services
from controller.api import ApiServer
from controller.builds import BUILD_TIMEOUT, NO_RUNNER_WAIT, Build, Builds, BuildState
from controller.commands import Command, Commands
from controller.errors import ReleasePhaseFailed, Unavailable, build_interrupted, no_runner
from controller.jobqueue import JobQueue
from controller.locks import LockServer
from controller.logstore import LogStore
from controller.pauses import ServerPauses
from controller.pgstore import LeaderLease
from controller.reconciler import (
    RELEASE_PHASE,
    Plan,
    StartSpec,
    draining_view,
    flatten,
    memory_mb,
    plan,
)
from controller.runloop import RunLoop
from controller.runs import Attachment, LineSplitter, Run, RunState
from controller.stats import StatsHub
from controller.store import Release, Store
from messaging import channels, curve, envelope
from messaging.clone import ClonePublisher
from messaging.envelope import Message, make
from messaging.errors import BerthError, LeaseBusy, LeaseLost, ProtocolError
from messaging.heartbeat import PeerTracker
from messaging.shapes import (
    HostReport,
    HostView,
    InventoryItem,
    Lease,
    Limits,
    Route,
    RunItem,
    State,
)
from messaging.waker import Waker

log = logging.getLogger(__name__)

START_PENDING = 15.0
WARM_UP_INTERVALS = 2       # heartbeat intervals a starting controller only listens
STOP_RETRY = 60.0
DESTROY_RETRY = 30.0
FENCE_MEMORY = 3600.0       # seconds a lost host's instances stay fenced, unseen
DEPLOY_LEASE_TTL = 30.0     # a build's deploy/<app> lease, renewed every heartbeat


@dataclass(frozen=True)
class View:
    """What the API threads may read: made whole by the loop, swapped under a lock."""

    hosts: dict[str, HostView] = field(default_factory=dict)
    instances: list[InventoryItem] = field(default_factory=list)
    routes: tuple[int, dict[str, Any]] = (0, {})
    runs: list[RunItem] = field(default_factory=list)
    services: list[InventoryItem] = field(default_factory=list)     # addon servers
    live_addresses: frozenset[str] = frozenset()
    db_addresses: tuple[str, ...] = ()              # db runners', least busy first
    lost_addresses: frozenset[str] = frozenset()    # of runners lost, none back there


class Controller:
    def __init__(self, settings: SimpleNamespace) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)      # state, tokens, slugs: the platform's alone
        (self.data_dir / "slugs").mkdir(exist_ok=True)
        self.lease: LeaderLease | None = None
        self.stepped_down = False
        if settings.store_url:
            # a standby waits here until the leader's lease is free (it died)
            self.lease = LeaderLease(settings.store_url, settings.host_id)
            self.lease.acquire()
        self.store = Store(self.data_dir / "state.db", settings.store_url)
        self.logs = LogStore(self.data_dir / "logs")
        self.runner_token = settings.runner_token or self._secret("runner.token")
        self.platform_token = settings.platform_token or self._secret("platform.token")
        self.jobqueue: JobQueue | None = None     # addon jobs, when there is a broker
        self.addon_ports: list[int] = []          # runners let apps reach these
        self.public_url = settings.public_url or f"http://{settings.api_host}:{settings.api_port}"
        self.publisher = ClonePublisher(settings.host_id)
        self.tracker = PeerTracker(settings.heartbeat_interval, settings.dead_after)
        self.identities: dict[str, bytes] = {}
        # explicit loop state: commands and builds in their own state machines, and
        # the instances the reconciler is steering
        self.commands = Commands(settings.host_id, self._send)
        self.builds = Builds()
        self.pending: dict[str, InventoryItem] = {}       # start sent, not yet reported
        self.pending_until: dict[str, float] = {}         # instance -> give up waiting
        self.draining: dict[str, float] = {}              # instance -> since
        self.stopping: dict[str, float] = {}              # instance -> stop sent at
        self.destroy_sent: dict[tuple[str, str], float] = {}  # (host, app) -> when
        self.serve_sent: dict[str, float] = {}     # addon server id -> serve sent when
        self.server_pauses = ServerPauses()        # addons a backup job stopped for now
        self.lost_addresses: set[str] = set()      # runners lost there (and not back)
        self.fenced: dict[str, tuple[float, bool]] = {}   # instance -> (lost at, seen since)
        self.draining_hosts: set[str] = set()      # `berth hosts drain` (memory only)
        self._desired: dict[str, dict[str, Any]] = {}
        self.deploy_leases: dict[str, Lease] = {}         # build -> its deploy/<app> lease
        self.deploy_waits: set[str] = set()               # builds told they wait for one
        self._view_lock = threading.Lock()
        self._view = View()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._warm_until = 0.0                      # set when the loop starts
        self._held_snapshots: list[bytes] = []      # asked while warming up
        self.api: ApiServer | None = None
        self.poke = Waker()             # API threads end the loop's poll (runs' input)
        self.run_loop = RunLoop(self, self._send_attach, self.poke.wake)

    # -- set-up -------------------------------------------------------------
    def _secret(self, name: str) -> str:
        path = self.data_dir / name
        if not path.exists():
            path.write_text(secrets.token_hex(24))
            path.chmod(0o600)
        return path.read_text().strip()

    def ensure_admin_token(self) -> Path:
        """Write an admin token at first start so the CLI can log in."""
        path = Path(self.settings.admin_token_file or self.data_dir / "admin.token")
        if not self.store.has_tokens() or not path.exists():
            token = self.store.add_token("admin")
            path.write_text(token + "\n")
            path.chmod(0o600)
        return path

    def ensure_backup_admin_token(self) -> Path:
        """The backup-admin role's first token (controller/backups.py), beside admin.token."""
        from controller.backups import BACKUP_ADMIN
        path = self.data_dir / f"{BACKUP_ADMIN}.token"
        if not path.exists() or self.store.token_name(path.read_text().strip()) is None:
            path.write_text(self.store.add_token(BACKUP_ADMIN) + "\n")
            path.chmod(0o600)
        return path

    def resume_interrupted_restores(self) -> None:
        """Apps a restore scaled to 0 when this controller died: scaled back."""
        from controller.pauses import forget_formation, interrupted_restores
        for app, formation in interrupted_restores(self.data_dir).items():
            log.warning("restore interrupted: scaling back", extra={"app": app,
                                                                    "formation": formation})
            self.store.scale(app, formation, self.settings.max_per_process_type)
            forget_formation(self.data_dir, app)

    def start(self) -> None:
        self.ensure_admin_token()
        self.ensure_backup_admin_token()
        self.resume_interrupted_restores()
        curve.use_setting(self.settings.keys_dir, curve.SERVER)
        self.ctx = zmq.Context()
        s = self.settings
        self.locks = LockServer(self.ctx, s.locks_endpoint, s.lock_events_endpoint,
                                self.store, s.host_id)
        for build_id in self.store.unfinished_builds():
            self._build_failed_log(build_id, build_interrupted())
        self.control = channels.bind(self.ctx, "control", s.control_endpoint)
        self.routes_pub = channels.bind(self.ctx, "routes", s.routes_endpoint)
        self.snapshots = channels.bind(self.ctx, "routes_snapshot", s.routes_snapshot_endpoint)
        self.log_pull = channels.bind(self.ctx, "logs", s.logs_endpoint)
        self.attach = channels.bind(self.ctx, "attach", s.attach_endpoint)
        self.poller = zmq.Poller()
        for sock in (self.control, self.snapshots, self.log_pull):
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.attach, zmq.POLLIN)
        self.poller.register(self.poke, zmq.POLLIN)
        self.poller.register(self.locks.socket, zmq.POLLIN)
        self.stats = StatsHub(self.ctx, s.stats_endpoint, s.stats_out_endpoint)
        self.stats.start()
        if s.broker_url:
            from controller import jobs
            self.jobqueue = JobQueue(self.store, jobs.configure(s), s.job_retry_seconds)
            self.jobqueue.start()
        self.api = ApiServer(self, s.api_host, s.api_port)
        self.api.start()
        log.info("controller started", extra={"api": self.public_url})

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- the loop -----------------------------------------------------------
    def run(self) -> None:
        interval = self.settings.heartbeat_interval
        next_beat = time.monotonic()
        next_reconcile = self._warm_until = next_beat + WARM_UP_INTERVALS * interval
        try:
            while not self._stop.is_set():
                for sock, _ in self.poller.poll(100):
                    if sock is self.poke or sock == self.poke.fileno():
                        self.poke.clear()
                    elif sock is self.locks.socket:
                        self.locks.drain()
                    else:
                        self._drain(sock)
                now = time.monotonic()
                self._reap(now)          # each turn: a dead host leaves the routes at once
                if now >= next_beat:
                    self._beat(now)
                    next_beat = now + interval
                self._dispatch_builds(now)
                self._finish_builds(now)
                self.run_loop.step(now)
                self.commands.expire(now)
                self.locks.step()
                if now >= next_reconcile or (self._wake.is_set() and now >= self._warm_until):
                    self._wake.clear()
                    self.reconcile(now)
                    next_reconcile = now + 0.5
                    for identity in self._held_snapshots:
                        envelope.send(self.snapshots, self.publisher.snapshot(), identity)
                    self._held_snapshots.clear()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.api:
            self.api.stop()
        if self.jobqueue:
            self.jobqueue.stop()
        self.stats.stop()
        for sock in (self.control, self.routes_pub, self.snapshots, self.log_pull,
                     self.attach):
            sock.close(0)
        self.locks.close()
        curve.stop(self.ctx)
        self.ctx.term()
        self.logs.close()           # what the writer thread has not written yet
        log.info("controller stopped")

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                identity, msg = envelope.recv(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            except Exception as exc:          # a malformed frame must not stop the loop
                log.warning("dropped bad message", extra={"error": str(exc)})
                continue
            if sock is self.control:
                self._on_control(identity or b"", msg)
            elif sock is self.attach:
                self.run_loop.on_message(msg, time.monotonic())
            elif sock is self.snapshots:
                if time.monotonic() < self._warm_until and identity is not None:
                    self._held_snapshots.append(identity)   # answered after warming up
                else:
                    envelope.send(sock, self.publisher.snapshot(), identity)
            else:
                self._on_log(msg)

    def _on_control(self, identity: bytes, msg: Message) -> None:
        if msg.type == "heartbeat":
            try:
                report = HostReport.from_heartbeat(msg.fields)
            except ProtocolError as exc:
                log.warning("dropped bad heartbeat", extra={"runner": msg.get("host"),
                                                            "error": exc.message})
                return
            if self.tracker.seen(report.host, report):
                log.info("runner joined", extra={"runner": report.host,
                                                  "address": report.address})
                self._wake.set()
            self.identities[report.host] = identity
        elif msg.type == "beat":
            # liveness only (runner/beat.py); identities stay the loop's sockets'
            self.tracker.beat(msg["host"], msg["loop_age"])
        elif msg.type == "reply":
            self.commands.answered(msg)

    def _on_log(self, msg: Message) -> None:
        if msg.type == "log_batch":
            for entry in msg["entries"]:
                if isinstance(entry, dict) and entry.get("app") and "line" in entry:
                    self.logs.append(str(entry["app"]), {**entry, "ts": entry.get("ts", msg.ts)})
            return
        if msg.get("build"):
            self.builds.line(msg["build"])
            self.logs.build_line(msg["build"], msg["line"])
        else:
            self.logs.append(msg["app"], {**msg.fields, "ts": msg.ts})

    def _reap(self, now: float) -> None:
        for peer in self.tracker.reap(now):
            log.warning("runner lost", extra={"runner": peer.name})
            if isinstance(peer.payload, HostReport) and peer.payload.address:
                self.lost_addresses.add(peer.payload.address)
            if isinstance(peer.payload, HostReport):
                # the generation fence: should this host come back, what it ran then
                # is stale (its places are filled elsewhere from now on)
                for item in peer.payload.inventory:
                    self.fenced[item.instance] = (now, False)
            self.commands.host_lost(peer.name)
            self._wake.set()

    def _beat(self, now: float) -> None:
        if self.lease is not None and not self.lease.held():
            log.error("lost the leader lease (the store is unreachable); stepping down")
            self.stepped_down = True
            self.stop()
            return
        beat = make("heartbeat", self.settings.host_id, host=self.settings.host_id,
                    interval=self.settings.heartbeat_interval,
                    addon_ports=self.addon_ports)
        for peer in self.tracker.alive(now):
            self._send(peer.name, beat)
        self._renew_deploy_leases()
        if now >= self._warm_until:
            envelope.send(self.routes_pub, self.publisher.tick())

    def _send(self, host: str, msg: Message) -> None:
        identity = self.identities.get(host)
        if identity is not None:
            envelope.send(self.control, msg, identity)

    # -- builds -------------------------------------------------------------
    # -- one-off runs (controller/runloop.py) ---------------------------------
    def start_run(self, app: str, command: str, **options: Any) -> Run:
        """Thread-safe: run `command` once in the app's current release (see
        RunLoop.start for the options: release, tty, cols, rows, detach, env, timeout,
        sink or on_output/on_exit)."""
        return self.run_loop.start(app, command, **options)

    def attach_run(self, run_id: str) -> Attachment:
        return self.run_loop.attachment(run_id)

    def _send_attach(self, host: str, msg: Message) -> None:
        envelope.send(self.attach, msg, host.encode())

    def submit_build(self, build_id: str) -> None:
        self.builds.submit(build_id)

    def _dispatch_builds(self, now: float) -> None:
        self.builds.take_new(now)
        queued = self.builds.in_state(BuildState.QUEUED)
        if not queued:
            return
        load = {h: len(r.inventory) for h, r in self.observed(now).items() if r.runs_apps}
        for build in queued:
            if not load:
                if now - build.queued_at > NO_RUNNER_WAIT:
                    self._build_over(build, error=no_runner())
                continue
            stored = self.store.build(build.id)
            if not self._take_deploy_lease(build, stored["app"]):
                continue
            host = min(sorted(load), key=lambda h: load[h])
            self.logs.build_line(build.id, f"-----> Building on {host}")
            build.dispatched(host, now)
            self.commands.send(
                host, "prepare", {"build": build.id, "app": stored["app"],
                                  "slug": stored["slug"],
                                  "slug_url": self.slug_url(stored["slug"]),
                                  "manifest": stored["manifest"],
                                  "env": self._build_env(stored["app"], build.id)},
                subject=build.id, now=now, timeout=BUILD_TIMEOUT,
                on_result=functools.partial(self._prepared, build),
                on_error=functools.partial(self._prepare_failed, build))

    # one deploy per app at a time: a build holds the lease deploy/<app> from its
    # dispatch to its end (renewed every heartbeat; a controller that dies mid-build
    # leaves it to expire, and a restarted one releases those of interrupted builds)
    def _take_deploy_lease(self, build: Build, app: str) -> bool:
        try:
            self.deploy_leases[build.id] = self.locks.acquire(
                f"deploy/{app}", f"build/{build.id}", DEPLOY_LEASE_TTL)
        except LeaseBusy:
            if build.id not in self.deploy_waits:
                self.deploy_waits.add(build.id)
                holder = self.locks.holder(f"deploy/{app}")
                other = holder.owner.removeprefix("build/") if holder else "another build"
                self.logs.build_line(build.id, f"-----> Waiting for {other} to finish "
                                               f"(one deploy of {app} at a time)")
            return False
        self.deploy_waits.discard(build.id)
        return True

    def _renew_deploy_leases(self) -> None:
        for build_id, lease in list(self.deploy_leases.items()):
            try:
                self.deploy_leases[build_id] = self.locks.renew(lease)
            except LeaseLost as exc:
                del self.deploy_leases[build_id]
                log.warning("deploy lease lost", extra={"build": build_id,
                                                        "error": exc.message})

    def _deploy_done(self, build_id: str, app: str) -> None:
        self.deploy_waits.discard(build_id)
        lease = self.deploy_leases.pop(build_id, None) or self.locks.holder(f"deploy/{app}")
        if lease is not None and lease.owner == f"build/{build_id}":
            self.locks.release(lease)

    def _build_env(self, app: str, build_id: str) -> dict[str, str]:
        """What a build's steps that run the app's code (collectstatic) see: the
        environment its instances will get, but for the secret key made on success."""
        cur = self.store.current_release(app)
        names = appenv.hostnames(app, self.settings.base_domain,
                                 self.store.domains(app).get(app, []))
        return appenv.instance_env(cur.config if cur else {},
                                   self.store.build_manifest(build_id), names)

    def slug_url(self, sha: str) -> str:
        return f"{self.public_url}/v1/slugs/{sha}"

    def _prepared(self, build: Build, cmd: Command, result: dict[str, Any]) -> None:
        # build output travels on the logs socket: finish once it has all arrived
        build.answered(time.monotonic(), int(result.get("log_lines") or 0), result=result)

    def _prepare_failed(self, build: Build, cmd: Command, err: BerthError,
                        body: dict[str, Any]) -> None:
        build.answered(time.monotonic(), int(body.get("log_lines") or 0), error=err)

    def _finish_builds(self, now: float) -> None:
        for build in self.builds.in_state(BuildState.CATCHING_UP):
            if build.caught_up(now):
                if build.error is None and self._release_phase(build):
                    continue
                build.finish()
                self._build_over(build)
        self.builds.forget_done()

    def _release_config(self, build: Build, stored: dict[str, Any]) -> dict[str, str]:
        cur = self.store.current_release(stored["app"])
        detected = (build.result or {}).get("detected")
        config, made_key = appenv.with_secret_key(cur.config if cur else {}, detected)
        if made_key:
            self.logs.build_line(build.id, f"-----> Made a {appenv.SECRET_KEY} for the app "
                                           "(a config var: `berth config` shows it)")
        return config

    def _release_phase(self, build: Build) -> bool:
        """Start the Procfile's `release:` command for a good build, as a one-off run
        of the new code and config; the release is made only when it exits 0."""
        stored = self.store.build(build.id)
        command = stored["procfile"].get(RELEASE_PHASE)
        if not command:
            return False
        app = stored["app"]
        config = self._release_config(build, stored)
        cur = self.store.current_release(app)
        candidate = Release(app, (cur.version if cur else 0) + 1, stored["slug"],
                            stored["procfile"], config, "release phase", time.time(),
                            self.store.build_manifest(build.id))
        lines = LineSplitter(lambda line: self.logs.build_line(build.id, f"       {line}"))
        self.logs.build_line(build.id, f"-----> Running release command: {command}")
        try:
            run = self.run_loop.start(
                app, command, candidate=candidate,
                on_output=lambda stream, data: lines.feed(data),
                on_exit=lambda run: self._released(build, stored, config, lines, run))
        except BerthError as exc:
            self._build_over(build, error=exc)
            return True
        build.releasing(run.id)
        return True

    def _released(self, build: Build, stored: dict[str, Any], config: dict[str, str],
                  lines: LineSplitter, run: Run) -> None:
        lines.close()
        if run.state is RunState.EXITED and run.code == 0:
            build.released()
            self._make_release(build, stored, config)
            return
        cur = self.store.current_release(stored["app"])
        what = (f"exited with code {run.code}" if run.state is RunState.EXITED
                else (run.error.message if run.error else run.reason or "did not finish"))
        serving = (f"release v{cur.version} keeps serving" if cur and cur.slug
                   else "nothing was deployed")
        build.fail(ReleasePhaseFailed(
            f"the release command `{run.command}` {what}",
            f"its output is above; {serving}. Fix it and push again"))
        self._build_over(build)
        self.builds.forget_done()

    def _build_over(self, build: Build, error: BerthError | None = None) -> None:
        """Record a build's end in the store and its log, by the state it ended in."""
        if error is not None:
            build.fail(error)
        if build.state is BuildState.FAILED:
            assert build.error is not None
            self._build_failed_log(build.id, build.error)
            return
        stored = self.store.build(build.id)
        self._make_release(build, stored, self._release_config(build, stored))

    def _make_release(self, build: Build, stored: dict[str, Any],
                      config: dict[str, str]) -> None:
        detected = (build.result or {}).get("detected")
        release = self.store.add_release(
            stored["app"], slug=stored["slug"], procfile=stored["procfile"],
            config=config, description=f"Deploy {stored['slug'][:8]}",
            manifest=self.store.build_manifest(build.id))
        self.store.finish_build(build.id, "succeeded", release.version, detected=detected)
        self._deploy_done(build.id, stored["app"])
        took = time.monotonic() - build.started
        venv = "reused" if (build.result or {}).get("reused") else "built"
        self.logs.build_line(build.id, f"-----> Build finished in {took:.1f}s "
                                       f"(virtualenv {venv})")
        self.logs.build_line(build.id, f"-----> Released v{release.version}")
        self.logs.build_done(build.id)
        log.info("build succeeded", extra={"app": stored["app"], "release": release.version,
                                           "seconds": round(took, 2)})
        self._wake.set()

    def _build_failed_log(self, build_id: str, error: BerthError) -> None:
        self.store.finish_build(build_id, "failed", error=error.to_dict())
        self._deploy_done(build_id, self.store.build(build_id)["app"])
        self.logs.build_line(build_id, f"-----> Build failed: {error.message}")
        if error.hint:
            self.logs.build_line(build_id, f"       {error.hint}")
        self.logs.build_done(build_id)

    # -- addons (controller/addons.py, controller/jobqueue.py) ----------------
    def require_jobs(self) -> None:
        if self.jobqueue is None:
            raise Unavailable("addons need the platform's job workers, and this "
                              "controller has no broker_url",
                              "`berth up` starts a broker, workers and beat; elsewhere set "
                              "the controller's broker_url", code="no_jobs")

    def jobqueue_poke(self) -> None:
        if self.jobqueue is not None:
            self.jobqueue.poke()

    def addon_log(self, app: str, line: str) -> None:
        """A platform line in the app's log (`berth logs`) about its addons."""
        self.logs.append(app, {"app": app, "line": line, "proc": "platform",
                               "ts": time.time()})

    # -- reconcile ----------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def observed(self, now: float | None = None) -> dict[str, HostReport]:
        return {p.name: p.payload for p in self.tracker.alive(now)
                if isinstance(p.payload, HostReport)}

    def reconcile(self, now: float) -> Plan:
        observed = self.observed(now)
        reported = {i.instance for r in observed.values() for i in r.inventory}
        for iid in list(self.pending):
            if iid in reported or now > self.pending_until[iid]:
                del self.pending[iid], self.pending_until[iid]
        for table in (self.draining, self.stopping):
            for iid in list(table):
                if iid not in reported:
                    del table[iid]
        desired = self.store.desired()
        self.addon_ports = self.store.addon_ports()
        stale = self._stale_instances(reported, now)
        p = plan(desired, observed, self.pending, self.draining, set(self.stopping), now,
                 self.settings.drain_seconds, self.settings.base_domain,
                 self.settings.default_max_body_mb << 20,
                 draining_hosts=self.draining_hosts, stale=stale)
        self._desired = desired
        for spec in p.starts:
            self._start(spec, observed[spec.host].address, now, desired[spec.app])
        for iid in p.drains:
            self.draining[iid] = now
        for host, iid in p.stops:
            if now - self.stopping.get(iid, -STOP_RETRY) >= STOP_RETRY:
                self.stopping[iid] = now
                self.draining.pop(iid, None)
                self.commands.send(host, "stop", {"instance": iid}, subject=iid, now=now)
        self._publish(p.routes)
        self._serve_addon_servers(observed, now)
        self._update_view(observed)
        self._destroy_leftovers(observed, set(desired), now)
        return p

    def _stale_instances(self, reported: set[str], now: float) -> set[str]:
        """The fenced generation: instances a lost host ran, now reported again (the
        host came back after its places were filled elsewhere). Forgotten once
        they are gone after showing up, or after FENCE_MEMORY seconds unseen."""
        stale = set()
        for iid, (lost_at, seen) in list(self.fenced.items()):
            if iid in reported:
                stale.add(iid)
                self.fenced[iid] = (lost_at, True)
            elif seen or now - lost_at > FENCE_MEMORY:
                del self.fenced[iid]
        return stale

    def drain_host(self, host: str, on: bool = True) -> None:
        """Thread-safe: empty a host (`berth hosts drain`), or let it take work again."""
        with self._view_lock:
            if on:
                self.draining_hosts.add(host)
            else:
                self.draining_hosts.discard(host)
        self.wake()

    def _serve_addon_servers(self, observed: dict[str, HostReport], now: float) -> None:
        """Have runners supervise the addon servers the store wants, and stop the ones
        it no longer does (controller/services.py)."""
        wanted = self.server_pauses.filter(self.store.wanted_services())
        sp = services.plan(wanted, observed, self.serve_sent, now, self.lost_addresses)
        ids = {spec.id for spec in wanted}
        for sid in list(self.serve_sent):
            if sid not in ids:
                del self.serve_sent[sid]
        for host, spec in sp.serves:
            self.serve_sent[spec.id] = now
            self.commands.send(host, "serve", {"service": spec.to_wire()}, subject=spec.id,
                               now=now)
            log.info("serving addon server", extra={"addon": spec.addon, "app": spec.app,
                                                    "service": spec.id, "runner": host})
        for host, sid in sp.unserves:
            self.commands.send(host, "unserve", {"service": sid}, subject=sid, now=now)
            log.info("unserving addon server", extra={"service": sid, "runner": host})

    def _destroy_leftovers(self, observed: dict[str, HostReport], apps: set[str],
                           now: float) -> None:
        """A host that lists an app the store no longer has (destroyed while the host
        was away, or just now) is told to remove everything of it."""
        listed = {(host, app) for host, report in observed.items() for app in report.apps}
        for key in set(self.destroy_sent) - listed:
            del self.destroy_sent[key]          # gone from the host: nothing to remember
        for host, app in sorted(listed):
            if app in apps or now - self.destroy_sent.get((host, app), -1e9) < DESTROY_RETRY:
                continue
            self.destroy_sent[(host, app)] = now
            self.commands.send(host, "destroy_app", {"app": app}, subject=app, now=now,
                               timeout=120.0)
            log.info("destroying leftovers", extra={"app": app, "runner": host})

    def _start(self, spec: StartSpec, address: str | None, now: float,
               app: dict[str, Any]) -> None:
        rel = spec.release
        self.pending[spec.instance] = InventoryItem(
            instance=spec.instance, app=spec.app, release=rel.version, proc=spec.proc,
            state=State.PENDING, address=address, since=time.time(), host=spec.host)
        self.pending_until[spec.instance] = now + START_PENDING
        limits = Limits(memory_mb=app["memory_mb"] or rel.manifest.memory_mb,
                        pids_max=app["pids_max"])
        names = appenv.hostnames(spec.app, self.settings.base_domain, app["domains"])
        self.commands.send(
            spec.host, "start",
            {"instance": spec.instance, "app": spec.app, "release": rel.version,
             "proc": spec.proc, "command": rel.procfile[spec.proc],
             "env": appenv.instance_env(rel.config, rel.manifest, names),
             "slug": rel.slug, "slug_url": self.slug_url(rel.slug),
             "host_header": f"{spec.app}.{self.settings.base_domain}",
             "limits": limits.to_wire(), "manifest": rel.manifest.to_wire()},
            subject=spec.instance, now=now, on_error=self._start_failed)
        log.info("starting instance", extra={"app": spec.app, "release": rel.version,
                                             "proc": spec.proc, "runner": spec.host,
                                             "instance": spec.instance})

    def _start_failed(self, cmd: Command, err: BerthError, body: dict[str, Any]) -> None:
        self.pending.pop(cmd.subject, None)
        self.pending_until.pop(cmd.subject, None)
        log.warning("start failed", extra={"instance": cmd.subject, "runner": cmd.host,
                                           "error": err.message})

    def _publish(self, routes: dict[str, Route]) -> None:
        changes = [self.publisher.set(app, route.to_wire()) for app, route in routes.items()]
        changes += [self.publisher.set(app, None)
                    for app in list(self.publisher.table) if app not in routes]
        for msg in changes:
            if msg is not None:
                envelope.send(self.routes_pub, msg)

    def _update_view(self, observed: dict[str, HostReport]) -> None:
        insts = draining_view(flatten(observed, self.pending), self.draining)
        used: dict[str, int] = {}
        for h, r in observed.items():
            used[h] = sum(memory_mb(self._desired.get(i.app), r) for i in r.inventory)
        hosts = {h: HostView(r.address, len(r.inventory), r.static_port, r.roles,
                             r.capacity_mb, used[h], h in self.draining_hosts)
                 for h, r in observed.items()}
        live = frozenset(r.address for r in observed.values() if r.address)
        self.lost_addresses -= live
        with self._view_lock:
            self._view = View(hosts, insts, (self.publisher.seq, dict(self.publisher.table)),
                              self.run_loop.items(observed),
                              [i for r in observed.values() for i in r.services],
                              live_addresses=live,
                              lost_addresses=frozenset(self.lost_addresses),
                              db_addresses=tuple(r.address or "" for r in sorted(
                                  (r for r in observed.values() if r.runs_dbs and r.address),
                                  key=lambda r: (len(r.services), r.address or ""))))

    # -- read-only views for the API threads (JSON-ready) --------------------
    def runs_of(self, app: str) -> list[dict[str, Any]]:
        with self._view_lock:
            return [r.to_wire() for r in self._view.runs if r.app == app]

    def instances(self, app: str) -> list[dict[str, Any]]:
        with self._view_lock:
            return [i.to_wire() for i in self._view.instances if i.app == app]

    def instances_on(self, host: str) -> list[dict[str, Any]]:
        with self._view_lock:
            return [i.to_wire() for i in self._view.instances if i.host == host]

    def host_addresses(self) -> dict[str, list[str]]:
        """Where runners answer; where a runner was lost and none answers since (a job
        worker leaves an ha node there alone until its host is back); the db hosts,
        least busy first (where a job worker puts new addon servers)."""
        with self._view_lock:
            return {"live": sorted(self._view.live_addresses),
                    "lost": sorted(self._view.lost_addresses),
                    "db": list(self._view.db_addresses)}

    def services_of(self, addon_id: str) -> list[dict[str, Any]]:
        """The addon's servers as their runners report them (`berth addons info`)."""
        prefix = f"{addon_id}-"
        with self._view_lock:
            return [i.to_wire() for i in self._view.services if i.instance.startswith(prefix)]

    def hosts(self) -> dict[str, dict[str, Any]]:
        with self._view_lock:
            return {h: v.to_wire() for h, v in self._view.hosts.items()}

    def routes(self) -> tuple[int, dict[str, Any]]:
        with self._view_lock:
            return self._view.routes


def install_signals(controller: Controller) -> None:
    """Signal handlers only ask the loop to stop."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: controller.stop())
