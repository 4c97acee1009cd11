"""Balancer settings, declared once."""
from __future__ import annotations

from config import Setting, Spec

SPEC = Spec("balancer", [
    Setting("host_id", str, "balancer-1", "This balancer's name in logs and stats."),
    Setting("listen_host", str, "127.0.0.1", "Address to accept client connections on (loopback only here)."),
    Setting("listen_port", int, 8000, "Port to accept client connections on."),
    Setting("routes_endpoint", str, "tcp://127.0.0.1:8702", "Controller's route update PUB."),
    Setting("routes_snapshot_endpoint", str, "tcp://127.0.0.1:8703", "Controller's route snapshot ROUTER."),
    Setting("logs_endpoint", str, "tcp://127.0.0.1:8704", "Controller's logs PULL, for access logs."),
    Setting("stats_endpoint", str, "tcp://127.0.0.1:8705", "Controller's stats XSUB, for per-app figures."),
    Setting("max_header_bytes", int, 65536, "Largest request head accepted (431 beyond)."),
    Setting("header_timeout", float, 10.0, "Seconds a client has to send a whole request head (408)."),
    Setting("idle_timeout", float, 60.0, "Seconds an idle keep-alive client connection is kept."),
    Setting("connect_timeout", float, 3.0, "Seconds to connect to a backend before trying another."),
    Setting("response_timeout", float, 60.0, "Seconds to wait for a backend's response head (504)."),
    Setting("snapshot_timeout", float, 2.0, "Seconds to wait for a route snapshot before asking again."),
    Setting("shutdown_timeout", float, 10.0, "Seconds in-flight requests get to finish after SIGTERM."),
    Setting("ws_idle_timeout", float, 300.0, "Seconds an upgraded (WebSocket) tunnel may pass with no byte either way."),
    Setting("maintenance_retry_after", int, 60, "Retry-After seconds on the 503 of an app in maintenance mode."),
    Setting("trusted_proxies", list, [], "Addresses/CIDRs whose X-Forwarded-* headers are believed (For is appended to)."),
    Setting("stats_interval", float, 1.0, "Seconds between two stats messages."),
    Setting("processes", int, 1, "Worker processes sharing the port (each its own SO_REUSEPORT socket)."),
    Setting("startup_routes_wait", float, 5.0, "Seconds a starting worker waits for its route table before accepting anyway (503 until it arrives)."),
    Setting("reload_timeout", float, 15.0, "Seconds new workers get to load routes on SIGHUP before the reload is abandoned."),
    Setting("max_open_files", int, 0, "Raise RLIMIT_NOFILE to this at start (0: up to the hard limit)."),
    Setting("log_level", str, "info", "Platform log level."),
    Setting("engine", str, "asyncio", "I/O engine: eventlet or asyncio (same core, same behaviour)."),
    Setting("uvloop", bool, True, "With engine asyncio: run on uvloop when it is installed."),
])
