"""The fault suite (issue 11, acceptance 1): two hosts (runners on 127.0.0.2 and
127.0.0.3), two balancers, one app with two web instances (one per host), and a
bounded client load that sends each idempotent GET to one balancer and, on a connection
error, to the other, as a client of a DNS round robin would. Each fault, in turn, is a
kill -9 under that load:

  - an app instance (its process group): the other instance keeps answering, the
    balancer retries the idempotent request there, the runner starts the dead one again;
  - a runner host (the runner AND its instances' process groups: the host is gone):
    the balancers keep retrying on the live instance, the controller calls the host
    dead after heartbeat_interval x dead_after and starts its instance on the other
    host; when the host comes back it runs nothing stale;
  - one of the two balancers (its master and workers, one process group): the client
    falls over to the other, and the supervisor restarts the killed one;
  - the controller: the balancers keep routing from what they hold, the supervisor
    restarts it and it re-adopts every instance without restarting one.

Failed-request counts are printed per fault (-s); with two instances on two hosts one
instance always exists, so every count must be 0. The platform's children are
supervised as `berth up` supervises them (cli/supervisor.Supervisor, stepped in a
thread), except the killed host's runner, which stays dead until its instance has been
rescheduled elsewhere (a dead machine has no supervisor either)."""
from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli.localplatform import LocalPlatform, free_port
from tests.e2e.conftest import Berth, copy_example, start_platform
from tests.e2e.test_supervision import Supervised

pytestmark = pytest.mark.timeout(400)

APP = "steady"
REQUEST_TIMEOUT = 5.0
MAX_REQUESTS = 4000          # per fault: the load stops by itself at whichever bound
MAX_SECONDS = 60.0
AFTER = 2.0                  # seconds of load kept up after recovery


@dataclass
class RoundRobin:
    """One client, back to back GETs (a new connection each), alternating the first
    balancer tried as DNS round robin answers would, and trying the other one when the
    first cannot be reached or drops the connection (a GET is idempotent). Bounded in
    count and time; every outcome kept as (start, ok, what, balancer port)."""
    ports: tuple[int, int]
    results: list[tuple[float, bool, str, int]] = field(default_factory=list)
    fellover: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)

    def one(self, port: int) -> tuple[bool, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("GET", "/", headers={"Host": f"{APP}.localhost"})
            resp = conn.getresponse()
            body = resp.read()
            return resp.status == 200 and b"Hello from Berth" in body, str(resp.status)
        finally:
            conn.close()

    def run(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        n = 0
        while (not self.stopping.is_set() and n < MAX_REQUESTS
               and time.monotonic() < deadline):
            first, second = self.ports if n % 2 == 0 else self.ports[::-1]
            n += 1
            start = time.monotonic()
            try:
                ok, what = self.one(first)
                port = first
            except (OSError, http.client.HTTPException) as exc:
                self.fellover += 1
                try:
                    ok, what = self.one(second)
                    port = second
                except (OSError, http.client.HTTPException) as exc2:
                    ok, what, port = False, f"{type(exc).__name__}/{type(exc2).__name__}", 0
            self.results.append((start, ok, what, port))
            time.sleep(0.01)

    def since(self, t: float) -> list[tuple[float, bool, str, int]]:
        return [r for r in self.results if r[0] >= t]


@dataclass
class Faults:
    platform: LocalPlatform
    b: Berth
    sup: Supervised
    ports: tuple[int, int]
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, venv_cache: Path,
           berth_root: Path) -> Iterator[Faults]:
    from tests.conftest import forget_apps, new_apps_dir
    apps = new_apps_dir(berth_root)
    platform = start_platform(tmp_path_factory.mktemp("faults"), venv_cache, apps,
                              runners=[("runner-1", "127.0.0.2"), ("runner-2", "127.0.0.3")])
    sup = Supervised(platform)
    thread = threading.Thread(target=sup.run, daemon=True)
    try:
        second = free_port()
        platform.start_balancer("balancer-2", second)
        thread.start()
        b = Berth(platform, tmp_path_factory.mktemp("cli"))
        b("apps", "create", APP)
        b("push", str(copy_example(tmp_path_factory.mktemp("app") / APP)), "-a", APP,
          timeout=600)
        b("scale", "web=2", "-a", APP)
        b.wait_for(lambda: hosts(b) == ["runner-1", "runner-2"], 120,
                   "one RUNNING web instance on each host")
        f = Faults(platform, b, sup, (platform.ports.balancer, second))
        yield f
        print("\nfault suite, failed requests (idempotent GETs, retried across both "
              "balancers):")
        for name, (failed, total) in f.counts.items():
            print(f"  kill -9 {name}: {failed} of {total} failed")
    finally:
        sup.stopping.set()
        if thread.is_alive():
            thread.join(5)
        platform.stop()
        forget_apps(apps)


def running(b: Berth) -> list[dict[str, Any]]:
    return [i for i in b.json("ps", "-a", APP)["instances"] if i["state"] == "RUNNING"]


def hosts(b: Berth) -> list[str]:
    return sorted(i["host"] for i in running(b))


def under_load(f: Faults, name: str, kill: Callable[[], None],
               recovered: Callable[[], Any], timeout: float = 60) -> tuple[int, int, int]:
    """kill under the load, wait until `recovered`, keep the load AFTER seconds more;
    print and return (failed, total, fell over) counted from the kill on."""
    load = RoundRobin(f.ports)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        f.b.wait_for(lambda: sum(r[1] for r in load.results) >= 20, 30,
                     "the load to get answers")
        killed_at = time.monotonic()
        kill()
        f.b.wait_for(recovered, timeout, f"recovery from the kill of {name}")
        took = time.monotonic() - killed_at
        time.sleep(AFTER)
    finally:
        load.stopping.set()
        thread.join(REQUEST_TIMEOUT * 2 + 5)
    during = load.since(killed_at)
    failed = [r[2] for r in during if not r[1]]
    by_port = {p: sum(1 for r in during if r[3] == p) for p in f.ports}
    print(f"\nkill -9 {name}: {len(failed)} of {len(during)} requests failed "
          f"{sorted(set(failed))}; {load.fellover} fell over to the other balancer; "
          f"answered per balancer {by_port}; recovered {took:.1f} s after the kill")
    f.counts[name] = (len(failed), len(during))
    return len(failed), len(during), load.fellover


def test_kill_9_of_an_app_instance(faults: Faults) -> None:
    f = faults
    victim = next(i for i in running(f.b) if i["host"] == "runner-1")

    def replaced() -> bool:
        now = running(f.b)
        return len(now) == 2 and victim["pid"] not in {i["pid"] for i in now}
    failed, total, _ = under_load(f, "an app instance",
                               lambda: os.killpg(victim["pid"], signal.SIGKILL), replaced)
    assert hosts(f.b) == ["runner-1", "runner-2"]
    assert failed == 0, f"{failed} of {total} failed"


def test_kill_9_of_a_runner_host(faults: Faults) -> None:
    f = faults
    assert hosts(f.b) == ["runner-1", "runner-2"]
    lost = [i for i in running(f.b) if i["host"] == "runner-2"]
    # a dead machine: nothing on it restarts the runner until it is brought back
    runner = f.platform.procs.pop("runner-2")

    def kill_host() -> None:
        os.kill(runner.pid, signal.SIGKILL)
        for i in lost:
            os.killpg(i["pid"], signal.SIGKILL)

    def rescheduled() -> bool:
        now = running(f.b)
        return [i["host"] for i in now] == ["runner-1", "runner-1"] and \
            not {i["instance"] for i in lost} & {i["instance"] for i in now}
    try:
        failed, total, _ = under_load(f, "a runner host (runner + its instances)",
                                   kill_host, rescheduled)
    finally:
        runner.wait(10)
        f.platform.respawn("runner-2")          # the machine is back, empty
    # it rejoins and runs nothing stale; the app keeps its two instances elsewhere
    f.b.wait_for(lambda: "runner-2" in f.b.json("hosts")["runners"], 30, "runner-2 back")
    time.sleep(2.0)
    assert {i["instance"] for i in lost}.isdisjoint(
        i["instance"] for i in f.b.json("ps", "-a", APP)["instances"])
    assert len(running(f.b)) == 2
    assert failed == 0, f"{failed} of {total} failed"


def test_kill_9_of_one_of_two_balancers(faults: Faults) -> None:
    f = faults
    old = f.platform.procs["balancer-1"]
    port = f.platform.ports.balancer

    def back() -> bool:
        new = f.platform.procs["balancer-1"]
        if new.pid == old.pid or new.poll() is not None:
            return False
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).connect()
        return True
    # the master and its workers: one process group (started in its own session)
    failed, total, fellover = under_load(f, "one of two balancers (master and workers)",
                               lambda: os.killpg(old.pid, signal.SIGKILL), back)
    assert any(s.startswith("balancer-1 restarted (pid ") for s in f.sup.said), f.sup.said
    assert fellover > 0, "no request met the killed balancer"
    assert failed == 0, f"{failed} of {total} failed"


def test_kill_9_of_the_controller(faults: Faults) -> None:
    f = faults
    before = {i["instance"]: i["pid"] for i in running(f.b)}
    old = f.platform.procs["controller"]

    def readopted() -> bool:
        new = f.platform.procs["controller"]
        return new.pid != old.pid and {i["instance"]: i["pid"]
                                       for i in running(f.b)} == before
    failed, total, _ = under_load(f, "the controller",
                               lambda: os.killpg(old.pid, signal.SIGKILL), readopted)
    assert any(s.startswith("controller restarted (pid ") for s in f.sup.said), f.sup.said
    assert failed == 0, f"{failed} of {total} failed"
