"""The whole platform on one machine: controller, runners and balancers as child
processes, each with its own data dir and loopback address. `berth up` and the test
fixtures both use this, so the tests start the platform exactly as a newcomer does.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path

import yaml

from balancer import settings as balancer_settings
from cli import settings as cli_settings
from config import Spec
from controller import settings as controller_settings
from messaging import curve
from messaging.channels import (
    ADDON_PG_PORT,
    ADDON_REDIS_PORT,
    API_PORT,
    BALANCER_PORT,
    BROKER_PORT,
    CHANNELS,
    LOOPBACK,
    api_url,
)
from messaging.errors import BerthError
from runner import settings as runner_settings

_given: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A port free on `host` now and not handed out before by this process, from the
    CLI setting port_range (below the kernel's ephemeral range: a port picked there
    can be taken by an outgoing connection between the check and the daemon's bind)."""
    low, high = port_range()
    for _ in range(1000):
        port = random.randint(low, high)
        if port not in _given and not port_in_use(host, port):
            _given.add(port)
            return port
    with socket.socket() as s:             # the range is full: any free port
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_range() -> tuple[int, int]:
    """The CLI setting port_range as (low, high)."""
    first, _, last = cli_settings.SPEC.load().port_range.partition("-")
    return int(first), int(last)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# Ports field -> the channel it serves; each field defaults to its channel's port
CHANNEL_FIELDS = {"control": "control", "routes": "routes", "snapshot": "routes_snapshot",
                  "logs": "logs", "stats": "stats", "stats_out": "stats_out",
                  "attach": "attach", "locks": "locks", "lock_events": "lock_events"}


@dataclass
class Ports:
    """Every port of one local platform; the defaults are the declared ones
    (messaging/channels.py)."""

    api: int = API_PORT
    control: int = CHANNELS["control"].default_port
    routes: int = CHANNELS["routes"].default_port
    snapshot: int = CHANNELS["routes_snapshot"].default_port
    logs: int = CHANNELS["logs"].default_port
    balancer: int = BALANCER_PORT
    stats: int = CHANNELS["stats"].default_port
    stats_out: int = CHANNELS["stats_out"].default_port
    attach: int = CHANNELS["attach"].default_port
    locks: int = CHANNELS["locks"].default_port
    lock_events: int = CHANNELS["lock_events"].default_port
    broker: int = BROKER_PORT               # the platform's Redis (Celery broker)
    addon_pg: int = ADDON_PG_PORT           # the shared addon servers
    addon_redis: int = ADDON_REDIS_PORT

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in fields(cls)))

    @classmethod
    def after_api(cls, api: int, balancer: int = BALANCER_PORT) -> Ports:
        """The API on `api` and each channel as far after it as its default port is
        after the default API port (8700 gives the defaults)."""
        return cls(api=api, balancer=balancer, broker=api + BROKER_PORT - API_PORT,
                   addon_pg=api + ADDON_PG_PORT - API_PORT,
                   addon_redis=api + ADDON_REDIS_PORT - API_PORT, **{
                       name: api + CHANNELS[ch].default_port - API_PORT
                       for name, ch in CHANNEL_FIELDS.items()})

    def for_channel(self, channel: str) -> int:
        name = next(f for f, ch in CHANNEL_FIELDS.items() if ch == channel)
        return int(getattr(self, name))

    def endpoints(self, spec: Spec) -> dict[str, str]:
        """The endpoint settings `spec` declares, each on this platform's port."""
        return {ch.endpoint_setting: ch.endpoint(self.for_channel(ch.name))
                for ch in CHANNELS.values() if ch.endpoint_setting in spec.settings}


def outside_tmp(data_dir: Path) -> Path | None:
    """Where app files and the wheel cache go when the platform's data dir is under
    /tmp (a clone in `mktemp -d`): every app jail replaces /tmp with a private one, so
    what apps must see (their dirs, the wheels their builds install) lives in
    /var/tmp/berth-<hash of the data dir> instead. None when the data dir is fine."""
    data = data_dir.resolve()
    if data != Path("/tmp") and Path("/tmp") not in data.parents:
        return None
    return Path("/var/tmp") / f"berth-{hashlib.sha256(str(data).encode()).hexdigest()[:12]}"


@dataclass
class LocalPlatform:
    data_dir: Path
    ports: Ports = field(default_factory=Ports)
    # (name, address) or (name, address, roles: "app,db"); roles default to both
    runners: list[tuple[str, ...]] = field(default_factory=lambda: [("runner-1", "127.0.0.1")])
    wheel_cache_dir: str = ""
    apps_dir: str = ""          # each runner's app files go in <apps_dir>/<runner name>
    drain_seconds: float = 2.0
    jobs: bool = True           # broker + job workers + beat: addons (controller/jobs.py)
    job_retry_seconds: float = 30.0
    store_url: str = ""         # the controller's store on PostgreSQL (a standby can follow)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # how each child was started (module, env, argv): what `respawn` repeats
    launches: dict[str, tuple[str, dict[str, str], list[str] | None]] = \
        field(default_factory=dict)

    def __post_init__(self) -> None:
        outside = outside_tmp(self.data_dir)
        if outside is not None:
            self.apps_dir = self.apps_dir or str(outside / "apps")
            self.wheel_cache_dir = self.wheel_cache_dir or str(outside / "wheels")

    @property
    def api_url(self) -> str:
        return api_url(port=self.ports.api)

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "controller" / "admin.token").read_text().strip()

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    def config_path(self) -> Path:
        return self.data_dir / "berth.yaml"

    @property
    def broker_url(self) -> str:
        return f"redis://:{self._broker_password()}@{LOOPBACK}:{self.ports.broker}/0"

    def _broker_password(self) -> str:
        path = self.data_dir / "broker" / "password"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            path.write_text(secrets.token_hex(24))
            path.chmod(0o600)
        return path.read_text().strip()

    def write_config(self) -> Path:
        p = self.ports
        self.data_dir.mkdir(parents=True, exist_ok=True)
        jobs = {"broker_url": self.broker_url, "addons_dir": str(self.data_dir / "addons"),
                "addon_pg_port": p.addon_pg, "addon_redis_port": p.addon_redis,
                "job_retry_seconds": self.job_retry_seconds,
                # backups of the apps' data dirs: every runner here is on this host
                "backup_apps_dirs": [str(self.runner_apps_dir(name))
                                     for name, *_ in self.runners]} if self.jobs else {}
        # this platform's own CURVE keys: another platform on this machine (a stray
        # test, a second `berth up`) is refused on every channel
        keys = {"keys_dir": str(self.keys_dir)}
        curve.init(self.keys_dir, [])
        cfg = {
            "controller": {"data_dir": str(self.data_dir / "controller"), "api_port": p.api,
                           "balancer_port": p.balancer, "drain_seconds": self.drain_seconds,
                           **p.endpoints(controller_settings.SPEC), **jobs, **keys,
                           **({"store_url": self.store_url} if self.store_url else {})},
            "runner": {"controller_url": self.api_url, "wheel_cache_dir": self.wheel_cache_dir,
                       **p.endpoints(runner_settings.SPEC), **keys},
            "balancer": {"listen_port": p.balancer, **p.endpoints(balancer_settings.SPEC),
                         **keys},
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # app users pass through on the way to their runner's apps dir; nothing here
        # is listable or readable by them (each daemon keeps its own dir 0700)
        self.data_dir.chmod(0o711)
        self.config_path().write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.config_path().chmod(0o600)
        return self.config_path()

    def _spawn(self, name: str, module: str, env: dict[str, str],
               argv: list[str] | None = None) -> subprocess.Popen[bytes]:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        logs.chmod(0o700)
        out = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv or [sys.executable, "-m", module, "--config", str(self.config_path())],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        out.close()
        self.procs[name] = proc
        self.launches[name] = (module, env, argv)
        return proc

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start a child again as it was started (cli/supervisor.py), without waiting
        for it to be ready."""
        return self._spawn(name, *self.launches[name])

    def check_ports(self) -> None:
        # the addon servers' ports belong to the servers the job workers started
        # (a previous run's may still be up): the provisioner finds them itself
        own = (self.ports.addon_pg, self.ports.addon_redis)
        for port in astuple(self.ports):
            if port not in own and port_in_use(LOOPBACK, port):
                raise BerthError(f"port {port} on 127.0.0.1 is already in use",
                                 "stop what uses it (another `berth up`? try `berth down`) "
                                 "or pick other ports")

    def start(self, timeout: float = 60.0) -> None:
        self.check_ports()
        self.write_config()
        runner_token = self.data_dir / "controller" / "runner.token"
        if self.jobs:
            self.start_broker(timeout)
        self.start_controller()
        self._wait(lambda: self._health() is not None, timeout, "controller")
        for name, address, *roles in self.runners:
            self.start_runner(name, address, runner_token.read_text().strip(),
                              roles=roles[0] if roles else None)
        self._wait(lambda: (self._health() or {}).get("runners", 0) >= len(self.runners),
                   timeout, "runners")
        self.start_balancer("balancer-1", self.ports.balancer)
        if self.jobs:
            self.start_jobs(timeout)

    def start_broker(self, timeout: float = 30.0) -> None:
        """The platform's own redis-server: loopback, a password, its own data dir,
        AOF; the job workers' Celery broker (never an app's: apps cannot reach it)."""
        broker_dir = self.data_dir / "broker"
        self._broker_password()
        conf = broker_dir / "redis.conf"
        conf.write_text(f"bind {LOOPBACK}\nport {self.ports.broker}\n"
                        f"requirepass {self._broker_password()}\n"
                        f"dir {broker_dir}\nappendonly yes\nsave \"\"\n"
                        "daemonize no\nprotected-mode yes\n")
        conf.chmod(0o600)
        self._spawn("broker", "", {}, argv=["redis-server", str(conf)])
        self._wait(lambda: port_in_use(LOOPBACK, self.ports.broker), timeout, "broker")

    def _jobs_argv(self, what: str) -> list[str]:
        return [sys.executable, "-m", "controller.jobs", "--config", str(self.config_path()),
                what]

    def start_jobs(self, timeout: float = 60.0) -> None:
        """A Celery worker and celery beat (controller/jobs.py), supervised here."""
        self._spawn("jobs-beat", "", {}, argv=self._jobs_argv("beat"))
        self.start_jobs_worker(timeout)

    def start_jobs_worker(self, timeout: float = 60.0) -> None:
        log = self.data_dir / "logs" / "jobs-worker.log"
        seen = log.read_bytes().count(b" ready.") if log.exists() else 0
        self._spawn("jobs-worker", "", {}, argv=self._jobs_argv("worker"))
        self._wait(lambda: log.read_bytes().count(b" ready.") > seen, timeout, "job worker")

    def start_controller(self) -> None:
        self._spawn("controller", "controller", {})

    def start_standby_controller(self, name: str = "controller-2") -> None:
        """Another controller on the same settings (needs `store_url`): it waits for
        the leader lease and takes over when the leader dies (controller/pgstore.py)."""
        if not self.store_url:
            raise BerthError("a standby controller needs the store on PostgreSQL",
                             "give the platform a store_url")
        self._spawn(name, "controller", {"BERTH_CONTROLLER_HOST_ID": name})

    def runner_apps_dir(self, name: str) -> Path:
        """Where runner `name` keeps its apps (its apps_dir setting's default otherwise)."""
        return Path(self.apps_dir) / name if self.apps_dir else self.data_dir / name / "apps"

    def start_runner(self, name: str, address: str, token: str | None = None,
                     roles: str | None = None) -> None:
        token = token or (self.data_dir / "controller" / "runner.token").read_text().strip()
        env = {"BERTH_RUNNER_HOST_ID": name, "BERTH_RUNNER_ADDRESS": address,
               "BERTH_RUNNER_DATA_DIR": str(self.data_dir / name),
               "BERTH_RUNNER_RUNNER_TOKEN": token}
        if roles:
            env["BERTH_RUNNER_ROLES"] = roles
        curve.init(self.keys_dir, [name])          # its own pair, admitted
        env["BERTH_RUNNER_KEY_NAME"] = name
        if self.apps_dir:
            env["BERTH_RUNNER_APPS_DIR"] = str(Path(self.apps_dir) / name)
        self._spawn(name, "runner", env)

    def start_balancer(self, name: str, port: int, timeout: float = 30.0) -> None:
        curve.init(self.keys_dir, [name])
        self._spawn(name, "balancer", {"BERTH_BALANCER_HOST_ID": name,
                                       "BERTH_BALANCER_LISTEN_PORT": str(port),
                                       "BERTH_BALANCER_KEY_NAME": name})
        self._wait(lambda: port_in_use("127.0.0.1", port), timeout, name)

    def _health(self) -> dict[str, int] | None:
        try:
            with urllib.request.urlopen(f"{self.api_url}/v1/health", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    def _wait(self, ready: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                name = next(iter(dead))
                raise BerthError(f"{name} exited with code {dead[name]} while starting:\n"
                                 + self.log_tail(name),
                                 f"see {self.data_dir / 'logs' / (name + '.log')}")
            if ready():
                return
            time.sleep(0.1)
        raise BerthError(f"{what} did not become ready within {timeout:.0f}s",
                         f"see the logs in {self.data_dir / 'logs'}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def died(self) -> dict[str, int]:
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop_one(self, name: str, timeout: float = 20.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        """Balancers first, then runners (which stop their apps), then the job workers,
        the controller, the broker, and the addon servers the workers started."""
        rank = {"controller": 3, "broker": 4}
        order = sorted(self.procs, key=lambda n: rank.get(
            n, 3 if n.startswith("controller") else 2 if n.startswith("jobs-")
            else 1 if n.startswith("runner") else 0))
        had_jobs = self.jobs and self.config_path().exists()
        for name in order:
            self.stop_one(name)
        if had_jobs:
            self.stop_addon_servers()

    def stop_addon_servers(self, timeout: float = 60.0) -> None:
        with open(self.data_dir / "logs" / "jobs-stop.log", "ab") as out:
            try:
                subprocess.run([sys.executable, "-m", "controller.jobs", "--config",
                                str(self.config_path()), "stop-servers"], stdout=out,
                               stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
