"""Balancer settings, declared once. Endpoint and port defaults come from
messaging/channels.py; `python -m balancer --help-settings` lists them."""
from __future__ import annotations

from config import Setting, Spec
from config.checks import LOG_LEVELS, endpoint, loopback, networks, positive
from messaging.channels import BALANCER_PORT, LOOPBACK

SPEC = Spec("balancer", [
    Setting("host_id", str, "balancer-1", "This balancer's name in logs and stats."),
    Setting("listen_host", str, LOOPBACK, "Address to accept client connections on (loopback only here).", check=loopback),
    Setting("listen_port", int, BALANCER_PORT, "Port to accept client connections on (0: any free port).", min=0, max=65535),
    endpoint("routes", "Controller's route update PUB."),
    endpoint("routes_snapshot", "Controller's route snapshot ROUTER."),
    endpoint("logs", "Controller's logs PULL, for access logs."),
    endpoint("stats", "Controller's stats XSUB, for per-app figures."),
    Setting("max_header_bytes", int, 65536, "Largest request head accepted (431 beyond).", min=1024),
    Setting("header_timeout", float, 10.0, "Seconds a client has to send a whole request head (408).", check=positive),
    Setting("idle_timeout", float, 60.0, "Seconds an idle keep-alive client connection is kept.", check=positive),
    Setting("connect_timeout", float, 3.0, "Seconds to connect to a backend before trying another.", check=positive),
    Setting("response_timeout", float, 60.0, "Seconds to wait for a backend's response head (504).", check=positive),
    Setting("snapshot_timeout", float, 2.0, "Seconds to wait for a route snapshot before asking again.", check=positive),
    Setting("shutdown_timeout", float, 10.0, "Seconds in-flight requests get to finish after SIGTERM.", min=0),
    Setting("ws_idle_timeout", float, 300.0, "Seconds an upgraded (WebSocket) tunnel may pass with no byte either way.", check=positive),
    Setting("maintenance_retry_after", int, 60, "Retry-After seconds on the 503 of an app in maintenance mode.", min=0),
    Setting("trusted_proxies", list, [], "Addresses/CIDRs whose X-Forwarded-* headers are believed (For is appended to).", check=networks),
    Setting("stats_interval", float, 1.0, "Seconds between two stats messages.", check=positive),
    Setting("processes", int, 1, "Worker processes sharing the port (each its own SO_REUSEPORT socket).", min=1),
    Setting("startup_routes_wait", float, 5.0, "Seconds a starting worker waits for its route table before accepting anyway (503 until it arrives).", min=0),
    Setting("reload_timeout", float, 15.0, "Seconds new workers get to load routes on SIGHUP before the reload is abandoned.", check=positive),
    Setting("max_open_files", int, 0, "Raise RLIMIT_NOFILE to this at start (0: up to the hard limit).", min=0),
    Setting("keys_dir", str, "", "CURVE keys of the platform's ZeroMQ channels (`berth admin init` makes them; messaging/curve.py): this balancer connects with its own pair (hosts/<key_name>) and the controller's public key. Empty: plain sockets, open to any local process."),
    Setting("key_name", str, "", "This host's name among the keys (hosts/<key_name>.key_secret); empty: host_id."),
    Setting("log_level", str, "info", "Platform log level.", choices=LOG_LEVELS),
    Setting("engine", str, "asyncio", "I/O engine: asyncio or eventlet (same core, same behaviour).", choices=("asyncio", "eventlet")),
    Setting("uvloop", bool, True, "With engine asyncio: run on uvloop when it is installed."),
    Setting("native", bool, True, "Run the mypyc-compiled core when `python -m balancer.native build` built it for these very sources (else pure Python)."),
])
