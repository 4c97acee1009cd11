"""Every ZeroMQ channel of the platform, declared once.

Each entry says which process binds, which socket types the two ends use, the
setting that holds its endpoint and which message types travel on it. The message
shapes themselves are declared in messaging.messages.
"""
from __future__ import annotations

from dataclasses import dataclass

import zmq

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Channel:
    name: str
    pattern: str
    binder: str              # process that binds
    bind_type: int           # socket type of the binding end
    connect_type: int        # socket type of the connecting ends
    endpoint_setting: str    # controller/runner/balancer setting holding the endpoint
    messages: tuple[str, ...]
    doc: str


CHANNELS: dict[str, Channel] = {c.name: c for c in (
    Channel(
        "control", "ROUTER/DEALER", "controller", zmq.ROUTER, zmq.DEALER,
        "control_endpoint", ("command", "reply", "heartbeat"),
        "Commands with ids and replies (prepare, start, stop). Runners connect with "
        "identity = host id and send a heartbeat carrying their full inventory every "
        "interval; the controller answers heartbeats with its own so both sides see "
        "liveness.",
    ),
    Channel(
        "routes", "PUB/SUB", "controller", zmq.PUB, zmq.SUB,
        "routes_endpoint", ("route_update", "route_tick"),
        "Numbered route updates, one app per message, plus a tick carrying the "
        "latest sequence number every second so a replica that missed the last "
        "update notices.",
    ),
    Channel(
        "routes_snapshot", "ROUTER/DEALER", "controller", zmq.ROUTER, zmq.DEALER,
        "routes_snapshot_endpoint", ("snapshot_request", "snapshot"),
        "The whole route table at a sequence number, asked for at start and after "
        "a gap.",
    ),
    Channel(
        "stats", "PUB -> XSUB", "controller", zmq.XSUB, zmq.PUB,
        "stats_endpoint", ("stats",),
        "Per-app and per-host figures every second. Balancers and runners publish; the "
        "controller's forwarder passes them on to stats_out.",
    ),
    Channel(
        "stats_out", "XPUB/SUB", "controller", zmq.XPUB, zmq.SUB,
        "stats_out_endpoint", ("stats",),
        "The forwarder's outlet: operators (and the controller's own API) subscribe.",
    ),
    Channel(
        "logs", "PUSH/PULL", "controller", zmq.PULL, zmq.PUSH,
        "logs_endpoint", ("log", "log_batch"),
        "App output, build output and platform events for tenants, one line per "
        "message. Runners and balancers push; the controller stores and streams.",
    ),
)}


def bind(ctx: zmq.Context, channel: str, endpoint: str) -> zmq.Socket:
    """Open the binding end of a channel."""
    ch = CHANNELS[channel]
    sock = ctx.socket(ch.bind_type)
    sock.setsockopt(zmq.LINGER, 0)
    if ch.bind_type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.bind(endpoint)
    return sock


def connect(ctx: zmq.Context, channel: str, endpoint: str,
            identity: str | None = None) -> zmq.Socket:
    """Open a connecting end of a channel; SUB ends subscribe to their topics."""
    ch = CHANNELS[channel]
    sock = ctx.socket(ch.connect_type)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if ch.connect_type == zmq.SUB:
        for topic in ch.messages:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    if ch.connect_type in (zmq.PUSH, zmq.PUB):
        # never block a runner on a slow controller: drop beyond the high-water mark
        sock.setsockopt(zmq.SNDHWM, 10000)
    sock.connect(endpoint)
    return sock
