"""The runner as a real process against a stand-in controller: real ZeroMQ sockets,
a real HTTP slug server, a real virtualenv with gunicorn + flask, real crashes.

The first run builds the app's virtualenv from the package index (tens of seconds);
set BERTH_TEST_VENV_CACHE to a directory to keep it between runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from messaging.channels import bind
from messaging.envelope import Message, command, make, recv, send
from messaging.shapes import InventoryItem, State

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-runner-token"
ADDRESS = "127.0.0.2"
BUILD_TIMEOUT = 600.0       # a first venv build from the index
STEP_TIMEOUT = 60.0

APP_PY = b"""\
import os
from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return f"hello from {os.environ['BERTH_INSTANCE']} {os.environ.get('GREETING', '')}"
"""


def make_slug(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


HELLO_SLUG = make_slug({
    "app.py": APP_PY,
    "requirements.txt": b"gunicorn\nflask\n",
    "Procfile": b"web: gunicorn app:app\n",
})
HELLO_SHA = hashlib.sha256(HELLO_SLUG).hexdigest()


class SlugServer:
    """GET /v1/slugs/<sha> with the bearer token; counts requests."""

    def __init__(self, slugs: dict[str, bytes]) -> None:
        self.slugs = slugs
        self.requests: list[tuple[str, int]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                sha = self.path.rsplit("/", 1)[-1]
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    status, body = 401, b"no"
                elif sha in outer.slugs and self.path.startswith("/v1/slugs/"):
                    status, body = 200, outer.slugs[sha]
                else:
                    status, body = 404, b"missing"
                outer.requests.append((self.path, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def slug_url(self, sha: str) -> str:
        return f"{self.url}/v1/slugs/{sha}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeController:
    """The controller's ends of control (ROUTER) and logs (PULL), driven by the test."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.control = bind(self.ctx, "control", "tcp://127.0.0.1:*")
        self.logs = bind(self.ctx, "logs", "tcp://127.0.0.1:*")
        self.control_endpoint = self.control.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.logs_endpoint = self.logs.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.replies: dict[str, Message] = {}
        self.heartbeats: list[Message] = []
        self.beats: list[Message] = []
        self.log_lines: list[Message] = []
        self.runner_identity: bytes | None = None
        self.pids: set[int] = set()

    def pump(self, seconds: float) -> None:
        """Receive whatever arrives for up to `seconds`."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.logs, zmq.POLLIN)
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready = dict(poller.poll(int(left * 1000) + 1))
            if self.logs in ready:
                while self.logs.poll(0):
                    self.log_lines.append(recv(self.logs)[1])
            if self.control in ready:
                while self.control.poll(0):
                    identity, msg = recv(self.control)
                    if msg.type == "beat":      # the beat thread's own socket
                        self.beats.append(msg)
                        continue
                    self.runner_identity = identity
                    if msg.type == "heartbeat":
                        self.heartbeats.append(msg)
                        self.pids.update(i["pid"] for i in msg["inventory"] if i["pid"])
                        send(self.control, make("heartbeat", "controller",
                                                host="controller", interval=1.0), identity)
                    elif msg.type == "reply":
                        self.replies[msg["re"]] = msg

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.1)
            value = check()
            if value:
                return value
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last "
                             f"inventory: {self.inventory()}")

    def command(self, action: str, **args: Any) -> str:
        self.wait_for("the runner to connect", lambda: self.runner_identity, STEP_TIMEOUT)
        msg = command(action, "controller", **args)
        send(self.control, msg, self.runner_identity)
        return msg.id

    def reply(self, msg_id: str, timeout: float = STEP_TIMEOUT) -> Message:
        return self.wait_for(f"reply to {msg_id}", lambda: self.replies.get(msg_id), timeout)

    def inventory(self) -> list[dict[str, Any]]:
        return self.heartbeats[-1]["inventory"] if self.heartbeats else []

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        for inst in self.inventory():
            if inst["instance"] == instance_id:
                return inst
        return None

    def close(self) -> None:
        self.control.close(0)
        self.logs.close(0)
        self.ctx.term()


class RunnerProcess:
    def __init__(self, tmp: Path, ctl: FakeController, slugs: SlugServer,
                 venv_cache: Path, host_id: str = "host-2", *, apps_dir: Path,
                 **extra: Any) -> None:
        self.data_dir = tmp / "data"
        self.apps_dir = apps_dir
        self.config = tmp / "runner.yaml"
        settings = {
            "host_id": host_id, "address": ADDRESS, "data_dir": str(self.data_dir),
            "wheel_cache_dir": str(venv_cache), "control_endpoint": ctl.control_endpoint,
            "apps_dir": str(apps_dir),
            "logs_endpoint": ctl.logs_endpoint, "controller_url": slugs.url,
            "runner_token": TOKEN, "heartbeat_interval": 0.5, "stop_grace": 5.0,
            "health_timeout": 30.0, "log_level": "debug", **extra,
        }
        self.config.write_text("runner:\n" + "".join(
            f"  {k}: {v!r}\n" if isinstance(v, str) else f"  {k}: {v}\n"
            for k, v in settings.items()))
        self.stderr_path = tmp / "runner.stderr"
        self.stderr = open(self.stderr_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_RUNNER_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "runner", "--config",
                                      str(self.config)], cwd=REPO, env=env,
                                     stdout=self.stderr, stderr=subprocess.STDOUT)

    def terminate(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def log_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def kill_leftovers(pids: set[int]) -> None:
    """Instance process groups this test saw in heartbeats, if the runner left any."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def env(tmp_path: Path, venv_cache: Path, apps_dir: Path
        ) -> Iterator[tuple[FakeController, SlugServer, RunnerProcess]]:
    ctl = FakeController()
    slugs = SlugServer({HELLO_SHA: HELLO_SLUG})
    runner = RunnerProcess(tmp_path, ctl, slugs, venv_cache, apps_dir=apps_dir)
    try:
        yield ctl, slugs, runner
    finally:
        code = runner.terminate()
        if code != 0:
            kill_leftovers(ctl.pids)
        runner.stderr.close()
        slugs.close()
        ctl.close()
        if code != 0:
            print(runner.log_text()[-5000:])


def http_get(port: int, host: str = "hello.localhost") -> tuple[int, str]:
    conn = http.client.HTTPConnection(ADDRESS, port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def start_hello(ctl: FakeController, slugs: SlugServer, instance: str) -> dict[str, Any]:
    msg_id = ctl.command("start", instance=instance, app="hello", release=3, proc="web",
                         command="gunicorn app:app", env={"GREETING": "hi"},
                         slug=HELLO_SHA, slug_url=slugs.slug_url(HELLO_SHA),
                         host_header="hello.localhost")
    rep = ctl.reply(msg_id)
    assert rep["ok"] and rep["result"]["accepted"] is True
    return ctl.wait_for(f"{instance} RUNNING",
                        lambda: (i := ctl.instance(instance)) and i["state"] == "RUNNING" and i,
                        BUILD_TIMEOUT)


def test_prepare_streams_build_log_and_reuses_venv(env: Any) -> None:
    ctl, slugs, runner = env
    started = time.monotonic()
    rep = ctl.reply(ctl.command("prepare", build="b1", app="hello", slug=HELLO_SHA,
                                slug_url=slugs.slug_url(HELLO_SHA)), BUILD_TIMEOUT)
    first = time.monotonic() - started
    assert rep["ok"], rep["error"]
    result = rep["result"]
    assert len(result["venv"]) == 64 and isinstance(result["seconds"], float)

    # the lines travel on the logs socket, apart from the reply: wait for them (when
    # pip ran, until its lines naming flask are in)
    def b1_lines() -> list[Message]:
        lines = [m for m in ctl.log_lines if m.get("build") == "b1"]
        done = result["reused"] or any("flask" in m["line"].lower() for m in lines)
        return lines if done else []
    build_lines = ctl.wait_for("build log lines", b1_lines, STEP_TIMEOUT)
    assert all(m["proc"] == "build" and m["app"] == "hello" and m["host"] == "host-2"
               for m in build_lines)
    if not result["reused"]:
        text = "\n".join(m["line"] for m in build_lines)
        assert "flask" in text.lower(), text
    print(f"first prepare: {first:.1f}s reused={result['reused']}")

    started = time.monotonic()
    again = ctl.reply(ctl.command("prepare", build="b2", app="hello", slug=HELLO_SHA,
                                  slug_url=slugs.slug_url(HELLO_SHA)))
    assert again["ok"] and again["result"]["reused"] is True
    assert again["result"]["venv"] == result["venv"]
    assert time.monotonic() - started < 10
    assert [s for _, s in slugs.requests] == [200]      # fetched once, then reused
    assert (runner.apps_dir / "hello" / "releases" / HELLO_SHA / "app.py").is_file()


def test_prepare_rejects_a_slug_with_the_wrong_sha(env: Any) -> None:
    ctl, slugs, runner = env
    wrong = "0" * 64
    slugs.slugs[wrong] = HELLO_SLUG          # served under a name it does not hash to
    rep = ctl.reply(ctl.command("prepare", build="b3", app="hello", slug=wrong,
                                slug_url=slugs.slug_url(wrong)))
    assert not rep["ok"]
    assert rep["error"]["code"] == "slug_failed"
    assert "sha256" in rep["error"]["message"]
    assert not list((runner.data_dir / "slugs").iterdir())


def test_prepare_reports_pip_failure(env: Any) -> None:
    ctl, slugs, _runner = env
    bad = make_slug({"app.py": b"", "requirements.txt": b"berth-no-such-package-x9q\n"})
    sha = hashlib.sha256(bad).hexdigest()
    slugs.slugs[sha] = bad
    rep = ctl.reply(ctl.command("prepare", build="b4", app="broken", slug=sha,
                                slug_url=slugs.slug_url(sha)), BUILD_TIMEOUT)
    assert not rep["ok"]
    assert rep["error"]["code"] == "build_failed"
    assert "pip install" in rep["error"]["message"]
    assert "berth-no-such-package-x9q" in rep["error"]["message"]


def test_start_crash_restart_stop(env: Any) -> None:
    ctl, slugs, runner = env
    inst = start_hello(ctl, slugs, "web-1")
    assert inst["app"] == "hello" and inst["release"] == 3 and inst["proc"] == "web"
    assert inst["address"] == ADDRESS and inst["restarts"] == 0
    assert set(inst) == {f.name for f in dataclasses.fields(InventoryItem)}
    assert InventoryItem.from_wire(inst).state is State.RUNNING
    status, body = http_get(inst["port"])
    assert status == 200 and body == "hello from web-1 hi"
    # gunicorn's own output arrives as web log lines
    ctl.wait_for("gunicorn's log lines", lambda: any(
        m.get("proc") == "web" and m.get("instance") == "web-1" and m.get("stream") == "stderr"
        for m in ctl.log_lines), STEP_TIMEOUT)
    assert (runner.data_dir / "logs" / "hello.log").read_text()

    # a crash: the master dies without warning
    old_port, old_pid = inst["port"], inst["pid"]
    os.kill(old_pid, signal.SIGKILL)
    backoff = ctl.wait_for("BACKOFF", lambda: (i := ctl.instance("web-1"))
                           and i["state"] == "BACKOFF" and i, STEP_TIMEOUT)
    assert "SIGKILL" in backoff["reason"] and "restarting in 2s" in backoff["reason"]
    back = ctl.wait_for("RUNNING again", lambda: (i := ctl.instance("web-1"))
                        and i["state"] == "RUNNING" and i["restarts"] == 1 and i,
                        STEP_TIMEOUT)
    assert back["port"] != old_port and back["pid"] != old_pid
    assert http_get(back["port"])[0] == 200
    with pytest.raises(OSError):
        http_get(old_port)                  # orphaned workers were killed with the group
    assert any(m.get("proc") == "platform" and "BACKOFF" in m["line"] for m in ctl.log_lines)

    # a commanded stop is not a crash, and the instance leaves the inventory
    rep = ctl.reply(ctl.command("stop", instance="web-1", grace=5))
    assert rep["ok"] and rep["result"]["stopping"] is True
    ctl.wait_for("web-1 gone", lambda: ctl.heartbeats and ctl.instance("web-1") is None,
                 STEP_TIMEOUT)
    with pytest.raises(ProcessLookupError):
        os.kill(back["pid"], 0)
    with pytest.raises(OSError):
        http_get(back["port"])


def test_shutdown_stops_instances_and_exits_zero(env: Any) -> None:
    ctl, slugs, runner = env
    inst = start_hello(ctl, slugs, "web-2")
    assert runner.terminate() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(inst["pid"], 0)
    assert "shutting down" in runner.log_text()


def test_static_file_server_is_advertised_and_ends_with_the_runner(env: Any) -> None:
    ctl, _, runner = env
    beat = ctl.wait_for("a heartbeat with a static port",
                        lambda: next((b for b in ctl.heartbeats if b.get("static_port")), None),
                        STEP_TIMEOUT)
    port = beat["static_port"]
    assert beat["static_roots"] == {}           # no Django release runs here
    conn = http.client.HTTPConnection(ADDRESS, port, timeout=5)
    try:
        conn.request("GET", "/static/x.css")    # not from a balancer: no target named
        resp = conn.getresponse()
        assert resp.status == 400 and resp.getheader("Server") == "berth-static"
    finally:
        conn.close()
    assert runner.terminate() == 0
    with pytest.raises(OSError):
        socket.create_connection((ADDRESS, port), timeout=2).close()


def test_instances_keep_running_while_the_controller_is_away(env: Any) -> None:
    ctl, slugs, runner = env
    inst = start_hello(ctl, slugs, "web-3")
    endpoint = ctl.control_endpoint
    ctl.control.close(0)                     # the controller goes away...
    # ...for longer than dead_after intervals: until the runner says it takes it as away
    deadline = time.monotonic() + STEP_TIMEOUT
    while "controller is away" not in runner.log_text():
        assert time.monotonic() < deadline, "the runner never noticed the controller left"
        assert runner.proc.poll() is None, runner.log_text()[-3000:]
        time.sleep(0.1)
    away_at = time.time()
    assert http_get(inst["port"])[0] == 200
    ups = runner.log_text().count("controller is up")
    ctl.control = bind(ctl.ctx, "control", endpoint)       # ...and comes back
    ctl.heartbeats.clear()
    # a heartbeat made after the runner took the controller as away (not one queued
    # from before) shows what it kept running through the absence
    ctl.wait_for("a heartbeat made after the absence",
                 lambda: ctl.heartbeats and ctl.heartbeats[-1].ts > away_at, STEP_TIMEOUT)
    back = ctl.instance("web-3")
    assert back is not None, ctl.inventory()
    assert back["state"] == "RUNNING" and back["pid"] == inst["pid"]
    assert back["restarts"] == 0
    assert http_get(inst["port"])[0] == 200
    ctl.wait_for("the runner to see the controller back",
                 lambda: runner.log_text().count("controller is up") > ups, STEP_TIMEOUT)


def alive(pid: int) -> bool:
    """A zombie (reparented to an init that does not reap) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


COUNTER = ("python -u -c 'import itertools, time\n"
           "for i in itertools.count(): print(i, flush=True); time.sleep(0.05)'")


def counted(ctl: FakeController, instance: str) -> list[int]:
    return [int(m["line"]) for m in ctl.log_lines
            if m.get("instance") == instance and m.get("proc") == "worker"]


def test_restarted_runner_adopts_what_a_killed_one_left(env: Any, tmp_path: Path,
                                                        venv_cache: Path,
                                                        apps_dir: Path) -> None:
    """kill -9 of the runner leaves its instances running (own sessions); the next
    runner on the same data dir adopts them: same pids and ports, no restart, their
    output read on from where the dead runner stopped (it waited in the pipes), their
    exits noticed (through a pidfd: they are not its children) and restarted."""
    ctl, slugs, runner = env
    inst = start_hello(ctl, slugs, "web-kept")
    rep = ctl.reply(ctl.command("start", instance="count-1", app="hello", release=3,
                                proc="worker", command=COUNTER, env={}, slug=HELLO_SHA,
                                slug_url=slugs.slug_url(HELLO_SHA)))
    assert rep["ok"], rep
    worker = ctl.wait_for("the worker RUNNING", lambda: (i := ctl.instance("count-1"))
                          and i["state"] == "RUNNING" and i, STEP_TIMEOUT)
    ctl.wait_for("the worker's output", lambda: len(counted(ctl, "count-1")) > 5,
                 STEP_TIMEOUT)
    runner.proc.kill()
    runner.proc.wait(10)
    ctl.pids.update((inst["pid"], worker["pid"]))         # the fixture cleans up on failure
    time.sleep(1.0)       # the worker prints ~20 lines meanwhile, into its pipe
    assert alive(inst["pid"]) and alive(worker["pid"])
    assert http_get(inst["port"])[0] == 200               # still serving
    again = RunnerProcess(tmp_path, ctl, slugs, venv_cache, apps_dir=apps_dir)
    try:
        ctl.heartbeats.clear()
        ctl.wait_for("heartbeat from the new runner", lambda: ctl.heartbeats, STEP_TIMEOUT)
        # the first heartbeat already has them, as they were
        first = {i["instance"]: i for i in ctl.heartbeats[0]["inventory"]}
        assert set(first) == {"web-kept", "count-1"}, first
        for old in (inst, worker):
            now = first[old["instance"]]
            assert now["state"] == "RUNNING" and now["pid"] == old["pid"], now
            assert now["port"] == old["port"] and now["restarts"] == 0, now
            assert "adopted" in now["reason"]
        assert http_get(inst["port"])[0] == 200
        # what was written while no runner read came after, none twice; lost at most
        # what the killed runner had read and not yet sent on (in its memory)
        seen = ctl.wait_for("the worker's output, read on", lambda: (
            n := counted(ctl, "count-1")) and len(n) > 40 and n, STEP_TIMEOUT)
        assert seen == sorted(set(seen)), seen
        missing = set(range(seen[0], seen[-1])) - set(seen)
        assert len(missing) <= 2, (missing, seen)
        assert "ended a leftover instance" not in again.log_text()

        # an adopted process that dies is noticed and restarted like any other
        os.kill(worker["pid"], signal.SIGKILL)
        back = ctl.wait_for("the worker restarted", lambda: (i := ctl.instance("count-1"))
                            and i["state"] == "RUNNING" and i["restarts"] == 1 and i,
                            STEP_TIMEOUT)
        assert back["pid"] != worker["pid"]
        assert any("count-1 BACKOFF: exited (status unknown" in m["line"]
                   for m in ctl.log_lines if m.get("proc") == "platform")
    finally:
        assert again.terminate() == 0       # stops the adopted web instance too
        again.stderr.close()
    assert not alive(inst["pid"])


def test_restarted_runner_ends_what_it_cannot_adopt(env: Any, tmp_path: Path,
                                                    venv_cache: Path,
                                                    apps_dir: Path) -> None:
    """An instance without its record (here: removed) is ended, not adopted."""
    ctl, slugs, runner = env
    inst = start_hello(ctl, slugs, "web-orphan")
    runner.proc.kill()
    runner.proc.wait(10)
    assert alive(inst["pid"])                             # still alive: orphaned
    ctl.pids.add(inst["pid"])                             # fixture cleans up on failure
    (runner.data_dir / "instances" / "web-orphan" / "instance.json").unlink()
    again = RunnerProcess(tmp_path, ctl, slugs, venv_cache, apps_dir=apps_dir)
    try:
        ctl.heartbeats.clear()
        ctl.wait_for("heartbeat from the new runner", lambda: ctl.heartbeats, STEP_TIMEOUT)
        assert not alive(inst["pid"])
        with pytest.raises(OSError):
            http_get(inst["port"])
        assert ctl.instance("web-orphan") is None
        assert "ended a leftover instance" in again.log_text()
    finally:
        assert again.terminate() == 0
        again.stderr.close()


def test_a_slug_bomb_is_stopped_while_unpacking(tmp_path: Path, venv_cache: Path,
                                                apps_dir: Path) -> None:
    """5 MB of zeros (a few kB gzipped) under a 1 MB limit: the runner's unpacker (as
    the app's user) counts what it writes, stops at the limit, and leaves no partial
    file; the push is refused with a clear error."""
    bomb = make_slug({"requirements.txt": b"", "Procfile": b"web: true\n",
                      "zeros.bin": bytes(5 << 20)})
    sha = hashlib.sha256(bomb).hexdigest()
    assert len(bomb) < 64 << 10
    ctl = FakeController()
    slugs = SlugServer({sha: bomb})
    runner = RunnerProcess(tmp_path, ctl, slugs, venv_cache, apps_dir=apps_dir,
                           max_unpacked_mb=1)
    try:
        rep = ctl.reply(ctl.command("prepare", build="bomb", app="bomb", slug=sha,
                                    slug_url=slugs.slug_url(sha)), STEP_TIMEOUT)
        assert not rep["ok"]
        assert rep["error"]["code"] == "slug_too_large", rep["error"]
        assert "1 MB" in rep["error"]["message"] or "1048576" in rep["error"]["message"]
        assert rep["error"]["hint"]
        releases = apps_dir / "bomb" / "releases"
        assert releases.is_dir() and list(releases.iterdir()) == []   # nothing partial
    finally:
        runner.terminate()
        runner.stderr.close()
        slugs.close()
        ctl.close()
