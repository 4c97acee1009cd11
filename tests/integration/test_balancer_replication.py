"""Route replication over real ZeroMQ sockets: the one RouteSubscriber on each
engine (eventlet, green sockets in this process's hub; asyncio, its loop in a
thread) against a ClonePublisher in a thread."""
from __future__ import annotations

import asyncio
import signal
import threading
import time
import warnings

import pytest
import zmq
import zmq.asyncio as zmqa

from cli import localplatform

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
import eventlet  # noqa: E402
from eventlet.green import zmq as gzmq  # noqa: E402

from balancer.aio import AioEngine  # noqa: E402
from balancer.green import GreenEngine, drive  # noqa: E402
from balancer.subscriber import RouteSubscriber  # noqa: E402
from messaging import channels  # noqa: E402
from messaging.clone import ClonePublisher  # noqa: E402
from messaging.envelope import recv, send  # noqa: E402


@pytest.fixture(autouse=True)
def _bounded():
    def expire(signum, frame):
        raise TimeoutError("test took longer than 60 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def free_port() -> int:
    return localplatform.free_port()


class Publisher(threading.Thread):
    """Publishes `count` updates (one every few ms), ticks, answers snapshots."""

    def __init__(self, count: int, start_after: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.routes = f"tcp://127.0.0.1:{free_port()}"
        self.snapshots = f"tcp://127.0.0.1:{free_port()}"
        self.clone = ClonePublisher()
        self.count = count
        self.start_after = start_after
        self.published = threading.Event()
        self.halt = threading.Event()
        self.served = 0
        self.lock = threading.Lock()

    def table(self) -> dict:
        with self.lock:
            return {k: dict(v) for k, v in self.clone.table.items()}

    def run(self) -> None:
        ctx = zmq.Context()
        pub = channels.bind(ctx, "routes", self.routes)
        router = channels.bind(ctx, "routes_snapshot", self.snapshots)
        begin = time.monotonic() + self.start_after
        i = 0
        next_tick = 0.0
        try:
            while not self.halt.is_set():
                if router.poll(5):
                    ident, msg = recv(router)
                    if msg.type == "snapshot_request":
                        with self.lock:
                            send(router, self.clone.snapshot(), identity=ident)
                        self.served += 1
                now = time.monotonic()
                if now >= begin and i < self.count:
                    app = f"app{i % 7}"
                    route = {"hosts": [f"{app}.localhost"], "reason": "",
                             "backends": [{"id": f"i{i}", "address": "127.0.0.2",
                                           "port": 40000 + i}]}
                    with self.lock:
                        update = self.clone.set(app, route if i % 5 else None)
                    if update is not None:
                        send(pub, update)
                    i += 1
                    if i == self.count:
                        self.published.set()
                if now >= next_tick:
                    with self.lock:
                        send(pub, self.clone.tick())
                    next_tick = now + 0.2
        finally:
            pub.close(linger=0)
            router.close(linger=0)
            ctx.term()


class EventletReplica:
    """The eventlet RouteSubscriber with green sockets, in this process's hub."""

    def __init__(self, pub: Publisher, drop=None) -> None:
        self.changes: list = []
        self.ctx = gzmq.Context()
        self.sub = RouteSubscriber(GreenEngine(), self.ctx, pub.routes, pub.snapshots,
                                   "bal-test",
                                   lambda table: self.changes.append(dict(table)),
                                   snapshot_timeout=0.3, drop=drop)
        self.sub.start()

    def view(self) -> dict:
        r = self.sub.replica
        return {"table": dict(r.table), "synced": r.synced, "gaps": r.gaps,
                "seq": r.seq, "asked": self.sub.snapshots_asked}

    def sleep(self, seconds: float) -> None:
        eventlet.sleep(seconds)

    def stop(self) -> None:
        drive(self.sub.stop())
        self.ctx.term()


class AsyncioReplica:
    """The RouteSubscriber on the asyncio engine, over zmq.asyncio, its loop in a
    thread; the test reads the replica through that loop."""

    def __init__(self, pub: Publisher, drop=None) -> None:
        self.changes: list = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ctx = zmqa.Context()
        self.sub = RouteSubscriber(AioEngine(use_uvloop=False), self.ctx, pub.routes,
                                   pub.snapshots, "bal-test",
                                   lambda table: self.changes.append(dict(table)),
                                   snapshot_timeout=0.3, drop=drop)
        self._call(self._start())

    async def _start(self) -> None:
        self.sub.start()

    async def _view(self) -> dict:
        r = self.sub.replica
        return {"table": dict(r.table), "synced": r.synced, "gaps": r.gaps,
                "seq": r.seq, "asked": self.sub.snapshots_asked}

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def view(self) -> dict:
        return self._call(self._view())

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def stop(self) -> None:
        self._call(self.sub.stop())
        self.ctx.term()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(params=["eventlet", "asyncio"])
def replica_engine(request):
    return {"eventlet": EventletReplica, "asyncio": AsyncioReplica}[request.param]


def converge(pub: Publisher, rep, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = rep.view()
        if pub.published.is_set() and view["table"] == pub.table() and view["synced"]:
            return view
        rep.sleep(0.05)
    raise AssertionError(f"replica {rep.view()['table']} != publisher {pub.table()}")


def stop(rep, pub: Publisher) -> None:
    rep.stop()
    pub.halt.set()
    pub.join(5)


def test_replica_converges_without_losses(replica_engine):
    pub = Publisher(40)
    pub.start()
    rep = replica_engine(pub)
    try:
        view = converge(pub, rep)
        assert view["gaps"] == 0 and rep.changes
    finally:
        stop(rep, pub)


def test_replica_with_dropped_updates_notices_the_gap_and_converges(replica_engine):
    pub = Publisher(60)
    pub.start()
    dropped: list[int] = []

    def drop(seq: int) -> bool:
        if seq % 9 == 4 or seq == pub.clone.seq == 60:   # lose some, and the last
            dropped.append(seq)
            return True
        return False

    rep = replica_engine(pub, drop)
    try:
        view = converge(pub, rep)
        assert dropped and view["gaps"] >= 1
        assert view["asked"] >= 2          # the first, then after a gap
        assert view["seq"] == pub.clone.seq
    finally:
        stop(rep, pub)


def test_replica_started_after_the_publisher_converges(replica_engine):
    pub = Publisher(20, start_after=0.0)
    pub.start()
    assert pub.published.wait(5)            # set once the last update was sent:
    rep = replica_engine(pub)               # the replica can only learn it by snapshot
    try:
        converge(pub, rep)
        assert pub.served >= 1
    finally:
        stop(rep, pub)
