"""Runner settings, declared once."""
from __future__ import annotations

import sys

from config import Setting, Spec

SPEC = Spec("runner", [
    Setting("host_id", str, "runner-1", "This host's id: its control identity and name in `berth ps`."),
    Setting("address", str, "127.0.0.1", "Loopback address app instances bind on (127.0.0.x simulates hosts)."),
    Setting("data_dir", str, "./.berth-data/runner", "Where slugs, releases, virtualenvs and logs live."),
    Setting("apps_dir", str, "", "Where each app's files live (its user's, 0700); its parents must let others traverse (o+x). Empty means <data_dir>/apps."),
    Setting("wheel_cache_dir", str, "", "Shared read-only wheel cache (only wheels from the index, written by the platform); empty means <data_dir>/wheels."),
    Setting("isolation", str, "auto", "auto (on when root), on or off: per-app users, bwrap jails, cgroups and the loopback firewall."),
    Setting("app_uid_min", int, 200000, "First uid for app users (the firewall matches this range)."),
    Setting("app_uid_max", int, 299999, "Last uid for app users."),
    Setting("memory_mb", int, 512, "Default memory limit per instance (cgroup); an app may set its own."),
    Setting("pids_max", int, 512, "Default limit on processes and threads per instance (cgroup)."),
    Setting("keep_releases", int, 3, "Unpacked releases (and virtualenvs) kept per app besides those running."),
    Setting("max_unpacked_mb", int, 1000, "Largest unpacked slug; counted while unpacking."),
    Setting("max_files", int, 20000, "Most members in one slug."),
    Setting("python", str, sys.executable, "Interpreter app virtualenvs are made from."),
    Setting("control_endpoint", str, "tcp://127.0.0.1:8701", "Controller's control ROUTER."),
    Setting("logs_endpoint", str, "tcp://127.0.0.1:8704", "Controller's logs PULL."),
    Setting("controller_url", str, "http://127.0.0.1:8700", "Controller HTTP API, for fetching slugs."),
    Setting("runner_token", str, "", "Shared secret runners present to fetch slugs."),
    Setting("heartbeat_interval", float, 1.0, "Seconds between heartbeats."),
    Setting("dead_after", int, 5, "Silent heartbeat intervals before the controller is taken as away."),
    Setting("health_timeout", float, 60.0, "Seconds a new web instance has to answer HTTP before it is failed."),
    Setting("stop_grace", float, 10.0, "Seconds between SIGTERM and SIGKILL when stopping an instance."),
    Setting("start_retries", int, 5, "Consecutive failed starts before an instance is FATAL."),
    Setting("backoff_max", float, 30.0, "Longest wait between restarts of a crashing instance."),
    Setting("log_level", str, "info", "Platform log level."),
])
