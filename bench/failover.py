"""Host failure and runner restart (issue 11, acceptances 5 and 8), with real processes.
Run by hand, as root (runners isolate each app, as in production):

    .venv/bin/python bench/failover.py [--death default,slow,fast] [--apps 25,100,200]
        [--no-takeover]

1. Host death. A LocalPlatform (controller, two runners on 127.0.0.2 and 127.0.0.3, one
   balancer; no job workers), one app (a stdlib HTTP server, empty requirements) with
   two web instances, one per host. The host of one instance dies: kill -9 of its
   runner and of its instance's process group. Recorded, from the kill, by polling the
   controller's published routes (GET /v1/routes, every 20 ms) and the balancer:
     - routes updated: the first published route without the dead host's backend;
     - serving elsewhere: the route holds two backends again (the replacement started
       on the live host, health-checked and routed) and a GET through the balancer
       answers 200.
   Once with each heartbeat setting asked for (`--death`): `default` (as shipped,
   messaging/heartbeat.py: 0.5 s x 3), `slow` (1 s x 5, the earlier default) and
   `fast` (0.25 s x 6), set on the controller and the runners alike
   (BERTH_CONTROLLER_* / BERTH_RUNNER_* environment).
2. Controller takeover. The store on a real PostgreSQL (initdb into the work dir), a
   leader and a standby controller, one runner, the app with two instances, GETs
   through the balancer every 10 ms. kill -9 of the leader; recorded from the kill:
   the standby's API answering, and its published route holding both backends again
   (it learns them from the runner's heartbeats after its warm-up); failed GETs.
3. Runner restart. bench/runner_restart.py's stand-in controller and one real runner,
   at each app count of `--apps` (one web instance each): every app RUNNING, then the
   runner is restarted (`--restart`, default term: SIGTERM stops every instance, so
   all of them are to start again), and recorded: time from launching the new runner
   until every app's instance is RUNNING again, and the longest gap between its
   liveness messages (full heartbeats and beats, runner/beat.py), in heartbeat
   intervals, meanwhile. One work dir serves every count in
   turn (its venvs are built once).

Every wait is bounded (`--timeout`); everything started is stopped by PID; the apps'
users and cgroups are removed at the end. Prints a table with the targets.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import runner_restart as rr  # noqa: E402

from cli.client import Client  # noqa: E402
from cli.credentials import Credentials  # noqa: E402
from cli.localplatform import LocalPlatform, Ports  # noqa: E402
from dbprovision.pgcluster import PgCluster  # noqa: E402
from dbprovision.ports import free_port  # noqa: E402
from messaging import heartbeat  # noqa: E402
from messaging.errors import BerthError  # noqa: E402

ROUTES_TARGET = 2.0
SERVING_TARGET = 10.0
# `default` is what ships (messaging/heartbeat.py); `slow` the earlier default, 1 s x 5
HEARTBEATS = {"default": (heartbeat.INTERVAL, heartbeat.DEAD_AFTER), "slow": (1.0, 5),
              "fast": (0.25, 6)}
APP = "fo"


@dataclass
class Death:
    setting: str
    interval: float
    dead_after: int
    routes_updated: float
    serving: float


def wait(what: str, done: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = done()
            if last:
                return last
        except (OSError, KeyError, ValueError, BerthError) as exc:
            last = exc
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}: last {last!r}")


def berth(platform: LocalPlatform, cfg: Path, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "BERTH_CLI_CONFIG_DIR": str(cfg), "BERTH_CLI_API_URL":
           platform.api_url, "BERTH_CLI_TOKEN": platform.admin_token, "NO_COLOR": "1"}
    env.pop("BERTH_APP", None)
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"berth {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def get_200(port: int) -> bool:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/", headers={"Host": f"{APP}.localhost"})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def deploy_two(platform: LocalPlatform, work: Path, tag: str) -> None:
    """The bench's app (a stdlib HTTP server, empty requirements) pushed through the
    CLI and scaled to two web instances."""
    cfg, src = work / f"cli-{tag}", work / f"src-{tag}"
    src.mkdir()
    (src / "app.py").write_bytes(rr.APP_PY)
    (src / "requirements.txt").write_text("")
    (src / "Procfile").write_text("web: python app.py\n")
    berth(platform, cfg, "apps", "create", APP)
    berth(platform, cfg, "push", str(src), "-a", APP, timeout=600)
    berth(platform, cfg, "scale", "web=2", "-a", APP)


def host_death(work: Path, setting: str, timeout: float) -> Death:
    interval, dead_after = HEARTBEATS[setting]
    knobs = {f"BERTH_{c}_{n}": str(v) for c in ("CONTROLLER", "RUNNER")
             for n, v in (("HEARTBEAT_INTERVAL", interval), ("DEAD_AFTER", dead_after))}
    saved = {k: os.environ.get(k) for k in knobs}
    os.environ.update(knobs)            # the children inherit them
    data = work / f"platform-{setting}"
    platform = LocalPlatform(data, Ports.free(),
                             runners=[("runner-1", "127.0.0.2"), ("runner-2", "127.0.0.3")],
                             wheel_cache_dir=str(work / "wheels"),
                             apps_dir=str(work / f"apps-{setting}"), drain_seconds=1.0,
                             jobs=False)
    dead: Any = None
    try:
        platform.start()
        deploy_two(platform, work, setting)
        api = Client(Credentials(platform.api_url, platform.admin_token), timeout=5)

        def instances() -> list[dict[str, Any]]:
            return [i for i in api.get(f"/v1/apps/{APP}/ps")["instances"]
                    if i["state"] == "RUNNING"]

        def backends() -> set[str]:
            table = api.get("/v1/routes")["routes"].get(APP) or {}
            return {b["id"] for b in table.get("backends", [])}
        wait("one RUNNING instance on each host, both routed",
             lambda: sorted(i["host"] for i in instances()) == ["runner-1", "runner-2"]
             and len(backends()) == 2, timeout)
        victim = next(i for i in instances() if i["host"] == "runner-2")
        time.sleep(2 * interval)        # a steady state: heartbeats flowing
        seen: list[tuple[float, set[str]]] = []
        stop = threading.Event()

        def watch() -> None:
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    seen.append((time.monotonic(), backends()))
                except OSError:
                    pass
                time.sleep(0.02)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        dead = platform.procs.pop("runner-2")
        killed = time.monotonic()
        os.kill(dead.pid, signal.SIGKILL)
        os.killpg(victim["pid"], signal.SIGKILL)
        try:
            wait("routes without the dead host's backend", lambda: any(
                t > killed and victim["instance"] not in ids for t, ids in seen),
                timeout, 0.02)
            routes = next(t for t, ids in seen
                          if t > killed and victim["instance"] not in ids) - killed
            wait("two routed backends again, and the balancer answering", lambda: any(
                t > killed and len(ids) == 2 and victim["instance"] not in ids
                for t, ids in seen) and get_200(platform.ports.balancer), timeout, 0.02)
            serving = next(t for t, ids in seen if t > killed and len(ids) == 2
                           and victim["instance"] not in ids) - killed
        finally:
            stop.set()
            watcher.join(5)
        hosts = sorted(i["host"] for i in instances())
        print(f"host death ({setting}: heartbeat {interval:g} s x {dead_after}): routes "
              f"updated {routes:.2f} s, serving elsewhere {serving:.2f} s; instances now "
              f"on {hosts}", flush=True)
        return Death(setting, interval, dead_after, routes, serving)
    finally:
        if dead is not None:
            dead.wait(10)
        platform.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name in ("runner-1", "runner-2"):
            rr.cleanup_apps(work / f"apps-{setting}" / name)


@dataclass
class Takeover:
    api: float              # kill -> the standby's API answers
    routes: float           # kill -> the new leader publishes the app's route whole
    failed: int             # GETs through the balancer that failed meanwhile
    sent: int


def takeover(work: Path, timeout: float) -> Takeover:
    """kill -9 of the leading controller, a standby on the same PostgreSQL store."""
    from contextlib import closing
    cluster = PgCluster(work / "store-pg", "127.0.0.1", free_port("127.0.0.1"))
    cluster.init()
    cluster.start()
    platform: LocalPlatform | None = None
    try:
        with closing(cluster.connect()) as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE berth_store")
        store_url = (f"postgresql:///berth_store?host={cluster.data}&port={cluster.port}"
                     "&user=postgres")
        platform = LocalPlatform(work / "platform-takeover", Ports.free(),
                                 runners=[("runner-1", "127.0.0.2")],
                                 wheel_cache_dir=str(work / "wheels"),
                                 apps_dir=str(work / "apps-takeover"), drain_seconds=1.0,
                                 jobs=False, store_url=store_url)
        platform.start()
        platform.start_standby_controller("controller-2")
        deploy_two(platform, work, "takeover")
        api = Client(Credentials(platform.api_url, platform.admin_token), timeout=2)

        def backends() -> set[str]:
            table = api.get("/v1/routes")["routes"].get(APP) or {}
            return {b["id"] for b in table.get("backends", [])}
        before = wait("two routed backends", lambda: len(b := backends()) == 2 and b,
                      timeout)
        results: list[bool] = []
        stop = threading.Event()

        def load() -> None:
            deadline = time.monotonic() + timeout
            while not stop.is_set() and time.monotonic() < deadline:
                results.append(get_200(platform.ports.balancer))
                time.sleep(0.01)
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1.0)
        leader = platform.procs["controller"]
        killed = time.monotonic()
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait(10)
        wait("the standby's API", lambda: api.get("/v1/health"), timeout, 0.02)
        api_back = time.monotonic() - killed
        wait("the new leader's route, whole", lambda: backends() == before, timeout, 0.02)
        routes = time.monotonic() - killed
        time.sleep(1.0)
        stop.set()
        loader.join(10)
        print(f"controller takeover: API answering {api_back:.2f} s, route published "
              f"{routes:.2f} s after the kill; {results.count(False)} of {len(results)} "
              "requests failed", flush=True)
        return Takeover(api_back, routes, results.count(False), len(results))
    finally:
        if platform is not None:
            platform.stop()
            rr.cleanup_apps(work / "apps-takeover" / "runner-1")
        cluster.stop()


@dataclass
class Restart:
    apps: int
    first_start: float
    result: rr.Result


def runner_restarts(work: Path, counts: list[int], modes: list[str],
                    timeout: float) -> list[Restart]:
    """Each count in turn on one runner work dir (venvs built once per app)."""
    out: list[Restart] = []
    slugs = rr.SlugServer(rr.make_slug())
    proc: subprocess.Popen[bytes] | None = None
    ctl: rr.StandIn | None = None
    try:
        for n in counts:
            if proc is not None:
                rr.stop(proc, signal.SIGTERM)
            if ctl is not None:
                ctl.close()
            ctl = rr.StandIn([f"b{i:03d}" for i in range(n)], slugs)
            proc = rr.start_runner(work, ctl, {})
            took = ctl.wait(f"{n} apps RUNNING", lambda c=ctl, n=n: len(c.running()) == n,
                            timeout)
            print(f"{n} apps running after {took:.1f}s (first start)", flush=True)
            for mode in modes:
                proc, result = rr.restart(work, ctl, proc, mode, {}, timeout)
                print(f"  {n} apps, restart ({mode}): {result}", flush=True)
                out.append(Restart(n, took, result))
    finally:
        if proc is not None:
            rr.stop(proc, signal.SIGTERM)
        if ctl is not None:
            ctl.close()
        slugs.close()
        rr.cleanup_apps(work / "apps")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--death", default="default,slow",
                    help="heartbeat settings for the host death runs: default, slow, "
                         "fast (empty: none)")
    ap.add_argument("--apps", default="25,100,200",
                    help="app counts for the runner restart runs (empty: none)")
    ap.add_argument("--restart", default="term", help="restart modes: term, kill")
    ap.add_argument("--no-takeover", action="store_true",
                    help="skip the standby controller takeover run")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on every wait")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    settings = [s for s in args.death.split(",") if s]
    if any(s not in HEARTBEATS for s in settings):
        raise SystemExit(f"--death takes {', '.join(HEARTBEATS)}")
    counts = [int(n) for n in args.apps.split(",") if n]
    if any(not 1 <= n <= 300 for n in counts):
        raise SystemExit("--apps: each 1..300")
    # app users must reach their files: not under /tmp, every parent o+x
    work = Path(tempfile.mkdtemp(prefix="berth-bench-failover-", dir="/var/tmp"))
    work.chmod(0o711)
    deaths: list[Death] = []
    restarts: list[Restart] = []
    took_over: Takeover | None = None
    try:
        for s in settings:
            deaths.append(host_death(work, s, args.timeout))
        if not args.no_takeover:
            took_over = takeover(work, args.timeout)
        if counts:
            restarts = runner_restarts(work, counts, args.restart.split(","), args.timeout)
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    if deaths:
        print("host death (kill -9 of a runner and its instance), two hosts, one app x 2")
        print("| heartbeat | routes updated s (target < 2) | serving elsewhere s "
              "(target < 10) |")
        print("|---|---:|---:|")
        for d in deaths:
            print(f"| {d.setting}: {d.interval:g} s x {d.dead_after} = "
                  f"{d.interval * d.dead_after:g} s | {d.routes_updated:.2f} "
                  f"{'ok' if d.routes_updated < ROUTES_TARGET else 'MISSED'} | "
                  f"{d.serving:.2f} {'ok' if d.serving < SERVING_TARGET else 'MISSED'} |")
        print()
    if took_over is not None:
        t = took_over
        print("controller takeover (kill -9 of the leader; a standby on the same "
              "PostgreSQL store), one app x 2 on one host, GETs through the balancer")
        print("| standby API answering s | new leader's route published s | failed |")
        print("|---:|---:|---:|")
        print(f"| {t.api:.2f} | {t.routes:.2f} | {t.failed} of {t.sent} |")
        print()
    if restarts:
        print(f"runner restart, 1 web instance per app, heartbeat every {rr.INTERVAL:g} s "
              "(target: no gap over 1 interval, recovery not growing with apps)")
        print("| apps | restart | first heartbeat s | longest heartbeat gap s (intervals) "
              "| all RUNNING again s | restarted | kept |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in restarts:
            x = r.result
            print(f"| {r.apps} | {x.mode} | {x.first_beat:.2f} | {x.max_gap:.2f} "
                  f"({x.max_gap / rr.INTERVAL:.2f}) | {x.all_running:.2f} | {x.new} | "
                  f"{x.kept} |")


if __name__ == "__main__":
    main()
