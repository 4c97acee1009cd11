"""The balancer's engines side by side: eventlet, asyncio (standard loop) and
asyncio on uvloop, each as one `python -m balancer` process in front of the same
fast backend (nginx answering "hello\\n"), plus the backend direct. Run by hand:

    .venv/bin/python bench/balancer/engines.py [--duration 10] [--connections 50]

Load comes from wrk (one thread, keep-alive, small response) when it is installed,
else from a small Python client (far slower than wrk: its figures are only a
ratio between engines). The route comes from a route publisher in this process,
and access logs go to a PULL drained here, as from the controller. Prints req/s
and p50/p99 latency per target, and the ratio to eventlet. With two CPUs or more
the balancer gets one to itself and everything else shares the others.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from messaging import channels  # noqa: E402
from messaging.clone import ClonePublisher  # noqa: E402
from messaging.envelope import recv, send  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
HOST = "bench.localhost"
ENGINES = {
    "eventlet": {"engine": "eventlet"},
    "asyncio": {"engine": "asyncio", "uvloop": "false"},
    "asyncio+uvloop": {"engine": "asyncio", "uvloop": "true"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def render(name: str, **fields: str) -> str:
    text = (TEMPLATES / name).read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text


class Controller(threading.Thread):
    """Route publisher (PUB + snapshot ROUTER) and logs PULL, in one thread."""

    def __init__(self, backend_port: int) -> None:
        super().__init__(daemon=True)
        self.routes = f"tcp://127.0.0.1:{free_port()}"
        self.snapshots = f"tcp://127.0.0.1:{free_port()}"
        self.logs = f"tcp://127.0.0.1:{free_port()}"
        self.clone = ClonePublisher()
        self.clone.set("bench", {"hosts": [HOST], "reason": "", "backends": [
            {"id": "nginx", "address": "127.0.0.1", "port": backend_port}]})
        self.halt = threading.Event()
        self.log_lines = 0

    def run(self) -> None:
        ctx = zmq.Context()
        pub = channels.bind(ctx, "routes", self.routes)
        router = channels.bind(ctx, "routes_snapshot", self.snapshots)
        pull = channels.bind(ctx, "logs", self.logs)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        next_tick = 0.0
        try:
            while not self.halt.is_set():
                for sock, _ in poller.poll(50):
                    if sock is pull:
                        while True:       # drain in bulk: access logs come fast
                            try:
                                pull.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self.log_lines += 1
                        continue
                    ident, msg = recv(router)
                    if msg.type == "snapshot_request":
                        send(router, self.clone.snapshot(), identity=ident)
                if time.monotonic() >= next_tick:
                    send(pub, self.clone.tick())
                    next_tick = time.monotonic() + 1.0
        finally:
            for sock in (pub, router, pull):
                sock.close(linger=0)
            ctx.term()


def start_nginx(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    root = work / "www"
    root.mkdir()
    (root / "1m.bin").write_bytes(os.urandom(1 << 20))
    user = "user root;" if os.geteuid() == 0 else ""
    conf = work / "backend-nginx.conf"
    conf.write_text(render("backend-nginx.conf", user=user, prefix=str(work),
                           port=str(port), root=str(root)))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work),
                             "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def start_balancer(work: Path, ctl: Controller, engine: dict[str, str],
                   cpu: int | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = work / f"balancer-{port}.yaml"
    text = render("berth-balancer.yaml", port=str(port), routes_endpoint=ctl.routes,
                  snapshot_endpoint=ctl.snapshots, logs_endpoint=ctl.logs)
    text += "".join(f"  {k}: {v}\n" for k, v in engine.items())
    conf.write_text(text)
    log = open(work / f"balancer-{port}.log", "wb")
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = subprocess.Popen([sys.executable, "-m", "balancer", "--config", str(conf)],
                            cwd=ROOT, stdout=log, stderr=log, preexec_fn=pin)
    wait_port(port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:     # wait until the route has arrived
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                      .encode())
            if s.recv(100).startswith(b"HTTP/1.1 200"):
                return proc, port
        time.sleep(0.1)
    raise TimeoutError("the balancer did not get its route")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port: int, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
         "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {m.group(1): _ms(m.group(2), m.group(3))
           for m in re.finditer(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": lat.get("50", 0.0), "p99": lat.get("99", 0.0),
            "errors": float(errors.group(1)) if errors else 0.0}


def run_python_client(port: int, duration: int, connections: int) -> dict[str, float]:
    """Fallback load: threads with keep-alive sockets (GIL-bound, so a ratio only)."""
    request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = [0]
    stop_at = time.monotonic() + duration

    def worker() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                s.sendall(request)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += s.recv(65536)
                head, body = buf.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    body += s.recv(65536)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors[0] += 1
                latencies.append((time.perf_counter() - t) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(min(connections, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"rps": len(latencies) / duration, "p50": pick(0.5), "p99": pick(0.99),
            "errors": float(errors[0])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--no-pin", action="store_true",
                        help="do not give the balancer a CPU of its own")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    cpu = None
    if len(cpus) >= 2 and not args.no_pin:
        # the balancer alone on the last CPU; wrk, nginx and this process share the rest
        cpu = cpus[-1]
        os.sched_setaffinity(0, set(cpus[:-1]))
    load = run_wrk if shutil.which("wrk") else run_python_client
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        work = Path(tmp)
        nginx, backend_port = start_nginx(work)
        ctl = Controller(backend_port)
        ctl.start()
        try:
            load(backend_port, 2, args.connections)            # warm up
            results["backend direct"] = load(backend_port, args.duration,
                                             args.connections)
            for name in args.engines.split(","):
                proc, port = start_balancer(work, ctl, ENGINES[name], cpu)
                try:
                    load(port, 2, args.connections)              # warm up
                    results[name] = load(port, args.duration, args.connections)
                finally:
                    stop(proc)
        finally:
            ctl.halt.set()
            ctl.join(5)
            stop(nginx)
    base = results.get("eventlet", {}).get("rps")
    print(f"load: {load.__name__[4:]}, {args.connections} keep-alive connections, "
          f"{args.duration} s, GET / -> 'hello\\n' ({os.cpu_count()} cores, balancer "
          f"{'on a CPU of its own' if cpu is not None else 'unpinned'})")
    print(f"{'target':<16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
          f"{'x eventlet':>10}")
    for name, r in results.items():
        ratio = f"{r['rps'] / base:.2f}" if base else "-"
        print(f"{name:<16} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
              f"{r['errors']:>7.0f} {ratio:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
