"""The balancer's own Python per request, without sockets, loop or kernel: one
client connection carrying N keep-alive requests through exchange.Proxy, over
in-memory streams that answer at once (the way green.drive runs it: no await
suspends). What the wrk runs cannot separate from the noise of a shared machine,
this measures alone: CPU microseconds per request for the exchange itself. Run by
hand:

    python bench/balancer/exchange_cpu.py [--requests 50000] [--profile] [--native]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

if "--native" in sys.argv:        # the compiled core, when built (balancer/native.py)
    from balancer import native
    if not native.enable():
        sys.exit(f"Error: no native build in {native.build_dir()}; "
                 "run `python -m balancer.native build`")

from balancer.exchange import Proxy  # noqa: E402
from balancer.pool import Pool  # noqa: E402
from balancer.routes import RouteIndex  # noqa: E402
from balancer.settings import SPEC  # noqa: E402
from balancer.telemetry import Telemetry  # noqa: E402

REQUEST = (b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 "
            b"02:12:16 GMT\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
            b"Connection: keep-alive\r\n\r\nhello\n")


def drive(coro):
    """As balancer.green.drive (without importing eventlet): nothing here suspends."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("suspended")


class Memory:
    """A stream whose peer answers at once."""

    def __init__(self, incoming: list[bytes], answer: bytes | None = None) -> None:
        self.incoming = deque(incoming)
        self.answer = answer
        self.sent = 0

    async def recv(self, timeout: float) -> bytes:
        return self.incoming.popleft() if self.incoming else b""

    async def send(self, data: bytes, timeout: float) -> None:
        self.sent += 1
        if self.answer is not None:
            self.incoming.append(self.answer)

    def reusable(self, probe: bool = True) -> bool:
        return True

    def has_bytes(self) -> bool:
        return bool(self.incoming)

    def finish(self) -> None:
        pass

    abort = close = finish


class Engine:
    name = loop_name = "memory"

    async def connect(self, host: str, port: int, timeout: float) -> Memory:
        return Memory([], RESPONSE)


def run(requests: int, backends: int = 1) -> tuple[float, Proxy]:
    settings = SPEC.load(None)
    index = RouteIndex()
    index.update({"bench": {"hosts": ["bench.localhost"], "backends": [
        {"id": f"nginx{i}", "address": "127.0.0.1", "port": 8080 + i}
        for i in range(backends)]}})
    pool = Pool()
    pool.sync(index.routes)
    telemetry = Telemetry("bench", 1.0, SimpleNamespace())
    proxy = Proxy(settings, Engine(), index, pool, telemetry.access)
    telemetry.flush = lambda: telemetry.entries.clear()   # no socket: drop batches
    client = Memory([REQUEST] * requests)
    conn = proxy.accept(client, ("127.0.0.1", 40000))
    started = time.process_time()
    drive(proxy.handle(conn))
    return time.process_time() - started, proxy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--backends", type=int, default=1,
                   help="instances behind the route (the pool picks among them)")
    p.add_argument("--native", action="store_true",
                   help="the mypyc-compiled core (python -m balancer.native build)")
    a = p.parse_args()
    run(1000, a.backends)   # warm up
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(a.requests, a.backends)
        prof.disable()
        pstats.Stats(prof).strip_dirs().sort_stats("tottime").print_stats(a.top)
        return 0
    best = min(run(a.requests, a.backends)[0] for _ in range(3))
    print(f"{1e6 * best / a.requests:.2f} CPU us per request "
          f"(exchange only, {'native' if a.native else 'pure Python'}, "
          f"best of 3 x {a.requests})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
