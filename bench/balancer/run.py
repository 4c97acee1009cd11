"""The balancer against its peers: wrk through the Berth balancer, HAProxy
(single thread) and nginx (one worker), each in front of the same fast backend
(nginx returning a short body and a 1 MB file), plus that backend direct. Run by
hand, never from the test suite:

    .venv/bin/python bench/balancer/run.py [--duration 10] [--connections 50]
        [--only small-ka] [--targets berth,haproxy] [--profile py-spy|cprofile]

Everything listens on 127.0.0.1 on free ports, with its own config and prefix in a
temporary directory; every process started here is stopped here by its PID (and
its process group), also on Ctrl-C and errors. wrk, the proxy under test and the
backend share this machine's cores, so the figures are for comparison on one
machine, not absolute capacities.

The balancer gets its route the way it does in production: this script plays the
controller's part of route replication (a PUB of numbered updates with a tick
every second, a ROUTER answering snapshot requests) and drains its access logs
from a PULL, all in one thread.

--profile runs one more wrk pass (the --profile-case, default small-ka) against a
balancer under py-spy (sampling, by PID) or cProfile (`python -m cProfile -m
balancer`), and prints the top functions.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import math
import os
import pstats
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version  # not `import eventlet`: it warns at import
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from messaging import channels  # noqa: E402
from messaging.clone import ClonePublisher  # noqa: E402
from messaging.envelope import recv, send  # noqa: E402

HOST = "bench.localhost"
BIG = 1 << 20
APT_PACKAGES = {"wrk": "wrk", "haproxy": "haproxy", "nginx": "nginx"}
READY_TIMEOUT = 20.0    # seconds a proxy has to answer after its start (callgrind: more)
TOOL_PATHS = {"wrk": "/usr/bin/wrk", "haproxy": "/usr/sbin/haproxy", "nginx": "/usr/sbin/nginx"}


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    headers: tuple[str, ...]
    body_bytes: int
    help: str


CASES = {c.name: c for c in (
    Case("small-ka", "/", (), 6, "6-byte body, keep-alive"),
    Case("small-close", "/", ("Connection: close",), 6,
         "6-byte body, a new client connection per request"),
    Case("1m-ka", "/1m", (), BIG, "1 MB body, keep-alive"),
)}
TARGETS = ("berth", "berth-asyncio", "haproxy", "nginx", "direct")
# balancer targets: (engine, native); the native core is used when built (--no-native:
# not built here), "-py" targets never use it
ENGINES = {"berth": ("eventlet", True), "berth-asyncio": ("asyncio", True),
           "berth-asyncio-py": ("asyncio", False)}
# on request only: floor.py, a bare eventlet relay; aio_floor.py, bare uvloop Protocols
EXTRA_TARGETS = ("floor", "floor-aio", "berth-asyncio-py")
FLOORS = {"floor": "floor.py", "floor-aio": "aio_floor.py"}


# -- small helpers -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(template: str, out: Path, **values: Any) -> Path:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise RuntimeError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    out.write_text(text)
    return out


def tool(name: str) -> str:
    found = shutil.which(name) or (TOOL_PATHS[name] if os.path.exists(TOOL_PATHS[name])
                                   else None)
    if found is None:
        raise RuntimeError(f"{name} is not installed")
    return found


def ensure_tools() -> None:
    """apt-get install what is missing (apt-get update first only if needed)."""
    missing = [pkg for name, pkg in APT_PACKAGES.items()
               if not (shutil.which(name) or os.path.exists(TOOL_PATHS[name]))]
    if not missing:
        return
    print(f"-----> installing {' '.join(missing)} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install failed: {done.stderr.strip()}")


def wait_http(port: int, path: str = "/", timeout: float = 20.0,
              alive: Callable[[], bool] = lambda: True) -> bytes:
    """GET until a 200 arrives (a balancer answers 404 until its route arrives)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process behind port {port} exited ({last})")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path, headers={"Host": HOST})
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200:
                return body
            last = f"status {r.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"127.0.0.1:{port}{path} gave no 200 in {timeout:g} s ({last})")


def session_cpu(sid: int) -> tuple[float, float]:
    """CPU seconds (user, system) used so far by the live processes of session
    `sid`: a child started here and what it forked (nginx workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()   # after "pid (comm)"
        if int(fields[3]) == sid:                  # field 6: session id
            user += int(fields[11])                     # utime
            system += int(fields[12])                   # stime
    return user / tick, system / tick


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


# -- processes ---------------------------------------------------------------------

class Child:
    """One process started here, in its own session, stopped here by PID (then by
    its process group, which holds only what it started, e.g. nginx workers)."""

    def __init__(self, name: str, args: list[str], log: Path, **kw: Any) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     **kw)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"       {self.name} (pid {self.pid}) ignored {sig!r}; killing",
                      file=sys.stderr)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        try:
            os.killpg(self.pid, signal.SIGKILL)   # leftovers in the group we created
        except (ProcessLookupError, PermissionError):
            pass
        self._out.close()
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class RouteController:
    """The controller's half of route replication and the logs channel, in one
    thread that owns every socket it uses."""

    def __init__(self, backend_port: int) -> None:
        self.routes_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.snapshot_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.logs_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.route = {"hosts": [HOST],
                      "backends": [{"id": "nginx", "address": "127.0.0.1",
                                    "port": backend_port}]}
        self.snapshots_served = 0
        self.access_logs = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="routes", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the route publisher did not start: {self.error}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        ctx = zmq.Context()
        socks = []
        try:
            pub = channels.bind(ctx, "routes", self.routes_endpoint)
            router = channels.bind(ctx, "routes_snapshot", self.snapshot_endpoint)
            pull = channels.bind(ctx, "logs", self.logs_endpoint)
            socks = [pub, router, pull]
            clone = ClonePublisher()
            update = clone.set("bench", self.route)
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(pull, zmq.POLLIN)
            self._ready.set()
            if update is not None:
                send(pub, update)
            next_tick = time.monotonic() + 1.0
            while not self._stop.is_set():
                for sock, _ in poller.poll(50):
                    if sock is pull:
                        while True:      # drain: a busy balancer pushes many lines
                            try:
                                _, msg = recv(sock, zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self.access_logs += len(msg["entries"]) \
                                if msg.type == "log_batch" else 1
                        continue
                    ident, msg = recv(sock)
                    if msg.type == "snapshot_request":
                        send(router, clone.snapshot(), identity=ident)
                        self.snapshots_served += 1
                if time.monotonic() >= next_tick:
                    send(pub, clone.tick())
                    next_tick = time.monotonic() + 1.0
        except BaseException as exc:     # reported by start() or the summary
            self.error = exc
        finally:
            for sock in socks:
                sock.close(linger=0)
            ctx.term()


class Bench:
    """Owns the temporary prefix and every process; stop() ends them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = Path(tempfile.mkdtemp(prefix="berth-bench-balancer-"))
        os.chmod(self.prefix, 0o755)           # nginx workers read the 1 MB file
        self.children: list[Child] = []
        self.ports: dict[str, int] = {}
        self.procs: dict[str, Child] = {}
        self.controller: RouteController | None = None
        self.user = "user root;" if os.geteuid() == 0 else ""

    def spawn(self, name: str, args: list[str], **kw: Any) -> Child:
        child = Child(name, args, self.prefix / f"{name}.out", **kw)
        self.children.append(child)
        return child

    def stop_child(self, child: Child) -> None:
        if child in self.children:
            child.stop()
            self.children.remove(child)

    def stop(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:   # keep stopping the others
                print(f"Error: stopping {child.name}: {exc}", file=sys.stderr)
        self.children.clear()
        if self.controller is not None:
            self.controller.stop()
        if self.args.keep:
            print(f"       configs and logs kept in {self.prefix}")
        else:
            shutil.rmtree(self.prefix, ignore_errors=True)

    # -- targets ---------------------------------------------------------------------

    def start_backend(self) -> None:
        (self.prefix / "www").mkdir()
        (self.prefix / "www" / "1m.bin").write_bytes(os.urandom(BIG))
        port = free_port()
        conf = render("backend-nginx.conf", self.prefix / "backend.conf", user=self.user,
                      prefix=self.prefix, port=port, root=self.prefix / "www")
        child = self.spawn("backend", [tool("nginx"), "-p", str(self.prefix), "-c",
                                       str(conf), "-e", str(self.prefix / "backend-error.log"),
                                       "-g", "daemon off;"])
        self._ready(child, port)
        self.ports["direct"] = port
        self.procs["direct"] = child

    def start_haproxy(self) -> None:
        port = free_port()
        conf = render("haproxy.cfg", self.prefix / "haproxy.cfg", port=port,
                      threads=self.args.workers,
                      backend_port=self.ports["direct"])
        child = self.spawn("haproxy", [tool("haproxy"), "-db", "-f", str(conf)])
        self._ready(child, port)
        self.ports["haproxy"] = port
        self.procs["haproxy"] = child

    def start_nginx_proxy(self) -> None:
        port = free_port()
        conf = render("proxy-nginx.conf", self.prefix / "proxy.conf", user=self.user,
                      prefix=self.prefix, port=port, backend_port=self.ports["direct"])
        child = self.spawn("nginx-proxy", [tool("nginx"), "-p", str(self.prefix), "-c",
                                           str(conf), "-e",
                                           str(self.prefix / "proxy-error.log"),
                                           "-g", "daemon off;"])
        self._ready(child, port)
        self.ports["nginx"] = port
        self.procs["nginx"] = child

    def start_controller(self) -> None:
        self.controller = RouteController(self.ports["direct"])
        self.controller.start()

    def start_berth(self, profiler: str | None = None, target: str = "berth") -> Child:
        """The balancer as `target` (berth: eventlet engine, a master and one worker;
        berth-asyncio: the asyncio engine)."""
        assert self.controller is not None
        port = free_port()
        c = self.controller
        conf = render("berth-balancer.yaml", self.prefix / f"berth-{port}.yaml",
                      port=port, routes_endpoint=c.routes_endpoint,
                      snapshot_endpoint=c.snapshot_endpoint,
                      logs_endpoint=c.logs_endpoint, engine=ENGINES[target][0],
                      native=str(ENGINES[target][1]).lower(),
                      processes=self.args.workers)
        py = sys.executable
        ready_timeout = READY_TIMEOUT
        if profiler == "callgrind":
            # one worker binding the port itself (no master), its instructions counted
            valgrind = shutil.which("valgrind")
            if valgrind is None:
                raise RuntimeError("--profile callgrind needs valgrind: apt-get install valgrind")
            cmd = [valgrind, "--tool=callgrind", "--collect-systime=no",
                   f"--callgrind-out-file={self.prefix / 'callgrind.out.%p'}",
                   py, "-m", "balancer", "--worker", "--config", str(conf)]
            ready_timeout = 180.0
        elif profiler == "cprofile":
            cmd = [py, "-m", "cProfile", "-o", str(self.prefix / "balancer.prof"),
                   "-m", "balancer", "--config", str(conf)]
        else:
            cmd = [py, "-m", "balancer", "--config", str(conf)]
        child = self.spawn(target if profiler is None else f"{target}-{profiler}",
                           cmd, cwd=ROOT)
        self._ready(child, port, ready_timeout)
        self.ports[target] = port
        self.procs[target] = child
        return child

    def start_floor(self, name: str) -> None:
        port = free_port()
        child = self.spawn(name, [sys.executable, str(HERE / FLOORS[name]), str(port),
                                  str(self.ports["direct"])])
        self._ready(child, port)
        self.ports[name] = port
        self.procs[name] = child

    def _ready(self, child: Child, port: int, timeout: float = READY_TIMEOUT) -> None:
        try:
            wait_http(port, timeout=timeout, alive=child.alive)
            body = wait_http(port, "/1m", timeout=timeout, alive=child.alive)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{child.name} did not start: {exc}\n{child.tail()}") from None
        if len(body) != BIG:
            raise RuntimeError(f"{child.name}: /1m gave {len(body)} bytes, not {BIG}")

    # -- measuring -------------------------------------------------------------------

    def wrk(self, target: str, case: Case, duration: int) -> Result:
        """wrk against a target; also the CPU its processes used per request."""
        a = self.args
        port = self.ports[target]
        sid = self.procs[target].pid
        cpu0, wall0 = session_cpu(sid), time.monotonic()
        cmd = [tool("wrk"), f"-t{a.threads}", f"-c{a.connections}", f"-d{duration:g}s",
               "--latency", "--timeout", "5s", "-H", f"Host: {HOST}"]
        for h in case.headers:
            cmd += ["-H", h]
        cmd.append(f"http://127.0.0.1:{port}{case.path}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()}")
        (user1, sys1), wall = session_cpu(sid), time.monotonic() - wall0
        user, system = user1 - cpu0[0], sys1 - cpu0[1]
        cpu = user + system
        result = Result.parse(done.stdout)
        result.cpu_share = cpu / wall
        result.sys_pct = 100 * system / cpu if cpu else float("nan")
        result.cpu_us = 1e6 * cpu / result.requests if result.requests else float("nan")
        result.load = loadavg()
        return result


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    raw: str
    cpu_share: float = float("nan")   # cores the target's processes kept busy
    cpu_us: float = float("nan")      # their CPU microseconds per request
    sys_pct: float = float("nan")     # the kernel's share of that CPU time
    load: str = "?"                   # 1-minute load average when the run ended
    time_wait: int = -1               # TIME_WAIT sockets on the machine as it began
    ratio: float = float("nan")       # req/s against HAProxy's in the same round

    UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}

    @classmethod
    def parse(cls, out: str) -> Result:
        def latency(pct: str) -> float:
            m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
            return float(m.group(1)) * cls.UNITS[m.group(2)] if m else float("nan")

        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        reqs = re.search(r"(\d+) requests in", out)
        errors = sum(int(n) for n in re.findall(
            r"(?:connect|read|write|timeout) (\d+)", out))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            errors += int(non2xx.group(1))
        if rps is None:
            raise RuntimeError(f"cannot read wrk's output:\n{out}")
        return cls(float(rps.group(1)), latency("50"), latency("99"),
                   int(reqs.group(1)) if reqs else 0, errors, out)


# -- the run -----------------------------------------------------------------------

def time_wait() -> int:
    """TIME_WAIT sockets on the machine: a `Connection: close` run leaves tens of
    thousands for 60 s, and the run after it pays for them in the kernel."""
    try:
        m = re.search(r"\btw (\d+)", Path("/proc/net/sockstat").read_text())
    except OSError:
        return -1
    return int(m.group(1)) if m else -1


def measure(bench: Bench, targets: list[str], cases: list[Case]
            ) -> dict[tuple[str, str], list[Result]]:
    """Every target on every case, `--rounds` times. Odd rounds take the targets in
    reverse order, so no target always runs after another's TIME_WAIT sockets or
    first on a cool machine; each run's ratio is against HAProxy's in its round."""
    a = bench.args
    results: dict[tuple[str, str], list[Result]] = {}
    for rnd in range(a.rounds):
        for case in cases:
            order = targets if rnd % 2 == 0 else targets[::-1]
            done: dict[str, Result] = {}
            for target in order:
                if a.warmup > 0:
                    bench.wrk(target, case, a.warmup)
                time.sleep(a.pause)
                tw = time_wait()
                r = bench.wrk(target, case, a.duration)
                r.time_wait = tw
                done[target] = r
                results.setdefault((target, case.name), []).append(r)
                note = f"  errors={r.errors}" if r.errors else ""
                print(f"       {target:8} {case.name:12} {r.rps:10.0f} req/s  "
                      f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  "
                      f"cpu {r.cpu_share:4.2f} cores {r.cpu_us:6.1f} us/req "
                      f"({r.sys_pct:2.0f}% sys)  load {loadavg()}  "
                      f"time-wait {tw}{note}", flush=True)
                time.sleep(a.pause)
            base = done.get("haproxy")
            if base is not None and base.rps:
                for r in done.values():
                    r.ratio = r.rps / base.rps
            if a.rounds > 1 and base is not None:
                print(f"       round {rnd + 1} {case.name}: " + ", ".join(
                    f"{t} {done[t].ratio:.2f}" for t in targets if t != "haproxy"),
                    flush=True)
    return results


def median_run(runs: list[Result]) -> Result:
    """The run with the median ratio to HAProxy (else the median req/s): its
    figures are shown together, as measured."""
    if any(math.isnan(r.ratio) for r in runs):
        return sorted(runs, key=lambda r: r.rps)[(len(runs) - 1) // 2]
    return sorted(runs, key=lambda r: r.ratio)[(len(runs) - 1) // 2]


def table(results: dict[tuple[str, str], list[Result]], targets: list[str],
          cases: list[Case]) -> str:
    """One row per target and case: the median round's run; with more than one
    round, every round's ratio beside it."""
    rounds = max((len(v) for v in results.values()), default=1)
    rows = ["| target | case | req/s | p50 ms | p99 ms | vs HAProxy | "
            + ("ratio each round | " if rounds > 1 else "")
            + "CPU cores | CPU us/req | kernel % | errors | load |",
            "|---|---|---:|---:|---:|---:|" + ("---|" if rounds > 1 else "")
            + "---:|---:|---:|---:|---:|"]
    for case in cases:
        for target in targets:
            runs = results.get((target, case.name))
            if not runs:
                continue
            r = median_run(runs)
            ratio = "-" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
            each = (" " + ", ".join(f"{x.ratio:.2f}" for x in runs) + " |"
                    if rounds > 1 else "")
            errors = sum(x.errors for x in runs)
            rows.append(f"| {target} | {case.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | "
                        f"{r.p99_ms:.2f} | {ratio} |{each} {r.cpu_share:.2f} | "
                        f"{r.cpu_us:.1f} | {r.sys_pct:.0f} | {errors} | {r.load} |")
    return "\n".join(rows)


def profile(bench: Bench, tool_name: str, case: Case) -> None:
    """One wrk pass against a balancer under a profiler; prints the top functions."""
    a = bench.args
    print(f"-----> profiling the balancer with {tool_name} during {case.name} "
          f"({a.duration:g} s)", flush=True)
    target = a.profile_target
    old = next((c for c in bench.children if c.name == target), None)
    if old is not None:
        bench.stop_child(old)
    child = bench.start_berth(tool_name if tool_name in ("cprofile", "callgrind")
                              else None, target)
    if tool_name == "callgrind":
        callgrind_per_request(bench, child, case)
        return
    spy = None
    if tool_name == "py-spy":
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        raw = bench.prefix / "balancer.pyspy.txt"
        # a master and one worker: sample the worker
        spy = bench.spawn("py-spy", [pyspy, "record", "--pid", str(worker_pid(child.pid)),
                                     "--duration", f"{a.duration + 1:g}",
                                     "--rate", "200", "--format", "raw",
                                     "--output", str(raw)]
                          + (["--native"] if a.profile_native else []))
        time.sleep(1.0)
    if a.warmup > 0 and spy is None:
        bench.wrk(target, case, a.warmup)
    r = bench.wrk(target, case, a.duration)
    print(f"       under {tool_name}: {r.rps:.0f} req/s, p50 {r.p50_ms:.2f} ms, "
          f"p99 {r.p99_ms:.2f} ms, {r.cpu_us:.0f} CPU us/req", flush=True)
    if spy is not None:
        spy.proc.wait(a.duration + 60)
        bench.stop_child(spy)
        print_collapsed(raw, a.profile_top)
        if a.keep:
            print(f"       raw stacks: {raw}")
    bench.stop_child(child)          # SIGTERM: cProfile writes its file on exit
    if tool_name == "cprofile":
        stats = pstats.Stats(str(bench.prefix / "balancer.prof"))
        stats.strip_dirs()
        print("       top by own time (tottime):")
        stats.sort_stats("tottime").print_stats(a.profile_top)
        print("       top by cumulative time (greenlet switches blur these):")
        stats.sort_stats("cumulative").print_stats(a.profile_top)


def callgrind_per_request(bench: Bench, child: Child, case: Case) -> None:
    """User-space instructions per request of one worker under callgrind, counted
    from zero after a warm-up to a dump after the wrk run: a figure that, unlike
    CPU time, does not move with the machine's load (kernel time is not in it)."""
    a = bench.args
    control = shutil.which("callgrind_control") or "callgrind_control"
    bench.wrk(a.profile_target, case, max(a.warmup, 2))
    subprocess.run([control, "--zero", str(child.pid)], check=True, capture_output=True)
    r = bench.wrk(a.profile_target, case, a.duration)
    subprocess.run([control, "--dump", str(child.pid)], check=True, capture_output=True)
    dumps = sorted(bench.prefix.glob(f"callgrind.out.{child.pid}.*"))
    if not dumps:
        raise RuntimeError(f"no callgrind dump in {bench.prefix}")
    text = dumps[-1].read_text(errors="replace")
    total = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if total is None or not r.requests:
        raise RuntimeError(f"no instruction total in {dumps[-1]} or no requests")
    ir = int(total.group(1))
    print(f"       under callgrind, {case.name}: {r.requests} requests, "
          f"{ir / r.requests:,.0f} instructions per request (user space, the "
          f"worker's threads; {dumps[-1]})", flush=True)
    bench.stop_child(child)


def worker_pid(pid: int) -> int:
    """The first child of `pid` (the balancer master's worker), else `pid` itself
    (a worker started by hand runs as one process)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return int(children[0]) if children else pid


def print_collapsed(raw: Path, top: int) -> None:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks
    (`frame;frame;frame count` per line, outermost first)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        print("       py-spy collected no samples")
        return
    print(f"       {total} samples; top by own time:")
    for name, n in own.most_common(top):
        print(f"       {100 * n / total:6.1f}%  {name}")
    print("       top by inclusive time:")
    for name, n in incl.most_common(top):
        print(f"       {100 * n / total:6.1f}%  {name}")


def _short(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`: one entry per function."""
    m = re.match(r"(.*) \((.*?):?(\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{m.group(1)} ({short})"


def machine() -> str:
    def first(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return "\n".join([
        f"cores: {os.cpu_count()}  cpu: {model}  kernel: {os.uname().release}  "
        f"load average (1 min): {loadavg()}",
        f"python {sys.version.split()[0]} ({os.path.realpath(sys.executable)})  "
        f"eventlet {version('eventlet')}  "
        f"pyzmq {zmq.__version__}  uvloop {_version('uvloop')}  "
        f"httptools {_version('httptools')}",
        f"{first([tool('wrk'), '-v'])}",
        f"{first([tool('haproxy'), '-v'])}",
        f"{first([tool('nginx'), '-v'])}",
    ])


def build_native() -> str:
    """Build the mypyc-compiled balancer core (balancer/native.py) if it is not."""
    from balancer import native
    path = native.build()
    return f"native core (mypyc) for these sources: {path}"


def _version(dist: str) -> str:
    try:
        return version(dist)
    except Exception:        # not installed
        return "-"


def failures(results: dict[tuple[str, str], list[Result]]) -> list[str]:
    """Targets whose run had errors (socket errors, timeouts, non-2xx): their
    figures are not comparable and the run fails."""
    return [f"{target} {case}: {r.errors} errors" for (target, case), runs in results.items()
            for r in runs if r.errors or not r.requests]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of unrecorded wrk before each run (0: none)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between runs")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every case this many times, odd rounds in reverse target "
                        "order; the table shows the median round and each ratio")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--workers", type=int, default=1,
                   help="balancer worker processes, against HAProxy's nbthread")
    p.add_argument("--only", action="append", choices=sorted(CASES),
                   help="run only this case (repeatable)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS + EXTRA_TARGETS)}")
    p.add_argument("--profile", choices=("py-spy", "cprofile", "callgrind"),
                   help="after the table, profile the balancer during one wrk run "
                        "(callgrind: one worker's instructions per request)")
    p.add_argument("--profile-case", choices=sorted(CASES), default="small-ka")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--profile-native", action="store_true",
                   help="py-spy --native: C frames too (uvloop, the compiled core)")
    p.add_argument("--profile-target", choices=sorted(ENGINES), default="berth-asyncio",
                   help="which balancer to profile (cProfile sees only the master's "
                        "process: use py-spy, which samples the worker)")
    p.add_argument("--no-native", action="store_true",
                   help="do not build the mypyc-compiled core (the balancer then runs "
                        "pure Python unless a build for these sources exists)")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing wrk/haproxy/nginx")
    p.add_argument("--keep", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    every = TARGETS + EXTRA_TARGETS
    bad = [t for t in targets if t not in every]
    if bad:
        p.error(f"unknown target(s) {', '.join(bad)}; use {', '.join(every)}")
    args.target_list = [t for t in every if t in targets]
    if args.duration <= 0 or args.duration > 600:
        p.error("--duration must be 1 to 600 seconds")
    if args.rounds < 1 or args.rounds > 20:
        p.error("--rounds must be 1 to 20")
    if args.warmup < 0 or args.warmup > 60:
        p.error("--warmup must be 0 to 60 seconds")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_install:
        ensure_tools()
    cases = [CASES[n] for n in (args.only or CASES)]
    bench = Bench(args)
    # SIGTERM and SIGINT end the run through the finally below
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if inherited as ignored
    try:
        print("-----> machine\n" + "\n".join(f"       {line}" for line in
                                               machine().splitlines()), flush=True)
        print(f"-----> starting the backend and the proxies in {bench.prefix}", flush=True)
        bench.start_backend()
        if "haproxy" in args.target_list:
            bench.start_haproxy()
        if "nginx" in args.target_list:
            bench.start_nginx_proxy()
        for name in FLOORS:
            if name in args.target_list:
                bench.start_floor(name)
        need_berth = any(t in ENGINES for t in args.target_list) or args.profile
        if need_berth:
            bench.start_controller()
        if need_berth and not args.no_native:
            print(f"-----> {build_native()}", flush=True)
        for target in ENGINES:
            if target in args.target_list:
                bench.start_berth(target=target)
        print(f"-----> wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
              f"--latency -H 'Host: {HOST}' (+{args.warmup:g} s warm-up each)", flush=True)
        results = measure(bench, args.target_list, cases)
        print()
        print(table(results, args.target_list, cases))
        print()
        if bench.controller is not None:
            c = bench.controller
            print(f"       balancer: {c.snapshots_served} snapshot(s) served, "
                  f"{c.access_logs} access log lines received")
        failed = failures(results)
        if failed:
            print("Error: targets returned errors, their figures do not count: "
                  + "; ".join(failed), file=sys.stderr)
        if args.profile:
            profile(bench, args.profile, CASES[args.profile_case])
        if failed:
            return 1
        if bench.controller is not None and bench.controller.error is not None:
            print(f"Error: the route publisher failed: {bench.controller.error!r}",
                  file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print("\nError: interrupted; stopping what was started.", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stop()


if __name__ == "__main__":
    sys.exit(main())
