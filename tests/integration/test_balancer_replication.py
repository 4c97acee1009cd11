"""Route replication over real ZeroMQ sockets: the balancer's RouteSubscriber (green
sockets, in this process's eventlet hub) against a ClonePublisher in a thread."""
from __future__ import annotations

import signal
import socket
import threading
import time
import warnings

import pytest
import zmq

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
import eventlet  # noqa: E402
from eventlet.green import zmq as gzmq  # noqa: E402

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def converge(pub: Publisher, sub: RouteSubscriber, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pub.published.is_set() and sub.table == pub.table() and sub.replica.synced:
            return
        eventlet.sleep(0.05)
    raise AssertionError(f"replica {sub.table} != publisher {pub.table()}")


def run_subscriber(pub: Publisher, drop=None) -> tuple[RouteSubscriber, list]:
    changes: list = []
    ctx = gzmq.Context()
    sub = RouteSubscriber(ctx, pub.routes, pub.snapshots, "bal-test",
                          lambda table: changes.append(dict(table)),
                          snapshot_timeout=0.3, drop=drop)
    sub.start()
    sub._ctx_for_test = ctx
    return sub, changes


def stop(sub: RouteSubscriber, pub: Publisher) -> None:
    sub.stop()
    sub._ctx_for_test.term()
    pub.halt.set()
    pub.join(5)


def test_replica_converges_without_losses():
    pub = Publisher(40)
    pub.start()
    sub, changes = run_subscriber(pub)
    try:
        converge(pub, sub)
        assert sub.replica.gaps == 0 and changes
    finally:
        stop(sub, pub)


def test_replica_with_dropped_updates_notices_the_gap_and_converges():
    pub = Publisher(60)
    pub.start()
    dropped: list[int] = []

    def drop(seq: int) -> bool:
        if seq % 9 == 4 or seq == pub.clone.seq == 60:   # lose some, and the last
            dropped.append(seq)
            return True
        return False

    sub, _ = run_subscriber(pub, drop)
    try:
        converge(pub, sub)
        assert dropped and sub.replica.gaps >= 1
        assert sub.snapshots_asked >= 2          # the first, then after a gap
        assert sub.replica.seq == pub.clone.seq
    finally:
        stop(sub, pub)


def test_replica_started_after_the_publisher_converges():
    pub = Publisher(20, start_after=0.0)
    pub.start()
    assert pub.published.wait(5)
    time.sleep(0.2)
    sub, _ = run_subscriber(pub)
    try:
        converge(pub, sub)
        assert pub.served >= 1
    finally:
        stop(sub, pub)
