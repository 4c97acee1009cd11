"""Controller settings, declared once."""
from __future__ import annotations

from config import Setting, Spec

SPEC = Spec("controller", [
    Setting("host_id", str, "controller-1", "This controller's name in logs and messages."),
    Setting("data_dir", str, "./.berth-data/controller", "State store, slugs and app logs."),
    Setting("api_host", str, "127.0.0.1", "HTTP API address (loopback only here)."),
    Setting("api_port", int, 8700, "HTTP API port."),
    Setting("public_url", str, "", "URL runners use to reach the API; empty means http://api_host:api_port."),
    Setting("control_endpoint", str, "tcp://127.0.0.1:8701", "Control ROUTER runners connect to."),
    Setting("routes_endpoint", str, "tcp://127.0.0.1:8702", "Route update PUB balancers subscribe to."),
    Setting("routes_snapshot_endpoint", str, "tcp://127.0.0.1:8703", "Route snapshot ROUTER."),
    Setting("logs_endpoint", str, "tcp://127.0.0.1:8704", "Logs PULL runners and balancers push to."),
    Setting("stats_endpoint", str, "tcp://127.0.0.1:8705", "Stats XSUB balancers and runners publish to."),
    Setting("stats_out_endpoint", str, "tcp://127.0.0.1:8706", "Stats XPUB operators subscribe to."),
    Setting("default_max_body_mb", int, 100, "Request body limit for apps that set none (413 beyond)."),
    Setting("base_domain", str, "localhost", "Apps are served at <app>.<base_domain>."),
    Setting("balancer_port", int, 8000, "Port the balancers listen on, for the URLs the CLI prints."),
    Setting("runner_token", str, "", "Shared secret runners present to fetch slugs; empty makes one."),
    Setting("admin_token_file", str, "", "Where the first admin token is written; empty means <data_dir>/admin.token."),
    Setting("heartbeat_interval", float, 1.0, "Seconds between heartbeats."),
    Setting("dead_after", int, 5, "Silent heartbeat intervals before a runner is dead."),
    Setting("drain_seconds", float, 2.0, "Seconds an instance stays out of routes before it is stopped."),
    Setting("max_upload_mb", int, 200, "Largest compressed push accepted (413 beyond)."),
    Setting("max_unpacked_mb", int, 1000, "Largest unpacked app accepted."),
    Setting("max_files", int, 20000, "Most files in one push."),
    Setting("log_level", str, "info", "Platform log level."),
])
