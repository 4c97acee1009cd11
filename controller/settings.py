"""Controller settings, declared once. Endpoint and port defaults come from
messaging/channels.py; `python -m controller --help-settings` lists them."""
from __future__ import annotations

from config import Setting, Spec
from config.checks import (
    LOG_LEVELS,
    endpoint,
    http_url_or_empty,
    loopback,
    positive,
    redis_url_or_empty,
)
from messaging.channels import API_PORT, BALANCER_PORT, LOOPBACK

SPEC = Spec("controller", [
    Setting("host_id", str, "controller-1", "This controller's name in logs and messages."),
    Setting("data_dir", str, "./.berth-data/controller", "State store, slugs and app logs."),
    Setting("api_host", str, LOOPBACK, "HTTP API address (loopback only here)."),
    Setting("api_port", int, API_PORT, "HTTP API port.", min=1, max=65535),
    Setting("public_url", str, "", "URL runners use to reach the API; empty means http://api_host:api_port.", check=http_url_or_empty),
    endpoint("control", "Control ROUTER runners connect to."),
    endpoint("routes", "Route update PUB balancers subscribe to."),
    endpoint("routes_snapshot", "Route snapshot ROUTER."),
    endpoint("logs", "Logs PULL runners and balancers push to."),
    endpoint("stats", "Stats XSUB balancers and runners publish to."),
    endpoint("stats_out", "Stats XPUB operators subscribe to."),
    endpoint("attach", "Attach ROUTER runners connect to: the streams of one-off runs."),
    endpoint("locks", "Locks ROUTER lease holders (messaging/locks.py) connect to."),
    endpoint("lock_events", "Lease events PUB (acquired, released, expired)."),
    Setting("run_max_seconds", float, 3600.0, "Longest an attached one-off run (`berth run`) may take before it is ended.", check=positive),
    Setting("run_detached_max_seconds", float, 86400.0, "Longest a detached one-off run (`berth run --detach`) may take.", check=positive),
    Setting("default_max_body_mb", int, 100, "Request body limit for apps that set none (413 beyond).", min=1),
    Setting("base_domain", str, "localhost", "Apps are served at <app>.<base_domain>."),
    Setting("balancer_port", int, BALANCER_PORT, "Port the balancers listen on, for the URLs the CLI prints.", min=1, max=65535),
    Setting("runner_token", str, "", "Shared secret runners present to fetch slugs; empty makes one."),
    Setting("admin_token_file", str, "", "Where the first admin token is written; empty means <data_dir>/admin.token."),
    Setting("heartbeat_interval", float, 1.0, "Seconds between heartbeats.", check=positive),
    Setting("dead_after", int, 5, "Silent heartbeat intervals before a runner is dead.", min=1),
    Setting("drain_seconds", float, 2.0, "Seconds an instance stays out of routes before it is stopped.", min=0),
    Setting("max_upload_mb", int, 200, "Largest compressed push accepted (413 beyond).", min=1),
    Setting("max_unpacked_mb", int, 1000, "Largest unpacked app accepted.", min=1),
    Setting("max_files", int, 20000, "Most files in one push.", min=1),
    Setting("max_per_process_type", int, 20, "Most instances `berth scale` allows per process type of an app (an app's berth.yaml may lower it).", min=1, max=1000),
    Setting("broker_url", str, "", "Redis URL of the platform's own job queue (the Celery broker the job workers take addon work from); empty: addons are unavailable. `berth up` starts one.", check=redis_url_or_empty),
    Setting("platform_token", str, "", "Shared secret job workers present to report on addons; empty makes one (<data_dir>/platform.token)."),
    Setting("job_retry_seconds", float, 30.0, "An addon job with no word from a worker for this long is sent again (its tasks are idempotent).", check=positive),
    Setting("quota_check_seconds", float, 60.0, "How often celery beat has the shared databases' storage measured against their quotas.", check=positive),
    Setting("ha_check_seconds", float, 5.0, "How often celery beat has each postgres ha addon's primary checked (3 failed checks 0.5 s apart promote its standby; a standby failing as many lets the primary commit alone).", check=positive),
    Setting("addons_dir", str, "./.berth-data/addons", "Job workers: where the addon servers' data and final dumps live (dbprovision's data dir)."),
    Setting("addon_address", str, LOOPBACK, "Job workers: the address addon servers listen on (loopback only here).", check=loopback),
    Setting("addon_pg_port", int, 0, "Job workers: the shared PostgreSQL server's port; 0 lets the provisioner pick and keep one.", min=0, max=65535),
    Setting("addon_redis_port", int, 0, "Job workers: the shared Redis server's port; 0 lets the provisioner pick and keep one.", min=0, max=65535),
    Setting("log_level", str, "info", "Platform log level.", choices=LOG_LEVELS),
])
