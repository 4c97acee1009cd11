"""The typed shapes inside messages: instance states, inventory items, backends and
routes, declared once.

On the wire they are plain JSON objects; in code they are these classes. Each has
`to_wire()` (a JSON-ready dict) and `from_wire()` (tolerant of unknown fields, so a
newer peer may add some; strict about the fields it needs, raising ProtocolError).
Nothing outside messaging/ spells one of these as a dict literal.

This module imports no pyzmq: the CLI and the balancer's pure modules use it.
"""
from __future__ import annotations

import enum
import functools
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from messaging.errors import ProtocolError


class State(str, enum.Enum):
    """Where an instance is in its life.

    The runner's process state machine (runner/process.py) moves an instance through
    PREPARING .. STOPPED; the controller adds two views of its own: PENDING (a start
    was sent, no heartbeat has shown the instance yet) and DRAINING (taken out of the
    routes, stopped once the drain time is over).
    """

    PENDING = "PENDING"
    PREPARING = "PREPARING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FATAL = "FATAL"
    STOPPED = "STOPPED"
    DRAINING = "DRAINING"

    @classmethod
    def parse(cls, value: Any) -> State:
        try:
            return cls(value)
        except ValueError:
            raise ProtocolError(f"unknown instance state {value!r}") from None


# states in which an instance counts toward its formation (it is, or will be, up)
LIVE = frozenset({State.PENDING, State.PREPARING, State.STARTING, State.RUNNING,
                  State.BACKOFF, State.FATAL})


def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


@dataclass
class InventoryItem:
    """One instance as its host reports it in every heartbeat (and the controller
    shows it in `berth ps`); `host` is filled in by whoever knows which host sent it."""

    instance: str
    app: str
    release: int
    proc: str
    state: State
    address: str | None = None
    port: int | None = None
    restarts: int = 0
    pid: int | None = None
    since: float = 0.0
    reason: str = ""
    oom_kills: int = 0
    host: str = ""
    # the app's last output lines, sent while the instance is BACKOFF or FATAL so a
    # crash on start is reported with its traceback at once
    last_output: list[str] = field(default_factory=list)

    @property
    def web(self) -> bool:
        return self.proc == "web"

    def to_wire(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_wire(cls, data: Any, host: str = "") -> InventoryItem:
        if not isinstance(data, dict):
            raise ProtocolError("an inventory item is not a JSON object")
        try:
            kept = {k: v for k, v in data.items() if k in _INVENTORY_FIELDS}
            kept["state"] = State.parse(data.get("state"))
            kept["reason"] = str(data.get("reason") or "")
            kept["since"] = float(data.get("since") or 0.0)
            tail = data.get("last_output") or []
            kept["last_output"] = [str(x) for x in tail] if isinstance(tail, list) else []
            if host:
                kept["host"] = host
            return cls(**kept)
        except TypeError as exc:
            raise ProtocolError(f"inventory item lacks fields: {exc}") from exc


_INVENTORY_FIELDS = _field_names(InventoryItem)


@dataclass(frozen=True)
class Backend:
    """One running web instance a balancer may send requests to."""

    id: str
    address: str
    port: int

    # computed once per instance (the balancer asks for it on every request; a
    # property re-formats it each time): the instance is frozen, so it cannot go
    # stale, and it is no field (not compared, hashed or sent)
    @functools.cached_property
    def key(self) -> str:
        return f"{self.address}:{self.port}"

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address, "port": self.port}

    @classmethod
    def from_wire(cls, data: Any) -> Backend:
        if not isinstance(data, dict):
            raise ProtocolError("a backend is not a JSON object")
        try:
            return cls(str(data.get("id", "")), str(data["address"]), int(data["port"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"backend {data!r} lacks a valid address or port") from exc


# a static URL prefix the platform serves (Django's STATIC_URL as a path): "/" first
# and last, and only characters a request target carries as they are
_STATIC_PREFIX = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*/$")


def static_prefix_ok(prefix: str) -> bool:
    """Whether `prefix` may be a route's static prefix: a path of its own ("/x/"),
    never the whole site ("/") nor an absolute URL (a CDN's is not ours to serve)."""
    return len(prefix) > 1 and "//" not in prefix and bool(_STATIC_PREFIX.match(prefix))


@dataclass(frozen=True)
class Route:
    """One app's route: the Host names it answers, its backends, and how to answer
    when there are none (reason), in maintenance (503 + Retry-After) or beyond the
    body limit (max_body bytes, 413; 0 means no limit).

    Static files: GET and HEAD requests under `static_prefix` go to one of
    `static_backends` (the runners' static file servers on the hosts holding the
    app's serving release) instead of an instance, naming the app's release versions
    `static_releases`, newest first, whose collected files they look in. On the wire
    an optional `static` object {prefix, backends, releases}; a route without one (an
    older controller), or with a malformed one, has no static serving: its instances
    answer those requests as before."""

    hosts: tuple[str, ...] = ()
    backends: tuple[Backend, ...] = ()
    reason: str = ""
    maintenance: bool = False
    max_body: int = 0
    static_prefix: str = ""
    static_backends: tuple[Backend, ...] = ()
    static_releases: tuple[int, ...] = ()

    @property
    def serves_static(self) -> bool:
        return bool(self.static_prefix and self.static_backends and self.static_releases)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hosts": list(self.hosts),
                               "backends": [b.to_wire() for b in self.backends],
                               "maintenance": self.maintenance,
                               "max_body": self.max_body}
        if self.reason:
            out["reason"] = self.reason
        if self.serves_static:
            out["static"] = {"prefix": self.static_prefix,
                             "backends": [b.to_wire() for b in self.static_backends],
                             "releases": list(self.static_releases)}
        return out

    @classmethod
    def from_wire(cls, data: Any) -> Route:
        if not isinstance(data, dict):
            raise ProtocolError("a route is not a JSON object")
        hosts = data.get("hosts") or []
        backends = data.get("backends") or []
        if not isinstance(hosts, list) or not isinstance(backends, list):
            raise ProtocolError("route hosts and backends must be lists")
        try:
            max_body = max(0, int(data.get("max_body") or 0))
        except (TypeError, ValueError):
            max_body = 0
        prefix, static_backends, releases = _static_from_wire(data.get("static"))
        return cls(tuple(str(h) for h in hosts),
                   tuple(Backend.from_wire(b) for b in backends),
                   str(data.get("reason") or ""), bool(data.get("maintenance")), max_body,
                   prefix, static_backends, releases)


def _static_from_wire(data: Any) -> tuple[str, tuple[Backend, ...], tuple[int, ...]]:
    """A route's optional static part; anything malformed means none (the app's
    instances keep answering), never a lost route."""
    none: tuple[str, tuple[Backend, ...], tuple[int, ...]] = ("", (), ())
    if not isinstance(data, dict):
        return none
    prefix, backends, releases = data.get("prefix"), data.get("backends"), data.get("releases")
    if not isinstance(prefix, str) or not static_prefix_ok(prefix) \
            or not isinstance(backends, list) or not isinstance(releases, list) \
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in releases):
        return none
    try:
        parsed = tuple(Backend.from_wire(b) for b in backends)
    except ProtocolError:
        return none
    if not parsed or not releases:
        return none
    return prefix, parsed, tuple(releases)


@dataclass(frozen=True)
class Limits:
    """Per-instance resource limits a start command may carry; None = the runner's
    default."""

    memory_mb: int | None = None
    pids_max: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"memory_mb": self.memory_mb, "pids_max": self.pids_max}

    @classmethod
    def from_wire(cls, data: Any) -> Limits:
        data = data or {}
        if not isinstance(data, dict):
            raise ProtocolError("limits must be a JSON object")
        values = {}
        for name in ("memory_mb", "pids_max"):
            v = data.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ProtocolError(f"limit {name} must be a positive integer, got {v!r}")
            values[name] = v
        return cls(**values)


# what a host may run: app instances, one-off runs and builds ("app"); addon database
# servers ("db"). A runner declares its roles (runner setting `roles`).
HOST_ROLES = ("app", "db")
# a team's role on an app, least first: each may do what the ones before it may (the
# API's access endpoints and `berth access` speak these names)
ROLES = ("viewer", "deployer", "owner")


def role_at_least(have: str | None, need: str) -> bool:
    return have is not None and ROLES.index(have) >= ROLES.index(need)


SERVICE_KINDS = ("postgres", "pgbouncer", "redis", "sentinel")
STOP_SIGNALS = ("TERM", "INT", "QUIT")


@dataclass(frozen=True)
class ServiceSpec:
    """A platform server a runner supervises for an addon (a PostgreSQL node, its
    PgBouncer, a Redis node, a Sentinel): the same process state machine as an app
    instance, but no slug, no venv, no gunicorn. `argv` runs in the foreground as
    the system user `user`, in `cwd`; `pidfile` names a process already running (its
    provisioner started it), which the runner adopts instead of starting another;
    `stop_signal` is its clean, quick shutdown (PostgreSQL: INT, a fast shutdown);
    its output goes to `log_file`. `app` is the tenant whose log hears its
    starts, crashes and restarts."""

    id: str
    addon: str
    app: str
    kind: str
    argv: tuple[str, ...]
    cwd: str
    user: str
    address: str
    port: int
    pidfile: str = ""
    stop_signal: str = "TERM"
    log_file: str = ""

    def to_wire(self) -> dict[str, Any]:
        out = asdict(self)
        out["argv"] = list(self.argv)
        return out

    @classmethod
    def from_wire(cls, data: Any) -> ServiceSpec:
        if not isinstance(data, dict):
            raise ProtocolError("a service spec is not a JSON object")
        try:
            kept = {k: v for k, v in data.items() if k in _SERVICE_FIELDS}
            argv = kept.get("argv")
            if not isinstance(argv, list) or not argv or \
                    not all(isinstance(a, str) and a for a in argv):
                raise ProtocolError("a service's argv must be a non-empty list of strings")
            kept["argv"] = tuple(argv)
            spec = cls(**kept)
        except TypeError as exc:
            raise ProtocolError(f"service spec lacks fields: {exc}") from exc
        if spec.kind not in SERVICE_KINDS:
            raise ProtocolError(f"unknown service kind {spec.kind!r}; one of "
                                f"{', '.join(SERVICE_KINDS)}")
        if spec.stop_signal not in STOP_SIGNALS:
            raise ProtocolError(f"stop_signal must be one of {', '.join(STOP_SIGNALS)}")
        if not isinstance(spec.port, int) or isinstance(spec.port, bool) \
                or not 0 < spec.port < 65536:
            raise ProtocolError(f"service port {spec.port!r} is not a port")
        for name in ("id", "addon", "app", "cwd", "user", "address"):
            if not isinstance(getattr(spec, name), str) or not getattr(spec, name):
                raise ProtocolError(f"service field {name!r} must be a non-empty string")
        if not spec.cwd.startswith("/") or not spec.argv[0].startswith("/"):
            raise ProtocolError("a service's cwd and program must be absolute paths")
        return spec


_SERVICE_FIELDS = _field_names(ServiceSpec)


@dataclass
class RunItem:
    """One one-off run as its host reports it in every heartbeat (`runs`, apart from
    the inventory) and `berth ps` shows it: PREPARING, RUNNING, or STOPPING while it
    is being ended."""

    run: str
    app: str
    release: int
    command: str
    state: State
    detach: bool = False
    tty: bool = False
    pid: int | None = None
    since: float = 0.0
    host: str = ""

    @property
    def proc(self) -> str:
        """Its name in logs and `berth ps`."""
        return f"run.{self.run}"

    def to_wire(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out

    @classmethod
    def from_wire(cls, data: Any, host: str = "") -> RunItem:
        if not isinstance(data, dict):
            raise ProtocolError("a run item is not a JSON object")
        try:
            kept = {k: v for k, v in data.items() if k in _RUN_FIELDS}
            kept["state"] = State.parse(data.get("state"))
            kept["since"] = float(data.get("since") or 0.0)
            if host:
                kept["host"] = host
            return cls(**kept)
        except TypeError as exc:
            raise ProtocolError(f"run item lacks fields: {exc}") from exc


_RUN_FIELDS = _field_names(RunItem)


@dataclass
class HostView:
    """A host as the controller's API shows it."""

    address: str | None
    instances: int
    static_port: int | None = None      # its static file server, while up
    roles: tuple[str, ...] = HOST_ROLES
    capacity_mb: int = 0                # 0: not bounded
    used_mb: int = 0                    # the memory limits of what runs there
    draining: bool = False              # `berth hosts drain`: being emptied

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HostReport:
    """What a runner's heartbeat says about its host: where its instances answer,
    every instance on it, every app it holds anything of (files, a user,
    cgroups), so leftovers of a destroyed app are found on a host that was away,
    every one-off run on it, and its static file server: the port it listens on (on
    `address`) while it is up, and the releases whose collected static files it
    holds with their URL prefix ({app: {release version: prefix}})."""

    host: str
    address: str | None = None
    inventory: list[InventoryItem] = field(default_factory=list)
    apps: list[str] = field(default_factory=list)
    seq: int = 0
    runs: list[RunItem] = field(default_factory=list)
    static_port: int | None = None
    static_roots: dict[str, dict[int, str]] = field(default_factory=dict)
    # the addon servers it supervises (ServiceSpec ids as `instance`, the addon as
    # `app`, the kind as `proc`); apart from the inventory: they are never routed
    services: list[InventoryItem] = field(default_factory=list)
    roles: tuple[str, ...] = HOST_ROLES     # an older runner sends none: both
    capacity_mb: int = 0                    # memory its instances may take; 0: unbounded
    default_memory_mb: int = 0              # an instance's limit when its app sets none

    @property
    def runs_apps(self) -> bool:
        return "app" in self.roles

    @property
    def runs_dbs(self) -> bool:
        return "db" in self.roles

    @classmethod
    def from_heartbeat(cls, fields_: dict[str, Any]) -> HostReport:
        host = str(fields_["host"])
        port = fields_.get("static_port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            port = None         # absent (an older runner), off, or nonsense: none
        return cls(host, fields_.get("address"),
                   [InventoryItem.from_wire(i, host) for i in fields_.get("inventory") or []],
                   [str(a) for a in fields_.get("apps") or []], int(fields_.get("seq") or 0),
                   [RunItem.from_wire(r, host) for r in fields_.get("runs") or []], port,
                   static_roots_from_wire(fields_.get("static_roots")) if port else {},
                   [InventoryItem.from_wire(i, host) for i in fields_.get("services") or []],
                   tuple(r for r in (fields_.get("roles") or HOST_ROLES) if r in HOST_ROLES),
                   _count(fields_.get("capacity_mb")), _count(fields_.get("default_memory_mb")))


def _count(value: Any) -> int:
    """A non-negative integer of a heartbeat, or 0 (absent or nonsense)."""
    return value if isinstance(value, int) and not isinstance(value, bool) \
        and value > 0 else 0


def static_roots_to_wire(roots: dict[str, dict[int, str]]) -> dict[str, dict[str, str]]:
    """{app: {version: prefix}} as JSON has it (object keys are strings)."""
    return {app: {str(v): prefix for v, prefix in sorted(versions.items())}
            for app, versions in sorted(roots.items())}


def static_roots_from_wire(data: Any) -> dict[str, dict[int, str]]:
    """The heartbeat's static roots; an entry that makes no sense is left out (that
    release's static files are then answered by its instances)."""
    out: dict[str, dict[int, str]] = {}
    if not isinstance(data, dict):
        return out
    for app, versions in data.items():
        if not isinstance(versions, dict):
            continue
        for version, prefix in versions.items():
            try:
                number = int(version)
            except (TypeError, ValueError):
                continue
            if number > 0 and isinstance(prefix, str) and static_prefix_ok(prefix):
                out.setdefault(str(app), {})[number] = prefix
    return out


# a lease's name: what it guards, e.g. "deploy/myapp" or "app/myapp/record/42"
LEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,199}$")
LEASE_TTL = (0.1, 3600.0)      # shortest and longest lease a request may ask for


@dataclass(frozen=True)
class Lease:
    """A named lease as the controller granted it: `owner` holds `name` for
    `expires_in` more seconds (relative, so no two hosts' clocks are compared).
    `fence` grows with every grant of the name: whatever the lease guards can refuse
    a holder whose fence is older than the newest it has seen."""

    name: str
    owner: str
    fence: int
    ttl: float
    expires_in: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> Lease:
        if not isinstance(data, dict):
            raise ProtocolError("a lease is not a JSON object")
        try:
            return cls(str(data["name"]), str(data["owner"]), int(data["fence"]),
                       float(data["ttl"]), float(data.get("expires_in") or 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"lease {data!r} lacks name, owner, fence or ttl") from exc
