"""Every ZeroMQ channel of the platform, declared once, with its default endpoint.

Each entry says which process binds, which socket types the two ends use, the
setting that holds its endpoint, the port that setting defaults to and which
message types travel on it. The message shapes themselves are declared in
messaging.messages. The HTTP ports (the controller's API, the balancers') are
declared here too, so every settings module and the CLI derive their defaults
from this one place.

The declarations import no pyzmq (socket types are names, resolved to zmq
constants inside bind() and connect()), so settings modules, `berth settings`
and `--help-settings` can read them without loading the ZeroMQ library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zmq

PROTOCOL_VERSION = 1

LOOPBACK = "127.0.0.1"       # every default address: one machine, loopback only
API_PORT = 8700              # the controller's HTTP API (CLI, runners' slug downloads)
BALANCER_PORT = 8000         # where balancers accept client connections
# `berth up`'s platform Redis (the job workers' Celery broker) and the shared addon
# servers the job workers start (PostgreSQL, Redis), on loopback
BROKER_PORT = 8720
ADDON_PG_PORT = 8721
ADDON_REDIS_PORT = 8722


def api_url(host: str = LOOPBACK, port: int = API_PORT) -> str:
    """The controller API's URL; with no arguments its default."""
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class Channel:
    name: str
    pattern: str
    binder: str              # process that binds
    bind_type: str           # socket type of the binding end (a zmq constant's name)
    connect_type: str        # socket type of the connecting ends
    endpoint_setting: str    # controller/runner/balancer setting holding the endpoint
    default_port: int        # that setting's default port on LOOPBACK
    messages: tuple[str, ...]
    doc: str

    @property
    def default_endpoint(self) -> str:
        return self.endpoint(self.default_port)

    @staticmethod
    def endpoint(port: int, host: str = LOOPBACK) -> str:
        return f"tcp://{host}:{port}"


CHANNELS: dict[str, Channel] = {c.name: c for c in (
    Channel(
        "control", "ROUTER/DEALER", "controller", "ROUTER", "DEALER",
        "control_endpoint", 8701, ("command", "reply", "heartbeat", "beat"),
        "Commands with ids and replies (prepare, start, stop). Runners connect with "
        "identity = host id and send a heartbeat carrying their full inventory every "
        "interval; the controller answers heartbeats with its own so both sides see "
        "liveness. A runner's beat thread adds a `beat` every half interval on a "
        "second DEALER of its own (messaging/heartbeat.py BEAT_SUFFIX).",
    ),
    Channel(
        "routes", "PUB/SUB", "controller", "PUB", "SUB",
        "routes_endpoint", 8702, ("route_update", "route_tick"),
        "Numbered route updates, one app per message, plus a tick carrying the "
        "latest sequence number every second so a replica that missed the last "
        "update notices.",
    ),
    Channel(
        "routes_snapshot", "ROUTER/DEALER", "controller", "ROUTER", "DEALER",
        "routes_snapshot_endpoint", 8703, ("snapshot_request", "snapshot"),
        "The whole route table at a sequence number, asked for at start and after "
        "a gap.",
    ),
    Channel(
        "stats", "PUB -> XSUB", "controller", "XSUB", "PUB",
        "stats_endpoint", 8705, ("stats",),
        "Per-app and per-host figures every second. Balancers and runners publish; the "
        "controller's forwarder passes them on to stats_out.",
    ),
    Channel(
        "stats_out", "XPUB/SUB", "controller", "XPUB", "SUB",
        "stats_out_endpoint", 8706, ("stats",),
        "The forwarder's outlet: operators (and the controller's own API) subscribe.",
    ),
    Channel(
        "logs", "PUSH/PULL", "controller", "PULL", "PUSH",
        "logs_endpoint", 8704, ("log", "log_batch"),
        "App output, build output and platform events for tenants, one line per "
        "message. Runners and balancers push; the controller stores and streams.",
    ),
    Channel(
        "attach", "ROUTER/DEALER", "controller", "ROUTER", "DEALER",
        "attach_endpoint", 8707,
        ("run_started", "run_output", "run_exit", "run_input", "run_resize",
         "run_signal", "run_end", "run_ack"),
        "The streams of one-off runs (`berth run`): output, input, window size, signals "
        "and exit codes, apart from control so a chatty run never delays a heartbeat or "
        "a command. Runners connect with identity = host id. Each direction has a "
        "credit window: a sender keeps at most RUN_WINDOW bytes unacknowledged "
        "(run_ack), so a slow reader slows the writer instead of filling memory.",
    ),
    Channel(
        "locks", "ROUTER/DEALER", "controller", "ROUTER", "DEALER",
        "locks_endpoint", 8708,
        ("lock_acquire", "lock_renew", "lock_release", "lock_reply"),
        "Named leases held at the controller (messaging/locks.py is the client): "
        "acquire with a TTL and an owner, renew before it runs out, release; every "
        "request gets a lock_reply with the same id in `re`. A lease that is not "
        "renewed in time is reclaimed by the controller's watchdog, so a holder that "
        "dies never strands its work. Each grant carries a fence number that only grows "
        "per name, for the guarded resource to refuse a stale holder.",
    ),
    Channel(
        "lock_events", "PUB/SUB", "controller", "PUB", "SUB",
        "lock_events_endpoint", 8709, ("lock_event",),
        "What happened to leases: acquired, released, expired (the watchdog reclaimed "
        "it). Waiters and operators subscribe; nothing depends on seeing every event "
        "(a lock_acquire is the check).",
    ),
)}


def by_setting(setting: str) -> Channel:
    """The channel whose endpoint the setting `setting` holds."""
    for ch in CHANNELS.values():
        if ch.endpoint_setting == setting:
            return ch
    raise KeyError(setting)


def bind(ctx: zmq.Context, channel: str, endpoint: str) -> zmq.Socket:
    """Open the binding end of a channel (a CURVE server when the process stated its
    keys: messaging/curve.py)."""
    import zmq

    from messaging import curve

    ch = CHANNELS[channel]
    sock_type = getattr(zmq, ch.bind_type)
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, 0)
    curve.serve(sock, ctx)
    if sock_type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.bind(endpoint)
    return sock


def connect(ctx: zmq.Context, channel: str, endpoint: str,
            identity: str | None = None) -> zmq.Socket:
    """Open a connecting end of a channel; SUB ends subscribe to their topics (a CURVE
    client of the controller when the process stated its keys: messaging/curve.py)."""
    import zmq

    from messaging import curve

    ch = CHANNELS[channel]
    sock_type = getattr(zmq, ch.connect_type)
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, 0)
    curve.client(sock)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity.encode())
    if sock_type == zmq.SUB:
        for topic in ch.messages:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    if sock_type in (zmq.PUSH, zmq.PUB):
        # never block a runner on a slow controller: drop beyond the high-water mark
        sock.setsockopt(zmq.SNDHWM, 10000)
    sock.connect(endpoint)
    return sock
