"""The controller loop's latency under access-log load: a real controller
(`python -m controller --config ...`, its own data dir, free ports on 127.0.0.1)
probed with `routes_snapshot` round trips (a DEALER sends `snapshot_request`, the
loop answers it in `_drain`) every --interval, first idle, then while --pushers
processes each push `log_batch` messages of --batch access-log entries (over --apps
apps) --rate times a second, as balancer workers do. Run by hand, never from the
test suite:

    .venv/bin/python bench/controller/loop_latency.py [--duration 10] [--idle 3]
        [--pushers 4] [--rate 10] [--batch 500] [--apps 50]
        [--variants f2fc9b9,worktree] [--tree HEAD]

Each variant is a version of controller/logstore.py: a git revision, or `worktree`
for the checkout's file. The rest of the code (controller, messaging, config) is
--tree: by default the committed HEAD, exported with `git archive` into a temporary
directory, so uncommitted work elsewhere in the checkout does not enter the figures
(`--tree worktree` copies the checkout's packages instead). For every variant the
tree gets that variant's logstore.py and runs as `python -m controller`, so the
pre-change store and the new one run in one invocation, one after the other, and
print side by side with ratios (the first variant is the baseline).

Reported per variant: probe round trip p50/p95/p99/max idle and loaded, the
controller's CPU while loaded, entries offered and dropped (a full PUSH queue drops,
as a balancer's does), entries/s that reached the app log files during the loaded
window, and how long after the load the files held every entry sent.

The probe and the pushers are processes of their own (this script in --probe and
--push mode, importing the tree's messaging). Every process started here runs in
its own session and is stopped here by its PID (then its process group), also on
Ctrl-C and errors; a run stops by itself. Pushers, probe and controller share this
machine's cores: the figures compare variants on one machine, they are not
capacities.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve()
# the probe and pusher processes import the tree under test, not the checkout
CODE = Path(os.environ.get("BERTH_BENCH_CODE") or ROOT)
sys.path.insert(0, str(CODE))

import zmq  # noqa: E402

WORKTREE = "worktree"
DEFAULT_BASELINE = "f2fc9b9"      # the last commit with the open/append/close LogStore
PROBE_TIMEOUT = 5.0               # a probe unanswered this long counts as a timeout
READY_TIMEOUT = 30.0              # for the controller's first snapshot answer
DRAIN_LIMIT = 20.0                # seconds to wait after the load for the files to catch up
PACKAGES = ("backup", "balancer", "cli", "config", "controller", "dbprovision", "messaging",
            "runner", "settings_templates")
PATHS = ("/", "/api/items", "/api/items/42", "/static/app.css", "/static/app.js",
         "/login", "/healthz", "/api/search?q=berth", "/favicon.ico", "/api/orders")
STATUSES = (200,) * 14 + (201, 204, 301, 304, 404, 500)


# -- helpers ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def lines_in(directory: Path) -> int:
    total = 0
    for path in directory.glob("*.log"):
        try:
            with open(path, "rb") as fh:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        except FileNotFoundError:
            pass
    return total


def git(*args: str) -> bytes:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def export_tree(tree: str, variant: str, dest: Path) -> Path:
    """The code under test in `dest`: `tree` with `variant`'s controller/logstore.py."""
    if tree == WORKTREE:
        for pkg in PACKAGES:
            if (ROOT / pkg).is_dir():
                shutil.copytree(ROOT / pkg, dest / pkg,
                                ignore=shutil.ignore_patterns("__pycache__"))
    else:
        with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", tree))) as tar:
            tar.extractall(dest)      # our own repository's files, from git itself
    store = dest / "controller" / "logstore.py"
    if variant == WORKTREE:
        shutil.copyfile(ROOT / "controller" / "logstore.py", store)
    else:
        store.write_bytes(git("show", f"{variant}:controller/logstore.py"))
    return dest


class Child:
    """One process started here, in its own session, stopped here by PID."""

    def __init__(self, name: str, args: list[str], log: Path, code: Path,
                 pipes: bool = False) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "ab")
        env = dict(os.environ, PYTHONPATH=str(code), BERTH_BENCH_CODE=str(code))
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE if pipes else self._out, stderr=self._out,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL, start_new_session=True,
            cwd=code, env=env, text=pipes or None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def hear(self, timeout: float) -> dict[str, Any]:
        """One JSON line from the child's stdout, within `timeout` seconds."""
        assert self.proc.stdout is not None
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{self.name} said nothing in {timeout:g} s:\n{self.tail()}")
        return dict(json.loads(line))

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
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._out.close()
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- one variant ------------------------------------------------------------------

@dataclass
class Result:
    variant: str
    idle: list[float] = field(default_factory=list)
    loaded: list[float] = field(default_factory=list)
    offered: int = 0
    dropped: int = 0
    stored_in_window: int = 0
    window: float = 0.0
    stored_total: int = 0
    caught_up: float | None = None
    cpu_cores: float = 0.0
    probe_timeouts: int = 0
    worst: list[tuple[float, float]] = field(default_factory=list)   # (rtt, at s)


def run_variant(variant: str, args: argparse.Namespace, prefix: Path,
                children: list[Child]) -> Result:
    home = prefix / variant
    home.mkdir()
    code = export_tree(args.tree, variant, home / "code")
    ports = {name: f"tcp://127.0.0.1:{free_port()}" for name in (
        "control_endpoint", "routes_endpoint", "routes_snapshot_endpoint", "logs_endpoint",
        "stats_endpoint", "stats_out_endpoint")}
    config = home / "controller.yaml"
    settings = {"data_dir": str(home / "data"), "api_port": free_port(),
                "log_level": "warning", **ports}
    config.write_text("controller:\n" + "".join(f"  {k}: {json.dumps(v)}\n"
                                                for k, v in settings.items()))

    def spawn(name: str, argv: list[str], pipes: bool = False) -> Child:
        child = Child(name, argv, home / f"{name}.log", code, pipes)
        children.append(child)
        return child

    def done(child: Child) -> None:
        child.stop()
        children.remove(child)

    controller = spawn("controller", [sys.executable, "-m", "controller", "--config",
                                      str(config)])
    probe = spawn("probe", [sys.executable, str(SCRIPT), "--probe",
                            ports["routes_snapshot_endpoint"],
                            "--interval", str(args.interval)], pipes=True)
    result = Result(variant)
    try:
        probe.hear(READY_TIMEOUT + 5)                       # {"ready": ...}
        time.sleep(0.5)
        print(f"-----> {variant}: idle {args.idle:g} s (load {loadavg()})", flush=True)
        probe.say(json.dumps({"start_at": time.time(), "seconds": args.idle}))
        result.idle = probe.hear(args.idle + PROBE_TIMEOUT + 10)["rtts"]
        print(f"-----> {variant}: {args.pushers} pusher(s) x {args.rate:g} batches/s x "
              f"{args.batch} entries for {args.duration:g} s", flush=True)
        start_at = time.time() + 1.0          # the pushers start up before the window
        pushers = [spawn(f"pusher-{n}", [
            sys.executable, str(SCRIPT), "--push", ports["logs_endpoint"],
            "--rate", str(args.rate), "--batch", str(args.batch), "--apps", str(args.apps),
            "--duration", str(args.duration), "--seed", str(n), "--start-at", repr(start_at),
            "--phase", str(0.0 if args.aligned else n / max(1, args.pushers))], pipes=True)
            for n in range(args.pushers)]
        probe.say(json.dumps({"start_at": start_at, "seconds": args.duration}))
        time.sleep(max(0.0, start_at - time.time()))
        cpu0, t0 = cpu_seconds(controller.pid), time.monotonic()
        time.sleep(args.duration)
        result.window = time.monotonic() - t0
        result.cpu_cores = (cpu_seconds(controller.pid) - cpu0) / result.window
        apps_dir = home / "data" / "logs" / "apps"
        result.stored_in_window = lines_in(apps_dir)
        end_of_load = time.monotonic()
        answer = probe.hear(PROBE_TIMEOUT + 10)
        result.loaded, result.probe_timeouts = answer["rtts"], answer["timeouts"]
        result.worst = sorted(zip(answer["rtts"], answer["at"], strict=True), reverse=True)[:3]
        for p in pushers:
            report = p.hear(30)
            result.offered += report["entries"]
            result.dropped += report["dropped"]
            done(p)
        want = result.offered - result.dropped
        while time.monotonic() - end_of_load < DRAIN_LIMIT:
            result.stored_total = lines_in(apps_dir)
            if result.stored_total >= want:
                result.caught_up = time.monotonic() - end_of_load
                break
            time.sleep(0.05)
        if not controller.alive():
            raise RuntimeError(f"the controller ({variant}) exited:\n{controller.tail()}")
        return result
    finally:
        for child in (probe, controller):
            if child in children:
                done(child)


# -- the report -------------------------------------------------------------------

def ms(v: float) -> str:
    return f"{v * 1000:.2f}"


def table(results: list[Result]) -> str:
    rows = ["| variant | phase | samples | p50 ms | p95 ms | p99 ms | max ms | "
            "entries offered/s | dropped | stored/s in window | all stored after s | "
            "controller CPU cores |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.variant} | idle | {len(r.idle)} | {ms(pct(r.idle, 50))} | "
                    f"{ms(pct(r.idle, 95))} | {ms(pct(r.idle, 99))} | "
                    f"{ms(max(r.idle, default=float('nan')))} | - | - | - | - | - |")
        caught = f"{r.caught_up:.2f}" if r.caught_up is not None else \
            f"never ({r.stored_total:,} of {r.offered - r.dropped:,})"
        rows.append(f"| {r.variant} | loaded | {len(r.loaded)} | {ms(pct(r.loaded, 50))} | "
                    f"{ms(pct(r.loaded, 95))} | {ms(pct(r.loaded, 99))} | "
                    f"{ms(max(r.loaded, default=float('nan')))} | "
                    f"{r.offered / r.window:,.0f} | {r.dropped:,} | "
                    f"{r.stored_in_window / r.window:,.0f} | {caught} | "
                    f"{r.cpu_cores:.2f} |")
    return "\n".join(rows)


def ratios(base: Result, new: Result) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"
    parts = []
    for phase in ("idle", "loaded"):
        a, b = getattr(base, phase), getattr(new, phase)
        parts.append(f"{phase} p50 {ratio(pct(a, 50), pct(b, 50))}, "
                     f"p99 {ratio(pct(a, 99), pct(b, 99))}, "
                     f"max {ratio(max(a, default=0), max(b, default=0))}")
    parts.append("controller CPU " + ratio(base.cpu_cores, new.cpu_cores))
    stored = ratio(new.stored_in_window / new.window, base.stored_in_window / base.window)
    return (f"{base.variant} / {new.variant} (above 1: {new.variant} is lower): "
            + "; ".join(parts) + f"; stored/s {new.variant} / {base.variant}: {stored}")


# -- the child modes --------------------------------------------------------------

def probe(endpoint: str, interval: float, stdin: IO[str]) -> int:
    """A DEALER on routes_snapshot, one snapshot_request at a time, one every
    `interval` (at once after an answer that took longer). Prints {"ready": s} when
    the controller first answers, then for each {"start_at", "seconds"} line read,
    sleeps until start_at, samples for `seconds` and prints {"rtts", "at" (each
    request's offset in the window), "timeouts"}."""
    from messaging import channels
    from messaging.envelope import make, recv, send

    ctx = zmq.Context()
    sock = channels.connect(ctx, "routes_snapshot", endpoint)
    timeouts = 0

    def once(timeout: float) -> float | None:
        nonlocal sock, timeouts
        started = time.perf_counter()
        send(sock, make("snapshot_request", "bench-probe"))
        while sock.poll(int(max(0.0, started + timeout - time.perf_counter()) * 1000)):
            _, msg = recv(sock)
            if msg.type == "snapshot":
                return time.perf_counter() - started
        timeouts += 1
        sock.close(0)        # a late answer must not pass for the next request's
        sock = channels.connect(ctx, "routes_snapshot", endpoint)
        return None

    began = time.monotonic()
    while once(0.5) is None:
        if time.monotonic() - began > READY_TIMEOUT:
            print("the controller never answered a snapshot_request", file=sys.stderr)
            return 1
    print(json.dumps({"ready": time.monotonic() - began}), flush=True)
    for line in stdin:
        ask = json.loads(line)
        time.sleep(max(0.0, ask["start_at"] - time.time()))
        timeouts, rtts, offsets = 0, [], []
        began = time.monotonic()
        end = began + ask["seconds"]
        next_at = time.monotonic()
        while time.monotonic() < end:
            sent_at = time.monotonic() - began
            rtt = once(PROBE_TIMEOUT)
            if rtt is not None:
                rtts.append(rtt)
                offsets.append(sent_at)
            next_at += interval
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()
        print(json.dumps({"rtts": rtts, "at": offsets, "timeouts": timeouts}), flush=True)
    sock.close(0)
    ctx.term()
    return 0


def push(endpoint: str, rate: float, batch: int, apps: int, duration: float,
         seed: int, start_at: float, phase: float) -> int:
    """One balancer worker's access log: `log_batch` of `batch` entries, `rate` a
    second for `duration` seconds from `start_at` (+ `phase` of a period), never
    blocking (a full queue drops, as balancer.telemetry does); prints
    {"entries": offered, "dropped": n} at the end."""
    from messaging import channels
    from messaging.envelope import make, send

    rng = random.Random(seed)
    names = [f"app{n:02d}" for n in range(apps)]
    weights = [1 / (n + 1) for n in range(apps)]       # a few busy apps, a long tail
    host = f"balancer-{seed}"
    pool = []
    for _ in range(4 * batch):
        ms = rng.expovariate(1 / 12)
        pool.append({"app": rng.choices(names, weights)[0], "proc": "router", "host": host,
                     "line": (f"method={rng.choice(('GET',) * 8 + ('POST', 'PUT'))} "
                              f"path={rng.choice(PATHS)} status={rng.choice(STATUSES)} "
                              f"bytes={rng.randint(80, 60000)} ms={ms:.1f} "
                              f"request_id={rng.getrandbits(64):016x} "
                              f"client=10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)} "
                              f"backend=web.{rng.getrandbits(24):06x}")})
    ring = pool + pool
    ctx = zmq.Context()
    sock = channels.connect(ctx, "logs", endpoint)
    sent = dropped = 0
    # balancer workers flush on timers of their own: pusher n is `phase` of a period late
    start = time.monotonic() + max(0.0, start_at - time.time()) + phase / rate
    k = 0
    while start + k / rate < start + duration - phase / rate:
        pause = start + k / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        first = (k * batch) % len(pool)
        entries = ring[first:first + batch]
        try:
            send(sock, make("log_batch", host, entries=entries), flags=zmq.NOBLOCK)
            sent += len(entries)
        except zmq.Again:
            dropped += len(entries)
        k += 1
    sock.close(linger=10_000)        # what is queued still reaches the controller
    ctx.term()
    print(json.dumps({"entries": sent + dropped, "dropped": dropped}), flush=True)
    return 0


# -- main -------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10, help="seconds of load")
    p.add_argument("--idle", type=float, default=3, help="seconds probed before the load")
    p.add_argument("--pushers", type=int, default=4,
                   help="pusher processes (balancer workers)")
    p.add_argument("--rate", type=float, default=10, help="batches a second per pusher")
    p.add_argument("--batch", type=int, default=500, help="entries per log_batch")
    p.add_argument("--apps", type=int, default=50, help="apps the entries are spread over")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between probes")
    p.add_argument("--aligned", action="store_true",
                   help="every pusher sends at the same instants (the worst case); by "
                        "default their periods are evenly staggered")
    p.add_argument("--variants", default=f"{DEFAULT_BASELINE},{WORKTREE}",
                   help=f"comma-separated git revisions of controller/logstore.py, or "
                        f"{WORKTREE!r} for the checkout's; the first is the baseline")
    p.add_argument("--tree", default="HEAD",
                   help=f"git revision of the rest of the code, or {WORKTREE!r} for the "
                        f"checkout's packages as they are")
    p.add_argument("--keep", action="store_true", help="keep data dirs and logs")
    p.add_argument("--probe", metavar="ENDPOINT", help=argparse.SUPPRESS)
    p.add_argument("--push", metavar="ENDPOINT", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--phase", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.duration <= 120 or not 0 <= args.idle <= 60:
        p.error("--duration must be in (0, 120] and --idle in [0, 60] seconds")
    if not 0 <= args.pushers <= 32 or not 0 < args.rate <= 1000 or not 0 < args.batch <= 10000:
        p.error("--pushers 0-32, --rate (0, 1000], --batch 1-10000")
    if not 0 < args.apps <= 10000:
        p.error("--apps must be 1 to 10000")
    if not 0.001 <= args.interval <= 1:
        p.error("--interval must be 0.001 to 1 second")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variant_list or len(set(args.variant_list)) != len(args.variant_list):
        p.error("--variants must name one or more distinct variants")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe(args.probe, args.interval, sys.stdin)
    if args.push:
        return push(args.push, args.rate, args.batch, args.apps, args.duration, args.seed,
                    args.start_at, args.phase)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    prefix = Path(tempfile.mkdtemp(prefix="berth-loop-bench-"))
    children: list[Child] = []
    results: list[Result] = []
    try:
        tree = args.tree if args.tree == WORKTREE else \
            git("rev-parse", "--short", args.tree).decode().strip()
        print(f"-----> cores: {os.cpu_count()}  kernel: {os.uname().release}  "
              f"python {sys.version.split()[0]}  pyzmq {zmq.__version__}  "
              f"load average (1 min): {loadavg()}", flush=True)
        print(f"-----> code: {tree}, with the logstore.py of each of "
              f"{', '.join(args.variant_list)}; probe: snapshot_request every "
              f"{args.interval * 1000:g} ms; data in {prefix}", flush=True)
        for variant in args.variant_list:
            results.append(run_variant(variant, args, prefix, children))
            r = results[-1]
            print(f"       {variant}: loaded p50 {ms(pct(r.loaded, 50))} ms "
                  f"p99 {ms(pct(r.loaded, 99))} ms; worst "
                  + ", ".join(f"{ms(rtt)} ms at {at:.2f} s" for rtt, at in r.worst),
                  flush=True)
        print()
        print(table(results))
        print()
        for new in results[1:]:
            print("       " + ratios(results[0], new))
        timeouts = sum(r.probe_timeouts for r in results)
        if timeouts:
            print(f"       {timeouts} probe(s) got no answer in {PROBE_TIMEOUT:g} s "
                  f"(left out of the percentiles)")
        return 0
    except KeyboardInterrupt:
        print("\nError: interrupted; stopping what was started.", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
        print(f"Error: {exc!r}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            try:
                child.stop()
            except Exception as exc:      # keep stopping the others
                print(f"Error: stopping {child.name}: {exc}", file=sys.stderr)
        if args.keep:
            print(f"       data and logs kept in {prefix}")
        else:
            shutil.rmtree(prefix, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
