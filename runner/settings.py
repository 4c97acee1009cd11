"""Runner settings, declared once."""
from __future__ import annotations

import sys

from config import Setting, Spec

SPEC = Spec("runner", [
    Setting("host_id", str, "runner-1", "This host's id: its control identity and name in `berth ps`."),
    Setting("address", str, "127.0.0.1", "Loopback address app instances bind on (127.0.0.x simulates hosts)."),
    Setting("data_dir", str, "./.berth-data/runner", "Where slugs, releases, virtualenvs and logs live."),
    Setting("venv_cache_dir", str, "", "Shared virtualenv cache; empty means <data_dir>/venvs."),
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
