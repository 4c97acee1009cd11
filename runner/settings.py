"""Runner settings, declared once. Endpoint and URL defaults come from
messaging/channels.py; `python -m runner --help-settings` lists them."""
from __future__ import annotations

import sys
from types import SimpleNamespace

from config import Setting, Spec
from config.checks import (
    LOG_LEVELS,
    endpoint,
    heartbeat_settings,
    host_roles,
    http_url,
    not_empty,
    positive,
)
from config.declare import Invalid
from messaging.channels import LOOPBACK, api_url
from messaging.shapes import HOST_ROLES


def _uid_range(s: SimpleNamespace) -> None:
    if s.app_uid_min > s.app_uid_max:
        raise Invalid(f"app_uid_min ({s.app_uid_min}) is above app_uid_max ({s.app_uid_max})",
                      "set app_uid_min to the first and app_uid_max to the last uid of "
                      "the range app users get")


SPEC = Spec("runner", [
    Setting("host_id", str, "runner-1", "This host's id: its control identity and name in `berth ps`.", check=not_empty),
    Setting("address", str, LOOPBACK, "Loopback address app instances bind on (127.0.0.x simulates hosts)."),
    Setting("data_dir", str, "./.berth-data/runner", "Where slugs, releases, virtualenvs and logs live."),
    Setting("apps_dir", str, "", "Where each app's files live (its user's, 0700); its parents must let others traverse (o+x). Empty means <data_dir>/apps."),
    Setting("wheel_cache_dir", str, "", "Shared read-only wheel cache (only wheels from the index, written by the platform); empty means <data_dir>/wheels."),
    Setting("isolation", str, "auto", "auto (on when root), on or off: per-app users, bwrap jails, cgroups and the loopback firewall.", choices=("auto", "on", "off")),
    Setting("app_uid_min", int, 200000, "First uid for app users (the firewall matches this range).", min=1000, max=2**32 - 2),
    Setting("app_uid_max", int, 299999, "Last uid for app users.", min=1000, max=2**32 - 2),
    Setting("memory_mb", int, 512, "Default memory limit per instance (cgroup); an app may set its own.", min=1),
    Setting("pids_max", int, 512, "Default limit on processes and threads per instance (cgroup).", min=1),
    Setting("keep_releases", int, 3, "Unpacked releases (and virtualenvs) kept per app besides those running.", min=0),
    Setting("max_unpacked_mb", int, 1000, "Largest unpacked slug; counted while unpacking.", min=1),
    Setting("max_files", int, 20000, "Most members in one slug.", min=1),
    Setting("python", str, sys.executable, "Interpreter app virtualenvs are made from (an app's berth.yaml may ask for another by version).", check=not_empty),
    Setting("interpreters", list, [], "More interpreters apps may ask for by version (berth.yaml `python:`), besides `python` and every python3.N in /usr/bin and /usr/local/bin."),
    Setting("serve_static", bool, True, "Serve apps' collected static files (Django's collectstatic) from this host's static file server (runner/static.py) rather than their own processes."),
    Setting("static_port", int, 0, "Port of the static file server on `address` (0: any free port); the balancer reaches it, apps cannot (firewall).", min=0, max=65535),
    Setting("settings_dir", str, "", "Per-host layer of the Django/Flask settings Berth injects: a directory with optional django.py / flask.py (settings_templates/); empty: none."),
    endpoint("control", "Controller's control ROUTER."),
    endpoint("logs", "Controller's logs PULL."),
    endpoint("attach", "Controller's attach ROUTER: the streams of one-off runs."),
    Setting("controller_url", str, api_url(), "Controller HTTP API, for fetching slugs.", check=http_url),
    Setting("runner_token", str, "", "Shared secret runners present to fetch slugs."),
    *heartbeat_settings("the controller is taken as away"),
    Setting("health_timeout", float, 60.0, "Seconds a new web instance has to answer HTTP before it is failed.", check=positive),
    Setting("stop_grace", float, 10.0, "Seconds between SIGTERM and SIGKILL when stopping an instance.", min=0),
    Setting("start_retries", int, 5, "Consecutive failed starts before an instance is FATAL.", min=1),
    Setting("backoff_max", float, 30.0, "Longest wait between restarts of a crashing instance.", min=0),
    Setting("max_parallel_spawns", int, 4, "Instances spawned at once (fork/exec into their jails) by the spawn pool, off the runner's loop; more wait their turn in STARTING.", min=1, max=64),
    Setting("capacity_mb", int, 0, "Memory this host gives app instances in all (the sum of their limits); the controller places no instance beyond it. 0: not bounded.", min=0),
    Setting("roles", list, list(HOST_ROLES), "What this host runs: `app` (app instances, one-off runs, builds) and/or `db` (addon database servers: dedicated and ha PostgreSQL and Redis, which the job workers put on db hosts).", check=host_roles),
    Setting("keys_dir", str, "", "CURVE keys of the platform's ZeroMQ channels (`berth admin init` makes them; messaging/curve.py): this runner connects with its own pair (hosts/<key_name>) and the controller's public key. Empty: plain sockets, open to any local process."),
    Setting("key_name", str, "", "This host's name among the keys (hosts/<key_name>.key_secret); empty: host_id."),
    Setting("log_level", str, "info", "Platform log level.", choices=LOG_LEVELS),
], checks=[_uid_range])
