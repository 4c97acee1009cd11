"""`berth up` keeps its children up: kill -9 of the runner, the balancer or the
controller under a steady request load through the balancer; the supervisor `berth up`
runs (cli/supervisor.py) restarts the child, the platform serves again, and the
failed requests are counted (printed with -s). The runner's instances are adopted by
the restarted runner, not restarted: same pids.

The platform is LocalPlatform as `berth up` runs it (tests/e2e/conftest.py), with the
same Supervisor stepped in a thread as `berth up`'s loop steps it; the last test
runs the real `berth up` and reads what it says."""
from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli.localplatform import LocalPlatform
from cli.supervisor import Supervisor
from tests.e2e.conftest import ROOT, Berth, serve_example, start_platform
from tests.e2e.test_up import free_block

LOAD_SECONDS_AFTER = 3.0     # load kept up after the platform serves again
RECOVER_TIMEOUT = 60.0       # bound on: restarted and serving again
REQUEST_TIMEOUT = 5.0


@dataclass
class Load:
    """One client, back to back GETs through the balancer (a new connection each),
    every outcome kept with its time; bounded by stop() and by MAX_REQUESTS."""
    port: int
    host: str
    results: list[tuple[float, bool, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    MAX_REQUESTS = 20000

    def run(self) -> None:
        while not self.stopping.is_set() and len(self.results) < self.MAX_REQUESTS:
            start = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
            try:
                conn.request("GET", "/", headers={"Host": self.host})
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and b"Hello from Berth" in body
                what = f"{resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                ok, what = False, type(exc).__name__
            finally:
                conn.close()
            self.results.append((start, ok, what))
            time.sleep(0.01)

    def since(self, t: float) -> list[tuple[float, bool, str]]:
        return [r for r in self.results if r[0] >= t]


@dataclass
class Supervised:
    platform: LocalPlatform
    said: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        sup = Supervisor(self.platform, self.said.append, self.said.append)
        while not self.stopping.is_set():
            sup.step()
            time.sleep(0.1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, venv_cache: Path,
           berth_root: Path) -> Iterator[tuple[LocalPlatform, Berth, Supervised]]:
    from tests.conftest import forget_apps, new_apps_dir
    apps = new_apps_dir(berth_root)
    platform = start_platform(tmp_path_factory.mktemp("supervised"), venv_cache, apps)
    sup = Supervised(platform)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    try:
        yield platform, serve_example(platform, tmp_path_factory), sup
    finally:
        sup.stopping.set()
        thread.join(5)
        platform.stop()
        forget_apps(apps)


def kill_under_load(platform: LocalPlatform, b: Berth, sup: Supervised,
                    name: str) -> tuple[int, int, float]:
    """kill -9 `name` while a client sends requests; returns (failed, total,
    seconds from the kill until requests succeed again for good)."""
    load = Load(platform.ports.balancer, "steady.localhost")
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        b.wait_for(lambda: len([r for r in load.results if r[1]]) >= 20, 30,
                   "the load to get answers")
        old = platform.procs[name]
        killed_at = time.monotonic()
        os.kill(old.pid, signal.SIGKILL)
        b.wait_for(lambda: platform.procs[name].pid != old.pid
                   and platform.procs[name].poll() is None, RECOVER_TIMEOUT,
                   f"{name} restarted by the supervisor")

        def serving_again() -> bool:
            recent = load.since(killed_at)
            return len(recent) >= 20 and all(ok for _, ok, _ in recent[-20:])
        b.wait_for(serving_again, RECOVER_TIMEOUT, "the app answering again")
        recent = load.since(killed_at)
        last_failure = max((t for t, ok, _ in recent if not ok), default=killed_at)
        time.sleep(LOAD_SECONDS_AFTER)
    finally:
        load.stopping.set()
        thread.join(REQUEST_TIMEOUT + 5)
    during = load.since(killed_at)
    failed = [what for _, ok, what in during if not ok]
    print(f"kill -9 {name}: {len(failed)} of {len(during)} requests failed "
          f"({sorted(set(failed))}); serving for good {last_failure - killed_at:.2f}s "
          f"after the kill")
    return len(failed), len(during), last_failure - killed_at


def pids(b: Berth) -> dict[str, int]:
    return {i["instance"]: i["pid"] for i in b.json("ps", "-a", "steady")["instances"]}


def test_kill_9_of_the_runner_is_restarted_and_its_instances_adopted(served) -> None:
    platform, b, sup = served
    before = pids(b)
    old = platform.procs["runner-1"].pid
    failed, total, _ = kill_under_load(platform, b, sup, "runner-1")
    assert any(f"runner-1 (pid {old}) was killed by SIGKILL" in s for s in sup.said), sup.said
    assert any(s.startswith("runner-1 restarted (pid ") for s in sup.said), sup.said
    # the same instances, same pids: adopted, not restarted
    b.wait_for(lambda: pids(b) == before, 30, f"the instances {before} reported again")
    assert all(i["state"] == "RUNNING" and i["restarts"] == 0
               for i in b.json("ps", "-a", "steady")["instances"])
    assert failed == 0, f"{failed} of {total} requests failed"


def test_kill_9_of_the_controller_is_restarted_and_nothing_fails(served) -> None:
    platform, b, sup = served
    before = pids(b)
    failed, total, _ = kill_under_load(platform, b, sup, "controller")
    assert any(s.startswith("controller restarted (pid ") for s in sup.said), sup.said
    b.wait_for(lambda: pids(b) == before, 30, "the controller re-adopting the instances")
    assert failed == 0, f"{failed} of {total} requests failed"


def test_kill_9_of_the_balancer_is_restarted_and_serves_again(served) -> None:
    platform, b, sup = served
    failed, total, recovered = kill_under_load(platform, b, sup, "balancer-1")
    assert any(s.startswith("balancer-1 restarted (pid ") for s in sup.said), sup.said
    assert recovered < RECOVER_TIMEOUT
    # the one balancer is down between the kill and the new master's bind
    assert failed < total / 2, f"{failed} of {total} requests failed"


def test_berth_up_says_what_died_and_restarts_it(tmp_path: Path, berth_root: Path) -> None:
    """The real `berth up` (its broker and job workers included): the runner is
    killed, `berth up` says so and restarts it; SIGTERM then stops every child."""
    api, port = free_block(23), free_block(1)     # the API and every port after it
    env = {**os.environ, "BERTH_CLI_CONFIG_DIR": str(tmp_path / "cfg"), "NO_COLOR": "1"}
    data = berth_root / f"up-{tmp_path.name}"      # app users must reach it: not in /tmp
    out = open(tmp_path / "up.out", "w+")
    up = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--data-dir", str(data),
                           "--port", str(port), "--api-port", str(api)], cwd=ROOT, env=env,
                          stdout=out, stderr=subprocess.STDOUT)

    def said() -> str:
        return (tmp_path / "up.out").read_text()

    def wait_for(text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while text not in said():
            assert up.poll() is None, said()
            assert time.monotonic() < deadline, f"no {text!r} in:\n{said()}"
            time.sleep(0.2)
        return said()

    try:
        started = wait_for("Started ")
        line = next(x for x in started.splitlines() if "Started " in x)
        children = {part.split(" (pid ")[0].strip(): int(part.split(" (pid ")[1].rstrip(")"))
                    for part in line.split("Started ", 1)[1].split(", ")}
        assert {"controller", "runner-1", "balancer-1"} <= set(children), line
        os.kill(children["runner-1"], signal.SIGKILL)
        text = wait_for("runner-1 restarted (pid ")
        assert f"runner-1 (pid {children['runner-1']}) was killed by SIGKILL at " in text
        assert "; restarting it " in text
        new = int(text.split("runner-1 restarted (pid ")[1].split(",")[0])
        os.kill(new, 0)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
        out.close()
    assert up.returncode == 0, said()
    for pid in [*children.values(), new]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
