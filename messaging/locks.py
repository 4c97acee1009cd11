"""The lock client: named leases held at the controller (the locks channel).

For platform code and tenants' workers alike (the tapiriik pattern: a worker locks
the record it works on; when the worker dies its lease runs out and the
controller's watchdog frees the record for the next worker)::

    locks = LockClient("tcp://127.0.0.1:8708", owner="sync-worker-3")
    with locks.hold("app/myapp/record/42", ttl=10, wait=30) as held:
        for step in work:
            held.check()          # LeaseLost once the lease is gone: stop
            step()

`hold` renews the lease from a thread every third of its TTL and releases it at the
end; `acquire`/`renew`/`release` are the single requests. Like every socket
messaging/channels.py opens, the client's are CURVE clients of the controller under
the keys its process stated (`messaging.curve.use`): a worker needs an admitted key
of its own where the platform runs with keys. `LeaseEvents` follows the
lock_events channel (acquired, released, expired): a retrier redoes the work of a
lease that `expired`, since its holder died before finishing it. Every request waits at
most `timeout` seconds for its lock_reply (LocksUnavailable after). A client is
thread-safe: one lock serializes its socket.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from types import TracebackType

import zmq

from messaging import channels, envelope
from messaging.envelope import Message, make
from messaging.errors import BerthError, LeaseBusy, LeaseLost, LocksUnavailable, ProtocolError
from messaging.shapes import Lease

RETRY_EVERY = 0.1        # seconds between acquire attempts while waiting for a lease


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LockClient:
    def __init__(self, endpoint: str, owner: str | None = None, *,
                 ctx: zmq.Context | None = None, timeout: float = 2.0) -> None:
        self.endpoint = endpoint
        self.owner = owner or default_owner()
        self.timeout = timeout
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self._lock = threading.Lock()
        self._sock = channels.connect(self.ctx, "locks", endpoint)

    def close(self) -> None:
        with self._lock:
            self._sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> LockClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- single requests -------------------------------------------------------------
    def _request(self, msg: Message) -> Lease:
        with self._lock:
            envelope.send(self._sock, msg)
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                    raise LocksUnavailable(f"no answer from the locks channel at "
                                           f"{self.endpoint} within {self.timeout:g}s")
                try:
                    _, reply = envelope.recv(self._sock, zmq.NOBLOCK)
                except (zmq.Again, ProtocolError):
                    continue
                if reply.type == "lock_reply" and reply["re"] == msg.id:
                    break                # anything else answers a request given up on
        if reply["ok"]:
            return Lease.from_wire(reply.get("lease"))
        error = reply.get("error") or {}
        kind: type[BerthError] = {"lease_busy": LeaseBusy, "lease_lost": LeaseLost}.get(
            str(error.get("code")), BerthError)
        raise kind(str(error.get("message", "lock request refused")),
                   str(error.get("hint", "")))

    def acquire(self, name: str, ttl: float = 10.0, wait: float = 0.0) -> Lease:
        """Hold `name` for `ttl` seconds; while another owner holds it, try again for
        up to `wait` seconds (LeaseBusy after)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._request(make("lock_acquire", self.owner, name=name,
                                          owner=self.owner, ttl=float(ttl)))
            except LeaseBusy:
                if time.monotonic() + RETRY_EVERY > deadline:
                    raise
                time.sleep(RETRY_EVERY)

    def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        """`ttl` (default: the lease's own) more seconds from now; LeaseLost when it
        expired or went to another owner."""
        return self._request(make("lock_renew", self.owner, name=lease.name,
                                  owner=lease.owner, fence=lease.fence,
                                  ttl=float(ttl or lease.ttl)))

    def release(self, lease: Lease) -> None:
        self._request(make("lock_release", self.owner, name=lease.name, owner=lease.owner,
                           fence=lease.fence))

    def hold(self, name: str, ttl: float = 10.0, wait: float = 0.0) -> Holding:
        """Acquire `name` and keep it renewed until the `with` block ends."""
        return Holding(self, self.acquire(name, ttl, wait))


class Holding:
    """A lease kept alive by a thread; `lost` is set (and `check()` raises) once a
    renewal fails, so the holder stops work it no longer owns."""

    def __init__(self, client: LockClient, lease: Lease) -> None:
        self.client = client
        self.lease = lease
        self.lost = threading.Event()
        self.error: BerthError | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{lease.name}",
                                        daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        every = self.lease.ttl / 3
        last_ok = time.monotonic()
        while not self._done.wait(every):
            try:
                self.lease = self.client.renew(self.lease)
                last_ok = time.monotonic()
            except LocksUnavailable as exc:
                if time.monotonic() - last_ok < self.lease.ttl:
                    continue             # try again: the lease is still ours for now
                self.error = exc
                self.lost.set()
                return
            except BerthError as exc:
                self.error = exc
                self.lost.set()
                return

    def check(self) -> None:
        if self.lost.is_set():
            raise self.error or LeaseLost(f"lease {self.lease.name} is lost")

    def release(self) -> None:
        self._done.set()
        self._thread.join()
        if not self.lost.is_set():
            try:
                self.client.release(self.lease)
            except LeaseLost:
                pass

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class LeaseEvents:
    """The lock_events channel: what happened to leases, as (event, lease)."""

    def __init__(self, endpoint: str, *, ctx: zmq.Context | None = None) -> None:
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self._sock = channels.connect(self.ctx, "lock_events", endpoint)

    def next(self, timeout: float) -> tuple[str, Lease] | None:
        """The next event within `timeout` seconds, or None."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                return None
            try:
                _, msg = envelope.recv(self._sock, zmq.NOBLOCK)
                return str(msg["event"]), Lease.from_wire(msg["lease"])
            except (zmq.Again, ProtocolError):
                continue

    def close(self) -> None:
        self._sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> LeaseEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
