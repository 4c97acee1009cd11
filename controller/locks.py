"""Named leases at the controller: the locks channel's server and its watchdog.

A lease is (name, owner, fence, ttl, expires_at). `LeaseTable` is the rule, free of
sockets: grant a free or expired name (a new fence), renew for the owner holding the
current fence, release, and `expire(now)` reclaims every lease whose holder stopped
renewing (the watchdog). Every change is written through to the store, so a
restarted controller keeps its leases; their holders, who could not renew while it
was away, get one more TTL from its start before the watchdog may reclaim them.

`LockServer` owns the two sockets (ROUTER for requests, PUB for lease events) and is
driven by the controller's loop thread alone: `drain()` answers what arrived,
`step(now)` runs the watchdog. The controller takes its own leases (one deploy per
app) through `acquire`/`renew`/`release` on the same table, so tenants' workers and
the platform see one set of leases and one event stream.

Times are wall-clock (`time.time()`): leases outlive the process. Bounded: at most
MAX_HELD leases held at once; the watchdog pops due leases off a heap.
"""
from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from controller.store import Store
from messaging import channels, envelope
from messaging.envelope import Message, make
from messaging.errors import BerthError, LeaseBusy, LeaseLost, ProtocolError
from messaging.shapes import LEASE_NAME, LEASE_TTL, Lease

log = logging.getLogger(__name__)

MAX_OWNER = 200
MAX_HELD = 100_000          # leases held at once
FENCE_ROW = "#fence"        # the store row keeping the highest fence (no lease's name)


@dataclass
class Held:
    name: str
    owner: str
    fence: int
    ttl: float
    expires_at: float

    def lease(self, now: float) -> Lease:
        return Lease(self.name, self.owner, self.fence, self.ttl,
                     round(max(0.0, self.expires_at - now), 3))

    def held(self, now: float) -> bool:
        return self.expires_at > now


def check_request(name: str, owner: str, ttl: float | None = None) -> None:
    if not LEASE_NAME.match(name):
        raise BerthError(f"invalid lease name {name!r}",
                         "use up to 200 letters, digits and . _ : / @ -, starting with a "
                         "letter or digit (e.g. deploy/myapp)", code="invalid")
    if not owner or len(owner) > MAX_OWNER:
        raise BerthError("a lease needs an owner of 1 to 200 characters",
                         "name the holder, e.g. worker-3:pid", code="invalid")
    if ttl is not None and not LEASE_TTL[0] <= ttl <= LEASE_TTL[1]:
        raise BerthError(f"lease ttl {ttl:g}s is outside {LEASE_TTL[0]:g}..{LEASE_TTL[1]:g}s",
                         "renew a long job's lease every third of a shorter ttl",
                         code="invalid")


class LeaseTable:
    """Held leases in memory; grants and frees written through to the store (a
    renewal is not: a restarted table gives every holder a whole TTL anyway). Fences
    come from one counter, kept in the store as the row FENCE_ROW, so a freed name's
    row can go and no fence is ever granted twice."""

    def __init__(self, store: Store, now: float | None = None) -> None:
        self.store = store
        now = time.time() if now is None else now
        self.leases: dict[str, Held] = {}
        self.fence = 0
        self._due: list[tuple[float, str, int]] = []     # (expires_at, name, fence) heap
        for name, owner, fence, ttl, expires_at in store.leases():
            self.fence = max(self.fence, fence)
            if name == FENCE_ROW or owner is None:
                continue
            # its holder could not renew while no controller answered
            self._hold(Held(name, owner, fence, ttl, max(expires_at, now + ttl)))

    def _hold(self, held: Held) -> None:
        self.leases[held.name] = held
        heapq.heappush(self._due, (held.expires_at, held.name, held.fence))

    def _extend(self, held: Held, ttl: float, now: float) -> None:
        held.ttl, held.expires_at = ttl, now + ttl
        heapq.heappush(self._due, (held.expires_at, held.name, held.fence))

    def _free(self, held: Held) -> None:
        del self.leases[held.name]
        self.store.drop_lease(held.name)

    def acquire(self, name: str, owner: str, ttl: float, now: float) -> tuple[Lease, bool]:
        """The lease for `owner`, and whether it is a new grant (False: the owner held
        it already and it was renewed). LeaseBusy while another owner holds it."""
        check_request(name, owner, ttl)
        held = self.leases.get(name)
        if held is not None and held.held(now):
            if held.owner != owner:
                raise LeaseBusy(f"lease {name} is held by {held.owner} for "
                                f"{held.expires_at - now:.1f}s more (fence {held.fence})")
            self._extend(held, ttl, now)
            return held.lease(now), False
        if held is None and len(self.leases) >= MAX_HELD:
            raise BerthError(f"the controller holds {MAX_HELD} leases already",
                             "release leases when their work is done", code="too_many",
                             status=503)
        self.fence += 1
        held = Held(name, owner, self.fence, ttl, now + ttl)
        self.store.grant_lease(name, owner, held.fence, ttl, held.expires_at, FENCE_ROW)
        self._hold(held)
        return held.lease(now), True

    def _current(self, name: str, owner: str, fence: int, now: float) -> Held:
        held = self.leases.get(name)
        if held is None or not held.held(now) or held.owner != owner or held.fence != fence:
            now_holder = f"held by {held.owner} (fence {held.fence})" \
                if held is not None and held.held(now) else "free"
            raise LeaseLost(f"lease {name} (fence {fence}) is no longer {owner}'s: it is "
                            f"{now_holder}")
        return held

    def renew(self, name: str, owner: str, fence: int, ttl: float, now: float) -> Lease:
        check_request(name, owner, ttl)
        held = self._current(name, owner, fence, now)
        self._extend(held, ttl, now)
        return held.lease(now)

    def release(self, name: str, owner: str, fence: int, now: float) -> Lease:
        check_request(name, owner)
        held = self._current(name, owner, fence, now)
        lease = held.lease(now)
        self._free(held)
        return lease

    def holder(self, name: str, now: float) -> Lease | None:
        held = self.leases.get(name)
        return held.lease(now) if held is not None and held.held(now) else None

    def expire(self, now: float) -> list[Lease]:
        """The watchdog: free every lease whose holder stopped renewing."""
        gone = []
        while self._due and self._due[0][0] <= now:
            _, name, fence = heapq.heappop(self._due)
            held = self.leases.get(name)
            if held is not None and held.fence == fence and held.expires_at <= now:
                gone.append(held.lease(now))
                self._free(held)
        return gone


class LockServer:
    """The locks channel at the controller (loop thread only)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, events_endpoint: str,
                 store: Store, sender: str, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.table = LeaseTable(store, clock())
        self.sender = sender
        self.socket = channels.bind(ctx, "locks", endpoint)
        self.events = channels.bind(ctx, "lock_events", events_endpoint)

    def close(self) -> None:
        self.socket.close(0)
        self.events.close(0)

    # -- the controller's own leases -----------------------------------------------
    def acquire(self, name: str, owner: str, ttl: float) -> Lease:
        lease, new = self.table.acquire(name, owner, ttl, self.clock())
        if new:
            self._event("acquired", lease)
        return lease

    def renew(self, lease: Lease) -> Lease:
        return self.table.renew(lease.name, lease.owner, lease.fence, lease.ttl, self.clock())

    def release(self, lease: Lease) -> None:
        """Give a lease back; one that was lost already is no error here."""
        try:
            self._event("released", self.table.release(lease.name, lease.owner, lease.fence,
                                                       self.clock()))
        except LeaseLost:
            pass

    def holder(self, name: str) -> Lease | None:
        return self.table.holder(name, self.clock())

    # -- the loop ---------------------------------------------------------------------
    def step(self) -> None:
        """The watchdog, every turn of the loop."""
        for lease in self.table.expire(self.clock()):
            log.warning("lease expired", extra={"lease": lease.name, "owner": lease.owner,
                                                "fence": lease.fence})
            self._event("expired", lease)

    def drain(self) -> None:
        for _ in range(1000):
            try:
                identity, msg = envelope.recv(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                log.warning("dropped bad lock request", extra={"error": exc.message})
                continue
            if identity is not None:
                envelope.send(self.socket, self._answer(msg), identity)

    def _answer(self, msg: Message) -> Message:
        now = self.clock()
        t = self.table
        try:
            if msg.type == "lock_acquire":
                lease, new = t.acquire(msg["name"], msg["owner"], float(msg["ttl"]), now)
                if new:
                    self._event("acquired", lease)
                    log.info("lease acquired", extra={"lease": lease.name, "owner": lease.owner,
                                                      "fence": lease.fence, "ttl": lease.ttl})
            elif msg.type == "lock_renew":
                lease = t.renew(msg["name"], msg["owner"], msg["fence"], float(msg["ttl"]), now)
            elif msg.type == "lock_release":
                lease = t.release(msg["name"], msg["owner"], msg["fence"], now)
                self._event("released", lease)
                log.info("lease released", extra={"lease": lease.name, "owner": lease.owner,
                                                  "fence": lease.fence})
            else:
                raise ProtocolError(f"{msg.type} is not a lock request",
                                    "send lock_acquire, lock_renew or lock_release")
        except BerthError as exc:
            current = t.holder(str(msg.get("name", "")), now) if isinstance(
                msg.get("name"), str) else None
            return make("lock_reply", self.sender, re=msg.id, ok=False,
                        lease=current.to_wire() if current else None, error=exc.to_dict())
        return make("lock_reply", self.sender, re=msg.id, ok=True, lease=lease.to_wire(),
                    error=None)

    def _event(self, event: str, lease: Lease) -> None:
        envelope.send(self.events, make("lock_event", self.sender, event=event,
                                        lease=lease.to_wire()))
