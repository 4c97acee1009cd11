"""A runner restarted with many instances to (re)start: does its heartbeat stay on time,
and how long until everything runs again? Run by hand, as root (the runner isolates
each app, as in production):

    .venv/bin/python bench/runner_restart.py [--apps 100] [--restart term,kill]

One real runner (`python -m runner`, on 127.0.0.5, the shipped heartbeat interval) against a
stand-in controller built from messaging/ (the control ROUTER, logs PULL and attach
ROUTER as the controller binds them, plus an HTTP slug server), which plays the
controller's part of reconciling: it wants one web instance per app and sends `start`
for every app the runner does not report (with a new instance id, as the reconciler
does). Each app is a tiny slug (an empty requirements.txt and a stdlib HTTP server
answering 200 on $PORT), so the figures are the platform's own cost, not an app's.

After every app is RUNNING, the runner is restarted, once per mode:
  - term: SIGTERM (the runner stops every instance), then a new runner: every instance
    is prepared (release and venv already on disk) and spawned again;
  - kill: SIGKILL (the instances are left running), then a new runner on the same data
    dir: what it does with what the killed one left.
Recorded from what the stand-in receives: the time from launching the new runner to
its first heartbeat, the longest gap in its liveness (full heartbeats and the beat
thread's beats, runner/beat.py) from then until every app's instance is RUNNING plus a
few seconds (in seconds and in heartbeat intervals; on the times the runner made them,
so the stand-in's own reading speed is not counted),
the time until every instance is RUNNING, and how many of them were new (restarted
rather than kept). Every wait is bounded; everything started is stopped by PID.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from messaging import heartbeat  # noqa: E402
from messaging.channels import bind  # noqa: E402
from messaging.envelope import command, make, recv, send  # noqa: E402

ADDRESS = "127.0.0.5"
TOKEN = "bench-runner-token"
INTERVAL = heartbeat.INTERVAL          # as shipped
RUNNER = os.environ.get("BENCH_RUNNER_ARGV", "-m runner").split()   # a profiling wrapper
SETTLE = 3.0                # seconds of heartbeats still watched after all are RUNNING

APP_PY = b"""\
import http.server, os

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")

    def log_message(self, *args):
        pass

address, port = os.environ["GUNICORN_CMD_ARGS"].split()[1].rsplit(":", 1)
http.server.HTTPServer((address, int(port)), Hello).serve_forever()
"""


def make_slug() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {"app.py": APP_PY, "requirements.txt": b"",
                           "Procfile": b"web: python app.py\n"}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class SlugServer:
    def __init__(self, slug: bytes) -> None:
        sha = hashlib.sha256(slug).hexdigest()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.headers.get("Authorization") == f"Bearer {TOKEN}" \
                    and self.path == f"/v1/slugs/{sha}"
                body = slug if ok else b"no"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.sha = sha
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class StandIn:
    """The controller's side of control, logs and attach, reconciling `apps` web
    instances and recording when each heartbeat arrives."""
    apps: list[str]
    slugs: SlugServer
    ctx: zmq.Context = field(default_factory=zmq.Context)
    beats: list[tuple[float, list[dict[str, Any]]]] = field(default_factory=list)
    # when anything saying "alive" arrived: a full heartbeat or a beat
    alive_at: list[float] = field(default_factory=list)
    started: set[str] = field(default_factory=set)      # instance ids sent in `start`
    pending: dict[str, float] = field(default_factory=dict)   # app -> start sent at

    def __post_init__(self) -> None:
        self.control = bind(self.ctx, "control", "tcp://127.0.0.1:*")
        self.logs = bind(self.ctx, "logs", "tcp://127.0.0.1:*")
        self.attach = bind(self.ctx, "attach", "tcp://127.0.0.1:*")
        self.poller = zmq.Poller()
        for sock in (self.control, self.logs, self.attach):
            self.poller.register(sock, zmq.POLLIN)

    def endpoint(self, sock: zmq.Socket) -> str:
        return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(self.poller.poll(max(1, int(left * 1000))))
            for sock in (self.logs, self.attach):
                while sock in ready and sock.poll(0):
                    sock.recv_multipart()
            while self.control in ready and self.control.poll(0):
                identity, msg = recv(self.control)
                now = time.monotonic()
                # when the runner made it (its timestamp): what the gap is about, not
                # how fast this stand-in reads 200-instance inventories
                if msg.type == "beat":      # liveness from the runner's beat thread
                    self.alive_at.append(msg.ts)
                    continue
                if msg.type != "heartbeat":
                    continue
                self.alive_at.append(msg.ts)
                inventory = list(msg["inventory"])
                self.beats.append((now, inventory))
                send(self.control, make("heartbeat", "controller", host="controller",
                                        interval=INTERVAL), identity)
                self._reconcile(identity, inventory, now)

    def _reconcile(self, identity: bytes | None, inventory: list[dict[str, Any]],
                   now: float) -> None:
        have = {i["app"] for i in inventory if i["state"] not in ("STOPPING", "STOPPED")}
        for app in self.apps:
            if app in have:
                self.pending.pop(app, None)
            elif now - self.pending.get(app, -1e9) > 30.0:
                iid = f"{app}-{uuid.uuid4().hex[:8]}"
                self.started.add(iid)
                self.pending[app] = now
                send(self.control, command(
                    "start", "controller", instance=iid, app=app, release=1, proc="web",
                    command="python app.py", env={}, slug=self.slugs.sha,
                    slug_url=f"{self.slugs.url}/v1/slugs/{self.slugs.sha}",
                    host_header=f"{app}.localhost"), identity)

    def running(self) -> dict[str, str]:
        """app -> instance id of its RUNNING instance, from the last heartbeat."""
        if not self.beats:
            return {}
        return {i["app"]: i["instance"] for i in self.beats[-1][1] if i["state"] == "RUNNING"}

    def wait(self, what: str, done: Any, timeout: float) -> float:
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > timeout:
                raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"{len(self.running())}/{len(self.apps)} running")
            self.pump(0.1)
        return time.monotonic() - start

    def close(self) -> None:
        for sock in (self.control, self.logs, self.attach):
            sock.close(0)
        self.ctx.term()


def start_runner(work: Path, ctl: StandIn, extra: dict[str, Any]) -> subprocess.Popen[bytes]:
    settings = {"host_id": "bench-runner", "address": ADDRESS,
                "data_dir": str(work / "runner"), "apps_dir": str(work / "apps"),
                "wheel_cache_dir": str(work / "wheels"),
                "control_endpoint": ctl.endpoint(ctl.control),
                "logs_endpoint": ctl.endpoint(ctl.logs),
                "attach_endpoint": ctl.endpoint(ctl.attach),
                "controller_url": ctl.slugs.url, "runner_token": TOKEN,
                "heartbeat_interval": INTERVAL, "stop_grace": 5.0, "health_timeout": 60.0,
                "log_level": "warning", **extra}
    config = work / "runner.yaml"
    config.write_text("runner:\n" + "".join(f"  {k}: {v!r}\n" if isinstance(v, str)
                                            else f"  {k}: {v}\n" for k, v in settings.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_RUNNER_")}
    out = open(work / "runner.log", "ab")
    try:
        return subprocess.Popen([sys.executable, *RUNNER, "--config", str(config)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class Result:
    mode: str
    first_beat: float
    max_gap: float
    all_running: float
    new: int
    kept: int
    gap_at: float = 0.0     # when the longest gap began, seconds after the launch


def restart(work: Path, ctl: StandIn, proc: subprocess.Popen[bytes], mode: str,
            extra: dict[str, Any], timeout: float) -> tuple[subprocess.Popen[bytes], Result]:
    before = ctl.running()
    stop(proc, signal.SIGTERM if mode == "term" else signal.SIGKILL)
    ctl.pump(0.2)
    ctl.beats.clear()
    ctl.alive_at.clear()
    ctl.pending.clear()         # starts sent to the old runner went nowhere
    launched, launched_wall = time.monotonic(), time.time()
    proc = start_runner(work, ctl, extra)
    ctl.wait("the new runner's first heartbeat", lambda: ctl.beats, timeout)
    first = ctl.beats[0][0] - launched

    def all_running() -> bool:
        # a heartbeat made by the new runner, with every app RUNNING
        return len(ctl.running()) == len(ctl.apps)
    ctl.wait("every app RUNNING again", all_running, timeout)
    done = time.monotonic() - launched
    ctl.pump(SETTLE)
    times = sorted(ctl.alive_at)
    gap, gap_at = max(((b - a, a - launched_wall) for a, b in zip(times, times[1:],
                                                                  strict=False)),
                      default=(0.0, 0.0))
    after = ctl.running()
    kept = sum(1 for app, iid in after.items() if before.get(app) == iid)
    return proc, Result(mode, first, gap, done, len(after) - kept, kept, gap_at)


def cleanup_apps(apps_dir: Path) -> None:
    """The users and cgroups the runner made for the bench's apps."""
    from runner.cgroups import Cgroups
    from runner.isolation import scope_for
    from runner.users import AppUsers

    if os.geteuid() != 0:
        return
    scope = scope_for(apps_dir)
    cgroups = Cgroups(scope)
    if cgroups.version is not None:
        for app in cgroups.apps():
            cgroups.remove_app(app)
    users = AppUsers(scope)
    for app in users.apps():
        users.remove(app)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apps", type=int, default=100, help="apps (one web instance each)")
    ap.add_argument("--restart", default="term,kill", help="modes, in order: term, kill")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an extra runner setting (e.g. max_parallel_spawns=4)")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on every wait")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    if not 1 <= args.apps <= 300:
        raise SystemExit("--apps must be 1..300")
    extra: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        extra[name] = int(value) if value.isdigit() else value
    # app users must reach their files: not under /tmp, every parent o+x
    work = Path(tempfile.mkdtemp(prefix="berth-bench-restart-", dir="/var/tmp"))
    work.chmod(0o711)
    apps = [f"b{i:03d}" for i in range(args.apps)]
    slugs = SlugServer(make_slug())
    ctl = StandIn(apps, slugs)
    proc = start_runner(work, ctl, extra)
    results: list[Result] = []
    try:
        took = ctl.wait(f"{args.apps} apps RUNNING (first deploy: a venv each)",
                        lambda: len(ctl.running()) == len(apps), args.timeout)
        print(f"{args.apps} apps running after {took:.1f}s (first start, venvs built)")
        for mode in args.restart.split(","):
            proc, result = restart(work, ctl, proc, mode, extra, args.timeout)
            results.append(result)
            print(f"  restart ({mode}) done: {result}", flush=True)
    finally:
        stop(proc, signal.SIGTERM)
        ctl.close()
        slugs.close()
        cleanup_apps(work / "apps")
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"runner restart, {args.apps} apps x 1 web instance, heartbeat every "
          f"{INTERVAL:g}s, settings {extra or 'default'}")
    print("| restart | first heartbeat s | longest heartbeat gap s (intervals) "
          "| all RUNNING s | restarted | kept |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.mode} | {r.first_beat:.2f} | {r.max_gap:.2f} ({r.max_gap / INTERVAL:.1f}) "
              f"| {r.all_running:.2f} | {r.new} | {r.kept} |")


if __name__ == "__main__":
    main()
