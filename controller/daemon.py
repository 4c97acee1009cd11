"""The controller daemon: one class, one loop.

The loop polls the control, snapshot and logs sockets, sends heartbeats and route
ticks every interval, hands queued builds to runners and runs the reconciler. The
HTTP API runs in its own threads and talks to the loop only through the store,
`submit_build`, `wake` and the read-only views (`instances`, `hosts`), so the
ZeroMQ sockets are touched by the loop thread alone.
"""
from __future__ import annotations

import logging
import queue
import secrets
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import zmq

from controller.api import ApiServer
from controller.logstore import LogStore
from controller.reconciler import Plan, StartSpec, flatten, plan
from controller.stats import StatsHub
from controller.store import Store
from messaging import channels, envelope
from messaging.clone import ClonePublisher
from messaging.envelope import Message, make
from messaging.heartbeat import PeerTracker

log = logging.getLogger(__name__)

NO_RUNNER_WAIT = 30.0
BUILD_TIMEOUT = 900.0
START_PENDING = 15.0
STOP_RETRY = 60.0
DESTROY_RETRY = 30.0
LOG_CATCH_UP = 3.0


class Controller:
    def __init__(self, settings: SimpleNamespace) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)      # state, tokens, slugs: the platform's alone
        (self.data_dir / "slugs").mkdir(exist_ok=True)
        self.store = Store(self.data_dir / "state.db")
        self.logs = LogStore(self.data_dir / "logs")
        self.runner_token = settings.runner_token or self._secret("runner.token")
        self.public_url = settings.public_url or f"http://{settings.api_host}:{settings.api_port}"
        self.publisher = ClonePublisher(settings.host_id)
        self.tracker = PeerTracker(settings.heartbeat_interval, settings.dead_after)
        self.identities: dict[str, bytes] = {}
        # explicit loop state
        self.pending: dict[str, dict[str, Any]] = {}      # instance -> start sent
        self.draining: dict[str, float] = {}              # instance -> since
        self.stopping: dict[str, float] = {}              # instance -> stop sent at
        self.in_flight: dict[str, dict[str, Any]] = {}    # command id -> what it was
        self.build_queue: queue.Queue[str] = queue.Queue()
        self.waiting_builds: list[tuple[str, float]] = []
        self.build_lines: dict[str, int] = {}             # build -> runner lines received
        self.finishing: list[tuple[dict[str, Any], Message, float]] = []
        self.destroy_sent: dict[tuple[str, str], float] = {}  # (host, app) -> when
        self._view_lock = threading.Lock()
        self._view: dict[str, Any] = {"hosts": {}, "instances": []}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.api: ApiServer | None = None

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

    def start(self) -> None:
        self.ensure_admin_token()
        for build in self.store.unfinished_builds():
            self._fail_build(build, {"code": "interrupted",
                                     "message": "the controller restarted during this build",
                                     "hint": "push again with `berth push`"})
        self.ctx = zmq.Context()
        s = self.settings
        self.control = channels.bind(self.ctx, "control", s.control_endpoint)
        self.routes_pub = channels.bind(self.ctx, "routes", s.routes_endpoint)
        self.snapshots = channels.bind(self.ctx, "routes_snapshot", s.routes_snapshot_endpoint)
        self.log_pull = channels.bind(self.ctx, "logs", s.logs_endpoint)
        self.poller = zmq.Poller()
        for sock in (self.control, self.snapshots, self.log_pull):
            self.poller.register(sock, zmq.POLLIN)
        self.stats = StatsHub(self.ctx, s.stats_endpoint, s.stats_out_endpoint)
        self.stats.start()
        self.api = ApiServer(self, s.api_host, s.api_port)
        self.api.start()
        log.info("controller started", extra={"api": self.public_url})

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- the loop -----------------------------------------------------------
    def run(self) -> None:
        interval = self.settings.heartbeat_interval
        next_beat = next_reconcile = time.monotonic()
        try:
            while not self._stop.is_set():
                for sock, _ in self.poller.poll(100):
                    self._drain(sock)
                now = time.monotonic()
                if now >= next_beat:
                    self._beat(now)
                    next_beat = now + interval
                self._dispatch_builds(now)
                self._finish_builds(now)
                self._expire_commands(now)
                if now >= next_reconcile or self._wake.is_set():
                    self._wake.clear()
                    self.reconcile(now)
                    next_reconcile = now + 0.5
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.api:
            self.api.stop()
        self.stats.stop()
        for sock in (self.control, self.routes_pub, self.snapshots, self.log_pull):
            sock.close(0)
        self.ctx.term()
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
            elif sock is self.snapshots:
                envelope.send(sock, self.publisher.snapshot(), identity)
            else:
                self._on_log(msg)

    def _on_control(self, identity: bytes, msg: Message) -> None:
        if msg.type == "heartbeat":
            host = msg["host"]
            if self.tracker.seen(host, msg.fields):
                log.info("runner joined", extra={"runner": host, "address": msg.get("address")})
                self._wake.set()
            self.identities[host] = identity
        elif msg.type == "reply":
            self._on_reply(msg)

    def _on_log(self, msg: Message) -> None:
        if msg.type == "log_batch":
            for entry in msg["entries"]:
                if isinstance(entry, dict) and entry.get("app") and "line" in entry:
                    self.logs.append(str(entry["app"]), {**entry, "ts": entry.get("ts", msg.ts)})
            return
        if msg.get("build"):
            self.build_lines[msg["build"]] = self.build_lines.get(msg["build"], 0) + 1
            self.logs.build_line(msg["build"], msg["line"])
        else:
            self.logs.append(msg["app"], {**msg.fields, "ts": msg.ts})

    def _beat(self, now: float) -> None:
        for peer in self.tracker.reap(now):
            log.warning("runner lost", extra={"runner": peer.name})
            for cid, cmd in list(self.in_flight.items()):
                if cmd["host"] == peer.name:
                    self._command_failed(cid, {"code": "runner_lost",
                                               "message": f"runner {peer.name} stopped answering",
                                               "hint": "push again; another runner will take it"})
            self._wake.set()
        beat = make("heartbeat", self.settings.host_id, host=self.settings.host_id,
                    interval=self.settings.heartbeat_interval)
        for peer in self.tracker.alive(now):
            self._send(peer.name, beat)
        envelope.send(self.routes_pub, self.publisher.tick())

    def _send(self, host: str, msg: Message) -> None:
        identity = self.identities.get(host)
        if identity is not None:
            envelope.send(self.control, msg, identity)

    def _command(self, host: str, action: str, what: dict[str, Any], **args: Any) -> None:
        msg = envelope.command(action, self.settings.host_id, **args)
        self.in_flight[msg.id] = {"host": host, "action": action,
                                  "deadline": time.monotonic() + what.pop("timeout", 30.0),
                                  **what}
        self._send(host, msg)

    # -- builds -------------------------------------------------------------
    def submit_build(self, build_id: str) -> None:
        self.build_queue.put(build_id)

    def _dispatch_builds(self, now: float) -> None:
        while True:
            try:
                self.waiting_builds.append((self.build_queue.get_nowait(), now))
            except queue.Empty:
                break
        still = []
        for build_id, since in self.waiting_builds:
            hosts = {h: len(b.get("inventory", [])) for h, b in self.observed(now).items()}
            if not hosts:
                if now - since > NO_RUNNER_WAIT:
                    self._fail_build(build_id, {
                        "code": "no_runner", "message": "no runner host is connected",
                        "hint": "start one (`berth up` does) and push again"})
                else:
                    still.append((build_id, since))
                continue
            host = min(sorted(hosts), key=lambda h: hosts[h])
            build = self.store.build(build_id)
            self.logs.build_line(build_id, f"-----> Building on {host}")
            self._command(host, "prepare", {"build": build_id, "started": now,
                                            "timeout": BUILD_TIMEOUT},
                          build=build_id, app=build["app"], slug=build["slug"],
                          slug_url=self.slug_url(build["slug"]))
        self.waiting_builds = still

    def slug_url(self, sha: str) -> str:
        return f"{self.public_url}/v1/slugs/{sha}"

    def _build_succeeded(self, cmd: dict[str, Any], result: dict[str, Any]) -> None:
        build = self.store.build(cmd["build"])
        cur = self.store.current_release(build["app"])
        release = self.store.add_release(
            build["app"], slug=build["slug"], procfile=build["procfile"],
            config=cur.config if cur else {}, description=f"Deploy {build['slug'][:8]}")
        self.store.finish_build(build["id"], "succeeded", release.version)
        took = time.monotonic() - cmd["started"]
        venv = "reused" if result.get("reused") else "built"
        self.logs.build_line(build["id"], f"-----> Build finished in {took:.1f}s "
                                          f"(virtualenv {venv})")
        self.logs.build_line(build["id"], f"-----> Released v{release.version}")
        self.logs.build_done(build["id"])
        log.info("build succeeded", extra={"app": build["app"], "release": release.version,
                                           "seconds": round(took, 2)})
        self._wake.set()

    def _fail_build(self, build_id: str, error: dict[str, Any]) -> None:
        self.store.finish_build(build_id, "failed", error=error)
        self.logs.build_line(build_id, f"-----> Build failed: {error.get('message')}")
        if error.get("hint"):
            self.logs.build_line(build_id, f"       {error['hint']}")
        self.logs.build_done(build_id)

    # -- replies ------------------------------------------------------------
    def _on_reply(self, msg: Message) -> None:
        cmd = self.in_flight.pop(msg["re"], None)
        if cmd is None:
            return
        if cmd["action"] == "prepare":
            # build output travels on the logs socket: finish once it has all arrived
            self.finishing.append((cmd, msg, time.monotonic() + LOG_CATCH_UP))
        elif not msg["ok"]:
            self.in_flight[msg["re"]] = cmd
            self._command_failed(msg["re"], msg.get("error") or {})

    def _finish_builds(self, now: float) -> None:
        still = []
        for cmd, msg, deadline in self.finishing:
            body = (msg.get("result") if msg["ok"] else msg.get("error")) or {}
            if self.build_lines.get(cmd["build"], 0) < body.get("log_lines", 0) \
                    and now < deadline:
                still.append((cmd, msg, deadline))
                continue
            self.build_lines.pop(cmd["build"], None)
            if msg["ok"]:
                self._build_succeeded(cmd, body)
            else:
                self._fail_build(cmd["build"], body)
        self.finishing = still

    def _command_failed(self, cid: str, error: dict[str, Any]) -> None:
        cmd = self.in_flight.pop(cid)
        if cmd["action"] == "prepare":
            self._fail_build(cmd["build"], error)
        elif cmd["action"] == "start":
            self.pending.pop(cmd["instance"], None)
        log.warning("command failed", extra={"action": cmd["action"], "runner": cmd["host"],
                                             "error": error.get("message")})

    def _expire_commands(self, now: float) -> None:
        for cid, cmd in list(self.in_flight.items()):
            if now > cmd["deadline"]:
                self._command_failed(cid, {"code": "timeout",
                                           "message": f"{cmd['action']} got no answer from "
                                                      f"{cmd['host']}",
                                           "hint": "try again"})

    # -- reconcile ----------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def observed(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        return {p.name: p.payload for p in self.tracker.alive(now)}

    def reconcile(self, now: float) -> Plan:
        observed = self.observed(now)
        reported = {i["instance"] for beat in observed.values() for i in beat.get("inventory", [])}
        for iid in list(self.pending):
            if iid in reported or now > self.pending[iid]["deadline"]:
                del self.pending[iid]
        for table in (self.draining, self.stopping):
            for iid in list(table):
                if iid not in reported:
                    del table[iid]
        desired = self.store.desired()
        p = plan(desired, observed, self.pending, self.draining, set(self.stopping), now,
                 self.settings.drain_seconds, self.settings.base_domain,
                 self.settings.default_max_body_mb << 20)
        for spec in p.starts:
            self._start(spec, observed[spec.host].get("address"), now, desired[spec.app])
        for iid in p.drains:
            self.draining[iid] = now
        for host, iid in p.stops:
            if now - self.stopping.get(iid, -STOP_RETRY) >= STOP_RETRY:
                self.stopping[iid] = now
                self.draining.pop(iid, None)
                self._command(host, "stop", {"instance": iid}, instance=iid)
        self._publish(p.routes)
        self._update_view(observed)
        self._destroy_leftovers(observed, set(desired), now)
        return p

    def _destroy_leftovers(self, observed: dict[str, dict[str, Any]], apps: set[str],
                           now: float) -> None:
        """A host that lists an app the store no longer has (destroyed while the host
        was away, or just now) is told to remove everything of it."""
        listed = {(host, app) for host, beat in observed.items()
                  for app in beat.get("apps", [])}
        for key in set(self.destroy_sent) - listed:
            del self.destroy_sent[key]          # gone from the host: nothing to remember
        for host, app in sorted(listed):
            if app in apps or now - self.destroy_sent.get((host, app), -1e9) < DESTROY_RETRY:
                continue
            self.destroy_sent[(host, app)] = now
            self._command(host, "destroy_app", {"app": app, "timeout": 120.0}, app=app)
            log.info("destroying leftovers", extra={"app": app, "runner": host})

    def _start(self, spec: StartSpec, address: str | None, now: float,
               app: dict[str, Any]) -> None:
        rel = spec.release
        self.pending[spec.instance] = {"host": spec.host, "app": spec.app,
                                       "release": rel.version, "proc": spec.proc,
                                       "address": address,
                                       "deadline": now + START_PENDING, "since": time.time()}
        self._command(spec.host, "start", {"instance": spec.instance},
                      instance=spec.instance, app=spec.app, release=rel.version,
                      proc=spec.proc, command=rel.procfile[spec.proc], env=rel.config,
                      slug=rel.slug, slug_url=self.slug_url(rel.slug),
                      host_header=f"{spec.app}.{self.settings.base_domain}",
                      limits={"memory_mb": app["memory_mb"], "pids_max": app["pids_max"]})
        log.info("starting instance", extra={"app": spec.app, "release": rel.version,
                                             "proc": spec.proc, "runner": spec.host,
                                             "instance": spec.instance})

    def _publish(self, routes: dict[str, dict[str, Any]]) -> None:
        changes = [self.publisher.set(app, route) for app, route in routes.items()]
        changes += [self.publisher.set(app, None)
                    for app in list(self.publisher.table) if app not in routes]
        for msg in changes:
            if msg is not None:
                envelope.send(self.routes_pub, msg)

    def _update_view(self, observed: dict[str, dict[str, Any]]) -> None:
        insts = flatten(observed, self.pending)
        for inst in insts:
            if inst["instance"] in self.draining:
                inst["state"] = "DRAINING"
        hosts = {h: {"address": b.get("address"), "instances": len(b.get("inventory", []))}
                 for h, b in observed.items()}
        with self._view_lock:
            self._view = {"hosts": hosts, "instances": insts,
                          "routes": (self.publisher.seq, dict(self.publisher.table))}

    # -- read-only views for the API threads --------------------------------
    def instances(self, app: str) -> list[dict[str, Any]]:
        with self._view_lock:
            return [dict(i) for i in self._view["instances"] if i["app"] == app]

    def instances_on(self, host: str) -> list[dict[str, Any]]:
        with self._view_lock:
            return [dict(i) for i in self._view["instances"] if i["host"] == host]

    def hosts(self) -> dict[str, dict[str, Any]]:
        with self._view_lock:
            return {h: dict(v) for h, v in self._view["hosts"].items()}

    def routes(self) -> tuple[int, dict[str, Any]]:
        with self._view_lock:
            return self._view.get("routes", (0, {}))


def install_signals(controller: Controller) -> None:
    """Signal handlers only ask the loop to stop."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: controller.stop())
