"""Addons (a tenant's PostgreSQL or Redis) as the controller keeps them: each one an
explicit state machine, and the environment it gives the app it belongs to.

    (create) --> PROVISIONING --done--> READY --destroy--> DESTROYING --done--> DESTROYED
                      |   ^                ^  |  (rotate: stays READY,   |  ^
                      |   |                |  |   op ROTATE until done)  |  |
                      +---|--failed--> FAILED -+----- destroy -----------+  +-- (again)
                          +-- retry (the job is sent again) --+

The slow work (making the database, dropping it with a final dump, new passwords) is
done by the platform's job workers (controller/jobs.py, Celery). Besides its state an
addon carries the operation in flight (`op`: provision, rotate, destroy) until a
worker reports it done or failed; the controller's job queue (controller/jobqueue.py)
sends the op's task again while it stays unfinished, and the tasks are idempotent, so
a worker killed half-way leaves an addon that the next attempt finishes or cleans up.
Workers report through the API (the platform token): the controller stays the only
writer of its store.

Credentials live in the store and reach the app only as config vars of its releases:
every attachment of a READY addon names the variables it sets (`DATABASE_URL` by
default; `berth addons attach NAME --as STORAGE` adds `STORAGE_URL`, `--split` the
`STORAGE_HOST/PORT/NAME/USER/PASSWORD` parts), and a release records which of its
config keys came from addons (`addon_keys`) so the next one can replace them.
"""
from __future__ import annotations

import enum
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from controller.errors import Conflict, Invalid
from messaging.errors import ProtocolError
from messaging.shapes import ServiceSpec

ENGINES = ("postgres", "redis")
PLANS = ("shared", "dedicated", "ha")
STYLES = ("url", "split")                 # STORAGE_URL, or STORAGE_HOST/PORT/NAME/...
PREFIX = {"postgres": "DATABASE", "redis": "REDIS"}
SPLIT_PARTS = ("HOST", "PORT", "NAME", "USER", "PASSWORD")
ALIAS = re.compile(r"^[A-Z][A-Z0-9_]{0,39}$")
ADDON_ID = re.compile(r"^(postgres|redis)-[0-9a-f]{6}$")
QUOTA_STATES = ("ok", "warn", "blocked", "restored")
# storage a plan allows when the request names none (shared PostgreSQL is measured by
# the job workers' periodic quota check; the others are bounded by their own servers)
DEFAULT_QUOTA_MB = {("postgres", "shared"): 256, ("redis", "shared"): 32}


class AddonState(str, enum.Enum):
    PROVISIONING = "provisioning"
    READY = "ready"
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


class Op(str, enum.Enum):
    """The work a job worker has to finish for the addon."""

    PROVISION = "provision"
    ROTATE = "rotate"
    DESTROY = "destroy"


# the report a job worker makes when an ha addon moved (not an op: nothing is queued)
MOVED = "moved"

TRANSITIONS: dict[AddonState, frozenset[AddonState]] = {
    AddonState.PROVISIONING: frozenset({AddonState.READY, AddonState.FAILED,
                                        AddonState.DESTROYING}),
    AddonState.READY: frozenset({AddonState.DESTROYING}),
    AddonState.FAILED: frozenset({AddonState.DESTROYING, AddonState.PROVISIONING}),
    AddonState.DESTROYING: frozenset({AddonState.DESTROYED, AddonState.FAILED}),
    AddonState.DESTROYED: frozenset(),
}

# the op a state waits for: a report for another op is stale (an older task's)
OP_OF_STATE = {AddonState.PROVISIONING: Op.PROVISION, AddonState.DESTROYING: Op.DESTROY}


class AddonTransitionError(Conflict):
    code = "addon_state"


@dataclass(frozen=True)
class Attachment:
    """One name the addon is known by in its app's environment."""

    name: str                       # DATABASE -> DATABASE_URL; STORAGE -> STORAGE_URL
    style: str = "url"              # or "split": NAME_HOST, NAME_PORT, ...

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "style": self.style}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Attachment:
        return cls(str(raw["name"]), str(raw.get("style") or "url"))


@dataclass
class Addon:
    id: str
    app: str
    engine: str
    plan: str
    state: AddonState
    op: Op | None = None
    step: str = ""                              # the last thing a worker said it did
    credentials: dict[str, Any] | None = None   # {url, env, host, port, extra}
    attachments: list[Attachment] = field(default_factory=list)
    quota_mb: int | None = None
    quota_state: str | None = None
    usage_mb: float | None = None
    final_dump: str | None = None
    error: dict[str, Any] | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    attempts: int = 0                           # tasks sent for the op in flight
    # the servers runners supervise for it (ServiceSpec wire dicts), as reported
    services: list[dict[str, Any]] = field(default_factory=list)

    # -- the state machine ------------------------------------------------------
    def _to(self, new: AddonState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise AddonTransitionError(
                f"addon {self.id} is {self.state.value}; it cannot become {new.value}",
                f"see `berth addons info {self.id}`")
        self.state = new

    def destroy(self) -> None:
        """Ask for the addon to go: its env leaves the app at once (a new release);
        a worker drops the database after a final dump. Asking again is fine."""
        if self.state is AddonState.DESTROYING:
            return
        if self.state is AddonState.DESTROYED:
            raise AddonTransitionError(f"addon {self.id} is already destroyed",
                                       "`berth addons` lists the live ones")
        self._to(AddonState.DESTROYING)
        self._begin(Op.DESTROY, "waiting for a job worker to destroy it")

    def rotate(self) -> None:
        if self.state is not AddonState.READY:
            raise AddonTransitionError(
                f"addon {self.id} is {self.state.value}: only a ready addon gets new "
                "credentials", f"see `berth addons info {self.id}`")
        if self.op is not Op.ROTATE:
            self._begin(Op.ROTATE, "waiting for a job worker to rotate its credentials")

    def retry(self) -> None:
        """A FAILED provisioning goes again (`berth addons create` of the same one)."""
        self._to(AddonState.PROVISIONING)
        self._begin(Op.PROVISION, "waiting for a job worker to provision it")

    def _begin(self, op: Op, step: str) -> None:
        self.op, self.step, self.error, self.attempts = op, step, None, 0

    def report(self, op: str, outcome: str, *, step: str = "",
               credentials: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None,
               final_dump: str | None = None,
               services: list[dict[str, Any]] | None = None) -> bool:
        """Apply a worker's report about `op`: "step" (progress), "done" or "failed".
        Returns whether the app's environment changed (a new release is due). A
        report about an op no longer in flight is a Conflict: that worker's task is
        stale (the addon was destroyed meanwhile, or another attempt finished)."""
        if outcome not in ("step", "done", "failed"):
            raise Invalid(f"unknown outcome {outcome!r}", "report step, done or failed")
        if op == MOVED:
            return self.moved(credentials, step, services) if outcome == "done" else False
        if self.op is None or op != self.op.value:
            raise Conflict(f"addon {self.id} has no {op} in flight "
                           f"({self.state.value}, op {self.op.value if self.op else 'none'})",
                           "a newer request replaced this task; it has nothing to do",
                           code="stale_task")
        if step:
            self.step = step[:500]
        if outcome == "step":
            return False
        current = self.op
        self.op = None
        if outcome == "failed":
            self.error = error or {"message": "the job failed", "hint": ""}
            if current is not Op.ROTATE:          # a failed rotation keeps the old ones
                self._to(AddonState.FAILED)
            return False
        if current is Op.PROVISION:
            self.services = self.check_services(services)
            self.credentials = check_credentials(credentials)
            self.error = None
            self._to(AddonState.READY)
            return True
        if current is Op.ROTATE:
            self.credentials = check_credentials(credentials)
            self.error = None
            return True
        self.credentials = None
        self.services = []
        self.final_dump = final_dump
        self.error = None
        self._to(AddonState.DESTROYED)
        return False

    def moved(self, credentials: dict[str, Any] | None, step: str = "",
              services: list[dict[str, Any]] | None = None) -> bool:
        """An ha addon's nodes changed places outside any op (a failover, a standby
        rebuilt): its credentials now name the new primary (REDIS_URL) or standby
        (DATABASE_READ_URL). True when the app's environment changed (a release)."""
        if self.state is not AddonState.READY:
            raise Conflict(f"addon {self.id} is {self.state.value}, not ready",
                           "a moved addon is reported only while it is ready",
                           code="stale_task")
        before = self.env()
        self.credentials = check_credentials(credentials)
        if services is not None:
            self.services = self.check_services(services)
        if step:
            self.step = step[:500]
        return self.env() != before

    def check_services(self, raw: Any) -> list[dict[str, Any]]:
        """A worker's list of servers to supervise, each a valid ServiceSpec of this
        addon (the app filled in here: the worker does not know it)."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise Invalid("services must be a list of service specs")
        out = []
        for item in raw:
            try:
                spec = ServiceSpec.from_wire({**item, "app": self.app} if isinstance(
                    item, dict) else item)
            except ProtocolError as exc:
                raise Invalid(f"a reported service is malformed: {exc}",
                              "the job worker and the controller disagree on the shape"
                              ) from exc
            if spec.addon != self.id:
                raise Invalid(f"service {spec.id} belongs to addon {spec.addon}, not {self.id}")
            out.append(spec.to_wire())
        return out

    def wanted_services(self) -> list[ServiceSpec]:
        """What runners should supervise for it now: its servers while it is ready or
        being rotated; none once it is being destroyed (the worker then stops them)."""
        if self.state is not AddonState.READY:
            return []
        return [ServiceSpec.from_wire(s) for s in self.services]

    # -- what the app sees ------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.state is not AddonState.DESTROYED

    def env(self) -> dict[str, str]:
        """The config vars this addon gives its app: none unless READY."""
        if self.state is not AddonState.READY or not self.credentials:
            return {}
        out: dict[str, str] = {}
        for att in self.attachments:
            out.update(attachment_env(self.engine, self.credentials, att))
        return out

    def public(self) -> dict[str, Any]:
        """What the API shows: no password anywhere (the app gets it as config)."""
        creds = self.credentials or {}
        return {"id": self.id, "app": self.app, "engine": self.engine, "plan": self.plan,
                "state": self.state.value, "op": self.op.value if self.op else None,
                "step": self.step, "attachments": [a.to_dict() for a in self.attachments],
                "env_keys": sorted(self.env()),
                "url": masked(creds.get("url", "")) if creds else None,
                "host": creds.get("host"), "port": creds.get("port"),
                "quota_mb": self.quota_mb, "quota_state": self.quota_state,
                "usage_mb": self.usage_mb, "final_dump": self.final_dump,
                "error": self.error, "created_at": self.created_at,
                "updated_at": self.updated_at, "attempts": self.attempts}

    def for_worker(self) -> dict[str, Any]:
        """What a job worker needs to do the op in flight (no credentials)."""
        return {"id": self.id, "app": self.app, "engine": self.engine, "plan": self.plan,
                "state": self.state.value, "op": self.op.value if self.op else None,
                "quota_mb": self.quota_mb}


def quota_line(addon: Addon) -> str:
    """The app's log line for a quota state it just entered."""
    used = f"{addon.usage_mb:.1f} MB of {addon.quota_mb} MB" if addon.usage_mb is not None \
        else f"quota {addon.quota_mb} MB"
    return {
        "warn": f"addon {addon.id}: storage almost full ({used}); writes will be refused "
                "over the quota",
        "blocked": f"addon {addon.id}: over its storage quota ({used}): writes are "
                   "refused until data is deleted (reads and deletes still work)",
        "restored": f"addon {addon.id}: back under its storage quota ({used}): writes "
                    "work again",
    }.get(addon.quota_state or "", f"addon {addon.id}: quota {addon.quota_state} ({used})")


def new_id(engine: str) -> str:
    return f"{engine}-{secrets.token_hex(3)}"


def check_new(engine: str, plan: str) -> None:
    if engine not in ENGINES:
        raise Invalid(f"unknown addon engine {engine!r}",
                      f"use one of: {', '.join(ENGINES)}")
    if plan not in PLANS:
        raise Invalid(f"unknown plan {plan!r}", f"use one of: {', '.join(PLANS)}")


def check_alias(name: str, reserved: set[str]) -> str:
    name = name.upper().removesuffix("_URL")
    if not ALIAS.match(name) or name.startswith("BERTH_") or name in reserved:
        raise Invalid(f"{name!r} cannot name an attachment",
                      "use capitals, digits and _, starting with a letter, e.g. "
                      "`--as STORAGE` (gives STORAGE_URL) or `--as DB --split`")
    return name


def check_credentials(raw: dict[str, Any] | None) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str) or not raw["url"]:
        raise Invalid("a finished job must report credentials with a url",
                      "the job worker and controller may be of different versions")
    env = raw.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise Invalid("credentials env must map names to strings")
    port = raw.get("port")
    return {"url": raw["url"], "env": {str(k): v for k, v in env.items()},
            "host": str(raw.get("host") or ""),
            "port": int(port) if isinstance(port, int) else None,
            "extra": {str(k): str(v) for k, v in (raw.get("extra") or {}).items()}}


def attachment_env(engine: str, credentials: dict[str, Any], att: Attachment
                   ) -> dict[str, str]:
    """The variables one attachment sets. The provisioner's own env names carry the
    engine's prefix (DATABASE_URL, DATABASE_READ_URL; REDIS_URL, REDIS_SENTINEL_URL):
    an attachment under another name gets them with its own prefix."""
    prefix = PREFIX[engine]
    url = str(credentials["url"])
    if att.style == "split":
        return split_url(att.name, url)
    env: dict[str, str] = dict(credentials.get("env") or {}) or {f"{prefix}_URL": url}
    env.setdefault(f"{prefix}_URL", url)
    if att.name == prefix:
        return env
    return {att.name + key[len(prefix):]: value for key, value in env.items()
            if key.startswith(prefix + "_")}


def split_url(name: str, url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return {f"{name}_HOST": parts.hostname or "", f"{name}_PORT": str(parts.port or ""),
            f"{name}_NAME": unquote(parts.path.lstrip("/")),
            f"{name}_USER": unquote(parts.username or ""),
            f"{name}_PASSWORD": unquote(parts.password or "")}


def masked(url: str) -> str:
    """The URL with its password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


# -- rows <-> objects (the store's side) -----------------------------------------
COLUMNS = ("id, app, engine, plan, state, op, step, credentials, attachments, quota_mb, "
           "quota_state, usage_mb, final_dump, error, created_at, updated_at, attempts, "
           "services")


def from_row(row: tuple[Any, ...]) -> Addon:
    return Addon(
        id=row[0], app=row[1], engine=row[2], plan=row[3], state=AddonState(row[4]),
        op=Op(row[5]) if row[5] else None, step=row[6] or "",
        credentials=json.loads(row[7]) if row[7] else None,
        attachments=[Attachment.from_dict(a) for a in json.loads(row[8] or "[]")],
        quota_mb=row[9], quota_state=row[10], usage_mb=row[11], final_dump=row[12],
        error=json.loads(row[13]) if row[13] else None, created_at=row[14],
        updated_at=row[15], attempts=row[16] or 0,
        services=json.loads(row[17]) if row[17] else [])


def to_row(a: Addon) -> tuple[Any, ...]:
    return (a.id, a.app, a.engine, a.plan, a.state.value, a.op.value if a.op else None,
            a.step, json.dumps(a.credentials) if a.credentials else None,
            json.dumps([x.to_dict() for x in a.attachments]), a.quota_mb, a.quota_state,
            a.usage_mb, a.final_dump, json.dumps(a.error) if a.error else None,
            a.created_at, a.updated_at, a.attempts,
            json.dumps(a.services) if a.services else None)
