"""The controller's state store: desired state, durable across restarts.

SQLite by default. The SQL is kept portable (no SQLite-only syntax beyond the
`?` paramstyle, which a PostgreSQL backend translates) because a standby controller
will run the same schema on PostgreSQL. The schema is created and migrated here:
MIGRATIONS is append-only, each entry one schema version.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import addons as addon_rules
from controller.addons import Addon, AddonState, Attachment
from controller.errors import Conflict, Invalid, NotFound, app_not_found
from messaging.manifest import Manifest
from messaging.shapes import ROLES, ServiceSpec

MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE apps (name VARCHAR(64) PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE releases (app VARCHAR(64) NOT NULL, version INTEGER NOT NULL, "
        "slug VARCHAR(64), procfile TEXT NOT NULL, config TEXT NOT NULL, "
        "description TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "PRIMARY KEY (app, version))",
        "CREATE TABLE formation (app VARCHAR(64) NOT NULL, proc VARCHAR(64) NOT NULL, "
        "count INTEGER NOT NULL, PRIMARY KEY (app, proc))",
        "CREATE TABLE builds (id VARCHAR(32) PRIMARY KEY, app VARCHAR(64) NOT NULL, "
        "slug VARCHAR(64) NOT NULL, procfile TEXT NOT NULL, status VARCHAR(16) NOT NULL, "
        "release_version INTEGER, error TEXT, created_at DOUBLE PRECISION NOT NULL, "
        "finished_at DOUBLE PRECISION)",
        "CREATE TABLE domains (hostname VARCHAR(255) PRIMARY KEY, app VARCHAR(64) NOT NULL)",
        "CREATE TABLE tokens (hash VARCHAR(64) PRIMARY KEY, name VARCHAR(64) NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL)",
    ],
    [
        "ALTER TABLE apps ADD COLUMN maintenance INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE apps ADD COLUMN max_body_mb INTEGER",
    ],
    [
        "ALTER TABLE apps ADD COLUMN memory_mb INTEGER",
        "ALTER TABLE apps ADD COLUMN pids_max INTEGER",
    ],
    [
        # the app manifest (berth.yaml) of a build, carried by its releases; what the
        # build found (framework, settings module, static files)
        "ALTER TABLE builds ADD COLUMN manifest TEXT",
        "ALTER TABLE builds ADD COLUMN detected TEXT",
        "ALTER TABLE releases ADD COLUMN manifest TEXT",
    ],
    [
        # addons (controller/addons.py): a tenant's databases, their state, the op a
        # job worker is doing, credentials and the names they are attached under;
        # and which config keys of a release came from addons
        "CREATE TABLE addons (id VARCHAR(64) PRIMARY KEY, app VARCHAR(64) NOT NULL, "
        "engine VARCHAR(16) NOT NULL, plan VARCHAR(16) NOT NULL, "
        "state VARCHAR(16) NOT NULL, op VARCHAR(16), step TEXT, credentials TEXT, "
        "attachments TEXT NOT NULL, quota_mb INTEGER, quota_state VARCHAR(16), "
        "usage_mb DOUBLE PRECISION, final_dump TEXT, error TEXT, "
        "created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, "
        "attempts INTEGER NOT NULL DEFAULT 0)",
        "CREATE INDEX addons_app ON addons (app)",
        "ALTER TABLE releases ADD COLUMN addon_keys TEXT",
    ],
    [
        # named leases (controller/locks.py): a row per held lease and one keeping the
        # highest fence granted, so none repeats. And tenancy: the team a token acts for and
        # the team an app belongs to (NULL: the platform's admins)
        "CREATE TABLE leases (name VARCHAR(200) PRIMARY KEY, owner VARCHAR(200), "
        "fence INTEGER NOT NULL, ttl DOUBLE PRECISION NOT NULL, "
        "expires_at DOUBLE PRECISION NOT NULL)",
        "ALTER TABLE tokens ADD COLUMN team VARCHAR(64)",
        "ALTER TABLE apps ADD COLUMN team VARCHAR(64)",
    ],
    [
        # the servers of a dedicated/ha addon that runners supervise (JSON list of
        # messaging.shapes.ServiceSpec), as its job worker last reported them
        "ALTER TABLE addons ADD COLUMN services TEXT",
    ],
    [
        # per-app roles: other teams granted viewer, deployer or owner on one app (the
        # app's own team is its owner without a row)
        "CREATE TABLE app_access (app VARCHAR(64) NOT NULL, team VARCHAR(64) NOT NULL, "
        "role VARCHAR(16) NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "PRIMARY KEY (app, team))",
        "CREATE INDEX app_access_team ON app_access (team)",
    ],
]

APP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,28}[a-z0-9]$")
CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")
RESERVED_KEYS = {"PORT", "PATH", "HOME", "GUNICORN_CMD_ARGS", "BERTH_DATA_DIR"}
# BERTH_* config vars an app may set itself, with the values each takes
APP_SWITCHES = {"BERTH_SETTINGS_INJECTION": ("on", "off")}
PROCESS_LIMITS = {"memory_mb": (16, 65536), "pids_max": (8, 100000)}


@dataclass
class Release:
    app: str
    version: int
    slug: str | None
    procfile: dict[str, str]
    config: dict[str, str]
    description: str
    created_at: float
    manifest: Manifest = field(default_factory=Manifest)
    addon_keys: tuple[str, ...] = ()        # config keys that addons set

    def public(self) -> dict[str, Any]:
        return {"version": self.version, "slug": self.slug, "description": self.description,
                "created_at": self.created_at, "procfile": self.procfile,
                "config_keys": sorted(self.config), "manifest": self.manifest.to_wire(),
                "addon_keys": list(self.addon_keys)}


def check_app_name(name: str) -> None:
    if not APP_NAME.match(name or ""):
        raise Invalid(f"invalid app name {name!r}",
                      "use 2-30 lowercase letters, digits and dashes, starting with a "
                      "letter and not ending with a dash (it becomes a DNS label)")


TEAM_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
TOKEN_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_team(team: str) -> None:
    if not TEAM_NAME.match(team or ""):
        raise Invalid(f"invalid team name {team!r}",
                      "use 1-63 lowercase letters, digits and dashes, starting with a letter")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    def __init__(self, path: Path, url: str = "") -> None:
        """SQLite at `path`; or, with `url` (postgresql://...), PostgreSQL: the store a
        standby controller shares (controller/pgstore.py)."""
        self.path = path
        self._lock = threading.RLock()
        self._db: Any
        if url:
            from controller.pgstore import PgConnection
            self._db = PgConnection(url)
        else:
            self._db = sqlite3.connect(str(path), check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    # -- plumbing -----------------------------------------------------------
    def _q(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _tx(self) -> _Tx:
        return _Tx(self)

    def migrate(self) -> None:
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = self._db.execute("SELECT version FROM schema_version").fetchall()
            current = rows[0][0] if rows else 0
            if not rows:
                self._db.execute("INSERT INTO schema_version (version) VALUES (0)")
            for number, statements in enumerate(MIGRATIONS, start=1):
                if number <= current:
                    continue
                with self._tx():
                    for stmt in statements:
                        self._db.execute(stmt)
                    self._db.execute("UPDATE schema_version SET version = ?", (number,))

    def schema_version(self) -> int:
        return int(self._q("SELECT version FROM schema_version")[0][0])

    # -- tokens -------------------------------------------------------------
    def add_token(self, name: str, team: str | None = None) -> str:
        """A new token (only its hash is kept); `team` None makes an admin token."""
        token = uuid.uuid4().hex + uuid.uuid4().hex
        self._q("INSERT INTO tokens (hash, name, created_at, team) VALUES (?, ?, ?, ?)",
                hash_token(token), name, time.time(), team)
        return token

    def create_token(self, name: str, team: str | None) -> str:
        """A named token for `team` (None: admin); names are unique."""
        if not TOKEN_NAME.match(name or ""):
            raise Invalid(f"invalid token name {name!r}",
                          "use 1-64 letters, digits, dots, dashes and underscores")
        if team is not None:
            check_team(team)
        with self._tx():
            if self._q("SELECT 1 FROM tokens WHERE name = ?", name):
                raise Conflict(f"a token named {name!r} exists already",
                               "pick another name, or revoke it first with `berth tokens "
                               f"revoke {name}`")
            return self.add_token(name, team)

    def token_identity(self, token: str) -> tuple[str, str | None] | None:
        """(name, team or None for an admin token) of a valid token."""
        rows = self._q("SELECT name, team FROM tokens WHERE hash = ?", hash_token(token))
        return (str(rows[0][0]), rows[0][1]) if rows else None

    def token_name(self, token: str) -> str | None:
        found = self.token_identity(token)
        return found[0] if found else None

    def tokens(self) -> list[dict[str, Any]]:
        return [{"name": r[0], "team": r[1], "created_at": r[2]} for r in self._q(
            "SELECT name, team, created_at FROM tokens ORDER BY created_at")]

    def revoke_token(self, name: str) -> None:
        with self._tx():
            if not self._q("SELECT 1 FROM tokens WHERE name = ?", name):
                raise NotFound(f"no token named {name!r}", "`berth tokens` lists them")
            self._q("DELETE FROM tokens WHERE name = ?", name)

    def has_tokens(self) -> bool:
        return bool(self._q("SELECT 1 FROM tokens"))

    # -- leases (controller/locks.py keeps them in memory and writes through) ----
    def leases(self) -> list[tuple[str, str | None, int, float, float]]:
        """(name, owner or None, fence, ttl, expires_at) of every lease held, and the
        fence counter's row."""
        return [(str(r[0]), r[1], int(r[2]), float(r[3]), float(r[4])) for r in self._q(
            "SELECT name, owner, fence, ttl, expires_at FROM leases")]

    def _put_lease(self, name: str, owner: str | None, fence: int, ttl: float,
                   expires_at: float) -> None:
        if self._q("SELECT 1 FROM leases WHERE name = ?", name):
            self._q("UPDATE leases SET owner = ?, fence = ?, ttl = ?, expires_at = ? "
                    "WHERE name = ?", owner, fence, ttl, expires_at, name)
        else:
            self._q("INSERT INTO leases (name, owner, fence, ttl, expires_at) "
                    "VALUES (?, ?, ?, ?, ?)", name, owner, fence, ttl, expires_at)

    def grant_lease(self, name: str, owner: str, fence: int, ttl: float, expires_at: float,
                    counter: str) -> None:
        """A granted lease and, in row `counter`, the highest fence, at once."""
        with self._tx():
            self._put_lease(name, owner, fence, ttl, expires_at)
            self._put_lease(counter, None, fence, 0.0, 0.0)

    def drop_lease(self, name: str) -> None:
        self._q("DELETE FROM leases WHERE name = ?", name)

    # -- apps ---------------------------------------------------------------
    def create_app(self, name: str, team: str | None = None) -> dict[str, Any]:
        """A new app, owned by `team` (None: only admin tokens reach it)."""
        check_app_name(name)
        if team is not None:
            check_team(team)
        with self._tx():
            if self._q("SELECT 1 FROM apps WHERE name = ?", name):
                raise Conflict(f"app '{name}' already exists",
                               "pick another name, or push to it with `berth push -a "
                               f"{name}`")
            now = time.time()
            self._q("INSERT INTO apps (name, created_at, team) VALUES (?, ?, ?)", name, now,
                    team)
            self._q("INSERT INTO formation (app, proc, count) VALUES (?, 'web', 1)", name)
        return {"name": name, "created_at": now, "team": team}

    def require_app(self, name: str) -> None:
        if not self._q("SELECT 1 FROM apps WHERE name = ?", name):
            raise app_not_found(name)

    def list_apps(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM apps ORDER BY name")]

    def app_team(self, name: str) -> str | None:
        """The team owning the app (None: the admins')."""
        rows = self._q("SELECT team FROM apps WHERE name = ?", name)
        if not rows:
            raise app_not_found(name)
        return rows[0][0]

    def apps_of_team(self, team: str) -> set[str]:
        return {r[0] for r in self._q("SELECT name FROM apps WHERE team = ?", team)}

    # -- access: the app's team owns it; grants give other teams a role on it ----
    def app_role(self, app: str, team: str) -> str | None:
        """`team`'s role on `app` (None: none); 404 for a missing app."""
        if self.app_team(app) == team:
            return "owner"
        rows = self._q("SELECT role FROM app_access WHERE app = ? AND team = ?", app, team)
        return str(rows[0][0]) if rows else None

    def team_roles(self, team: str) -> dict[str, str]:
        """Every app `team` has a role on, with the role."""
        roles = {str(r[0]): str(r[1]) for r in self._q(
            "SELECT app, role FROM app_access WHERE team = ?", team)}
        return {**roles, **dict.fromkeys(self.apps_of_team(team), "owner")}

    def access(self, app: str) -> dict[str, Any]:
        """The owner team (None: the admins) and the grants on `app`."""
        owner = self.app_team(app)
        return {"app": app, "owner": owner, "grants": [
            {"team": r[0], "role": r[1], "created_at": r[2]} for r in self._q(
                "SELECT team, role, created_at FROM app_access WHERE app = ? "
                "ORDER BY team", app)]}

    def grant_access(self, app: str, team: str, role: str) -> str | None:
        """Give `team` `role` on `app` (replacing its grant); the role it had before."""
        if role not in ROLES:
            raise Invalid(f"unknown role {role!r}", "give one of " + ", ".join(ROLES))
        check_team(team)
        with self._tx():
            owner = self.app_team(app)
            if owner == team:
                raise Invalid(f"team {team} owns app '{app}' already",
                              "grants are for other teams; the owner team keeps every right")
            before = self.app_role(app, team)
            if before is None:
                self._q("INSERT INTO app_access (app, team, role, created_at) "
                        "VALUES (?, ?, ?, ?)", app, team, role, time.time())
            else:
                self._q("UPDATE app_access SET role = ? WHERE app = ? AND team = ?",
                        role, app, team)
        return before

    def revoke_access(self, app: str, team: str) -> str:
        """Take `team`'s grant on `app` away; the role it had."""
        with self._tx():
            self.require_app(app)
            rows = self._q("SELECT role FROM app_access WHERE app = ? AND team = ?", app,
                           team)
            if not rows:
                raise NotFound(f"team {team} has no grant on app '{app}'",
                               f"`berth access -a {app}` lists the teams that have one")
            self._q("DELETE FROM app_access WHERE app = ? AND team = ?", app, team)
        return str(rows[0][0])

    def destroy_app(self, name: str) -> None:
        self.require_app(name)
        with self._tx():
            for table in ("releases", "formation", "builds", "domains", "app_access"):
                self._q(f"DELETE FROM {table} WHERE app = ?", name)
            self._q("DELETE FROM apps WHERE name = ?", name)

    # -- releases -----------------------------------------------------------
    def _release(self, row: tuple[Any, ...]) -> Release:
        return Release(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]),
                       row[5], row[6], Manifest.from_wire(json.loads(row[7] or "null")),
                       tuple(json.loads(row[8] or "[]")))

    _RCOLS = ("app, version, slug, procfile, config, description, created_at, manifest, "
              "addon_keys")

    def releases(self, app: str) -> list[Release]:
        self.require_app(app)
        return [self._release(r) for r in self._q(
            f"SELECT {self._RCOLS} FROM releases WHERE app = ? ORDER BY version DESC", app)]

    def current_release(self, app: str) -> Release | None:
        rows = self._q(f"SELECT {self._RCOLS} FROM releases WHERE app = ? "
                       "ORDER BY version DESC LIMIT 1", app)
        return self._release(rows[0]) if rows else None

    def release(self, app: str, version: int) -> Release:
        rows = self._q(f"SELECT {self._RCOLS} FROM releases WHERE app = ? AND version = ?",
                       app, version)
        if not rows:
            raise NotFound(f"app '{app}' has no release v{version}",
                           f"run `berth releases -a {app}` to see its releases")
        return self._release(rows[0])

    def add_release(self, app: str, *, slug: str | None, procfile: dict[str, str],
                    config: dict[str, str], description: str,
                    manifest: Manifest | None = None, strip: tuple[str, ...] = ()
                    ) -> Release:
        """A new release. Its config is `config` less what addons set before (the
        current release's addon keys, and `strip`: a rolled-back release's) plus
        what the app's addons set now: credentials always come from the store."""
        manifest = manifest or Manifest()
        with self._tx():
            self.require_app(app)
            cur = self.current_release(app)
            addon_env = self.addon_env(app)
            drop = set(cur.addon_keys if cur else ()) | set(strip)
            config = {k: v for k, v in config.items() if k not in drop} | addon_env
            keys = tuple(sorted(addon_env))
            rows = self._q("SELECT MAX(version) FROM releases WHERE app = ?", app)
            version = (rows[0][0] or 0) + 1
            now = time.time()
            self._q(f"INSERT INTO releases ({self._RCOLS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    app, version, slug, json.dumps(procfile), json.dumps(config),
                    description, now, json.dumps(manifest.to_wire()), json.dumps(keys))
        return Release(app, version, slug, procfile, config, description, now, manifest, keys)

    def _redeploy(self, app: str, description: str) -> Release | None:
        """A new release of the current code and config (what instances are told at
        start changed, e.g. the app's host names); None before the first deploy."""
        cur = self.current_release(app)
        if cur is None or not cur.slug:
            return None
        return self.add_release(app, slug=cur.slug, procfile=cur.procfile, config=cur.config,
                                description=description, manifest=cur.manifest)

    def change_config(self, app: str, changes: dict[str, str | None]) -> Release:
        for key, value in changes.items():
            if not CONFIG_KEY.match(key):
                raise Invalid(f"invalid config key {key!r}",
                              "use letters, digits and underscores, not starting with a digit")
            if key in APP_SWITCHES:
                if value is not None and str(value).lower() not in APP_SWITCHES[key]:
                    raise Invalid(f"{key} must be {' or '.join(APP_SWITCHES[key])}, "
                                  f"got {value!r}", f"`berth config set {key}=off`")
            elif key in RESERVED_KEYS or key.startswith("BERTH_"):
                raise Invalid(f"config key {key!r} is set by the platform",
                              "choose another name")
            if value is not None and not isinstance(value, str):
                raise Invalid(f"config value for {key} must be a string",
                              "quote numbers and booleans: `berth config set KEY=value`")
        with self._tx():
            cur = self.current_release(app)
            self.require_app(app)
            config = dict(cur.config) if cur else {}
            owned = sorted(set(changes) & set(cur.addon_keys if cur else ()))
            if owned:
                raise Invalid(f"{owned[0]} is set by an addon of '{app}'",
                              f"`berth addons -a {app}` lists them; `berth addons attach "
                              "NAME --as ALIAS` adds other names, `berth addons credentials "
                              "rotate NAME` changes the password")
            unknown = [k for k, v in changes.items() if v is None and k not in config]
            if unknown:
                raise NotFound(f"config var {unknown[0]} is not set on '{app}'",
                               f"run `berth config get -a {app}` to see what is set")
            for key, value in changes.items():
                if value is None:
                    config.pop(key, None)
                else:
                    config[key] = value
            set_keys = [k for k, v in changes.items() if v is not None]
            unset = [k for k, v in changes.items() if v is None]
            desc = "; ".join(filter(None, [
                f"Set {', '.join(set_keys)}" if set_keys else "",
                f"Unset {', '.join(unset)}" if unset else ""]))
            return self.add_release(app, slug=cur.slug if cur else None,
                                    procfile=cur.procfile if cur else {},
                                    config=config, description=desc,
                                    manifest=cur.manifest if cur else None)

    def rollback(self, app: str, version: int | None) -> Release:
        with self._tx():
            cur = self.current_release(app)
            self.require_app(app)
            if cur is None:
                raise Conflict(f"app '{app}' has no releases to roll back",
                               "deploy it first with `berth push`")
            if version is None:
                older = [r for r in self.releases(app) if r.version < cur.version and r.slug]
                if not older:
                    raise Conflict(f"app '{app}' has no earlier deployed release",
                                   f"run `berth releases -a {app}` to see its history")
                target = older[0]
            else:
                target = self.release(app, version)
                if not target.slug:
                    raise Conflict(f"release v{version} of '{app}' has no code",
                                   "roll back to a release that was deployed with a push")
            # the addons' variables are today's, not the old release's
            return self.add_release(app, slug=target.slug, procfile=target.procfile,
                                    config=target.config,
                                    description=f"Rollback to v{target.version}",
                                    manifest=target.manifest, strip=target.addon_keys)

    # -- formation ----------------------------------------------------------
    def formation(self, app: str) -> dict[str, int]:
        return {r[0]: r[1] for r in self._q(
            "SELECT proc, count FROM formation WHERE app = ?", app)}

    def scale(self, app: str, counts: dict[str, int],
              maximum: int = 100) -> dict[str, int]:
        self.require_app(app)
        cur = self.current_release(app)
        for proc, count in counts.items():
            if proc == "release":
                raise Invalid("`release` is not a process type: it runs once per release, "
                              "before the release goes live",
                              "scale the types that serve or work, e.g. `berth scale web=2`")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise Invalid(f"cannot scale {proc} to {count!r}",
                              f"give a count from 0 to {maximum}")
            if count > maximum:
                raise Invalid(f"cannot scale {proc} to {count}: the most this app may run "
                              f"is {maximum} per process type",
                              f"give a count from 0 to {maximum}, or ask the operator to "
                              "raise max_per_process_type")
            own = cur.manifest.max_processes.get(proc) if cur else None
            if own is not None and count > own:
                raise Invalid(f"cannot scale {proc} to {count}: the app's berth.yaml allows "
                              f"at most {own}",
                              f"give a count from 0 to {own}, or raise max_processes.{proc} "
                              "in berth.yaml and push")
            if cur and cur.slug and proc not in cur.procfile:
                raise Invalid(f"process type {proc!r} is not in the Procfile of "
                              f"release v{cur.version}",
                              f"known types: {', '.join(sorted(cur.procfile))}")
        with self._tx():
            for proc, count in counts.items():
                self._q("DELETE FROM formation WHERE app = ? AND proc = ?", app, proc)
                self._q("INSERT INTO formation (app, proc, count) VALUES (?, ?, ?)",
                        app, proc, count)
        return self.formation(app)

    # -- builds -------------------------------------------------------------
    def add_build(self, app: str, slug: str, procfile: dict[str, str],
                  manifest: Manifest | None = None) -> str:
        self.require_app(app)
        build_id = uuid.uuid4().hex[:12]
        self._q("INSERT INTO builds (id, app, slug, procfile, status, created_at, manifest) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?)", build_id, app, slug,
                json.dumps(procfile), time.time(), json.dumps((manifest or Manifest()).to_wire()))
        return build_id

    def build(self, build_id: str) -> dict[str, Any]:
        """A build as the API shows it; `manifest` is its app manifest (wire form) and
        `detected` what the runner found (framework, settings module, static files)."""
        rows = self._q("SELECT id, app, slug, procfile, status, release_version, error, "
                       "created_at, finished_at, manifest, detected FROM builds WHERE id = ?",
                       build_id)
        if not rows:
            raise NotFound(f"build {build_id!r} not found", "push again with `berth push`")
        r = rows[0]
        return {"id": r[0], "app": r[1], "slug": r[2], "procfile": json.loads(r[3]),
                "status": r[4], "release": r[5], "error": json.loads(r[6]) if r[6] else None,
                "created_at": r[7], "finished_at": r[8],
                "manifest": Manifest.from_wire(json.loads(r[9] or "null")).to_wire(),
                "detected": json.loads(r[10]) if r[10] else None}

    def build_manifest(self, build_id: str) -> Manifest:
        return Manifest.from_wire(self.build(build_id)["manifest"])

    def finish_build(self, build_id: str, status: str, release: int | None = None,
                     error: dict[str, Any] | None = None,
                     detected: dict[str, Any] | None = None) -> None:
        self._q("UPDATE builds SET status = ?, release_version = ?, error = ?, "
                "finished_at = ?, detected = ? WHERE id = ?", status, release,
                json.dumps(error) if error else None, time.time(),
                json.dumps(detected) if detected else None, build_id)

    def unfinished_builds(self) -> list[str]:
        return [r[0] for r in self._q("SELECT id FROM builds WHERE status = 'pending'")]

    # -- per-app limits and maintenance --------------------------------------
    def limits(self, app: str) -> dict[str, Any]:
        rows = self._q("SELECT maintenance, max_body_mb, memory_mb, pids_max FROM apps "
                       "WHERE name = ?", app)
        if not rows:
            raise app_not_found(app)
        return {"maintenance": bool(rows[0][0]), "max_body_mb": rows[0][1],
                "memory_mb": rows[0][2], "pids_max": rows[0][3]}

    def set_process_limit(self, app: str, name: str, value: int | None) -> None:
        """memory_mb or pids_max for every instance of the app; None = the runner's."""
        low, high = PROCESS_LIMITS[name]
        self.require_app(app)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not low <= value <= high):
            raise Invalid(f"{name} must be {low} to {high}, got {value!r}",
                          f"use `berth limits --{name.replace('_', '-')} N`, or --default")
        self._q(f"UPDATE apps SET {name} = ? WHERE name = ?", value, app)

    def slugs_of(self, app: str) -> set[str]:
        return {r[0] for r in self._q("SELECT slug FROM releases WHERE app = ? AND slug IS "
                                      "NOT NULL UNION SELECT slug FROM builds WHERE app = ?",
                                      app, app)}

    def slugs_in_use(self) -> set[str]:
        return {r[0] for r in self._q("SELECT slug FROM releases WHERE slug IS NOT NULL "
                                      "UNION SELECT slug FROM builds")}

    def set_maintenance(self, app: str, on: bool) -> None:
        self.require_app(app)
        self._q("UPDATE apps SET maintenance = ? WHERE name = ?", 1 if on else 0, app)

    def set_max_body(self, app: str, megabytes: int | None) -> None:
        self.require_app(app)
        if megabytes is not None and (not isinstance(megabytes, int) or
                                      isinstance(megabytes, bool) or
                                      not 1 <= megabytes <= 10240):
            raise Invalid(f"body limit must be 1 to 10240 MB, got {megabytes!r}",
                          "use `berth limits --max-body-mb 50`, or --default")
        self._q("UPDATE apps SET max_body_mb = ? WHERE name = ?", megabytes, app)

    # -- domains ------------------------------------------------------------
    def domains(self, app: str | None = None) -> dict[str, list[str]]:
        rows = (self._q("SELECT hostname, app FROM domains WHERE app = ? ORDER BY hostname", app)
                if app else self._q("SELECT hostname, app FROM domains ORDER BY hostname"))
        out: dict[str, list[str]] = {}
        for host, owner in rows:
            out.setdefault(owner, []).append(host)
        return out

    def add_domain(self, app: str, hostname: str, base_domain: str) -> None:
        self.require_app(app)
        hostname = hostname.lower().rstrip(".")
        if not HOSTNAME.match(hostname):
            raise Invalid(f"invalid hostname {hostname!r}", "give a name like www.example.com")
        if hostname.endswith("." + base_domain) or hostname == base_domain:
            raise Invalid(f"{hostname} is inside the platform's domain {base_domain}",
                          f"apps get <app>.{base_domain} by themselves")
        owner = self._q("SELECT app FROM domains WHERE hostname = ?", hostname)
        if owner:
            raise Conflict(f"{hostname} is already attached to an app",
                           "remove it there first with `berth domains remove`")
        with self._tx():
            self._q("INSERT INTO domains (hostname, app) VALUES (?, ?)", hostname, app)
            # instances are told their host names when they start (BERTH_HOSTNAMES:
            # Django's ALLOWED_HOSTS), so a new name rolls the app like a config change
            self._redeploy(app, f"Add domain {hostname}")

    def remove_domain(self, app: str, hostname: str) -> None:
        rows = self._q("SELECT 1 FROM domains WHERE hostname = ? AND app = ?", hostname, app)
        if not rows:
            raise NotFound(f"{hostname} is not attached to '{app}'",
                           f"run `berth domains -a {app}` to list its domains")
        with self._tx():
            self._q("DELETE FROM domains WHERE hostname = ?", hostname)
            self._redeploy(app, f"Remove domain {hostname}")

    # -- addons (controller/addons.py) -----------------------------------------
    def _addon_rows(self, where: str = "", *args: Any) -> list[Addon]:
        return [addon_rules.from_row(r) for r in self._q(
            f"SELECT {addon_rules.COLUMNS} FROM addons {where} ORDER BY created_at, id",
            *args)]

    def addon(self, addon_id: str) -> Addon:
        found = self._addon_rows("WHERE id = ?", addon_id)
        if not found:
            raise NotFound(f"addon {addon_id!r} not found",
                           "`berth addons` lists the addons of an app, `berth addons "
                           "--all` every one")
        return found[0]

    def addons(self, app: str | None = None, *, with_destroyed: bool = False
               ) -> list[Addon]:
        found = self._addon_rows("WHERE app = ?", app) if app else self._addon_rows()
        return [a for a in found if with_destroyed or a.live]

    def wanted_services(self) -> list[ServiceSpec]:
        """Every addon server runners should supervise now (controller/services.py)."""
        return [spec for addon in self.addons() for spec in addon.wanted_services()]

    def addons_in_flight(self) -> list[Addon]:
        """Addons with an op a job worker has not finished (controller/jobqueue.py)."""
        return self._addon_rows("WHERE op IS NOT NULL")

    def addon_env(self, app: str) -> dict[str, str]:
        """The config vars the app's READY addons set, through all their attachments."""
        env: dict[str, str] = {}
        for addon in self._addon_rows("WHERE app = ? AND state = ?", app,
                                      AddonState.READY.value):
            env.update(addon.env())
        return env

    def addon_ports(self) -> list[int]:
        """Every TCP port a READY addon's server listens on: runners let apps reach
        these on loopback (runner/firewall.py)."""
        return sorted({int(a.credentials["port"]) for a in self._addon_rows(
            "WHERE state = ?", AddonState.READY.value)
            if a.credentials and a.credentials.get("port")})

    def _save_addon(self, addon: Addon, *, new: bool = False) -> None:
        addon.updated_at = time.time()
        row = addon_rules.to_row(addon)
        if new:
            marks = ", ".join("?" for _ in row)
            self._q(f"INSERT INTO addons ({addon_rules.COLUMNS}) VALUES ({marks})", *row)
        else:
            sets = ", ".join(f"{c.strip()} = ?" for c in addon_rules.COLUMNS.split(",")[1:])
            self._q(f"UPDATE addons SET {sets} WHERE id = ?", *row[1:], row[0])

    def _attachment_names(self, app: str, but: str = "") -> set[str]:
        return {att.name for a in self.addons(app) if a.id != but for att in a.attachments}

    def create_addon(self, app: str, engine: str, plan: str, *,
                     quota_mb: int | None = None, name: str | None = None) -> Addon:
        """A new addon of `app`, PROVISIONING until a job worker reports it made;
        attached as DATABASE/REDIS (or `name`), or under its own id when the app
        already has an addon of that name."""
        addon_rules.check_new(engine, plan)
        if quota_mb is not None and (not isinstance(quota_mb, int) or
                                     isinstance(quota_mb, bool) or quota_mb < 1):
            raise Invalid(f"quota must be a whole number of MB, got {quota_mb!r}")
        with self._tx():
            self.require_app(app)
            taken = self._attachment_names(app)
            addon_id = addon_rules.new_id(engine)
            while self._q("SELECT 1 FROM addons WHERE id = ?", addon_id):
                addon_id = addon_rules.new_id(engine)
            if name:
                primary = addon_rules.check_alias(name, RESERVED_KEYS)
                if primary in taken:
                    raise Conflict(f"'{app}' already has an addon attached as {primary}",
                                   "pick another name with --as")
            else:
                primary = addon_rules.PREFIX[engine]
                if primary in taken:
                    primary = addon_id.upper().replace("-", "_")
            now = time.time()
            addon = Addon(addon_id, app, engine, plan, AddonState.PROVISIONING,
                          op=addon_rules.Op.PROVISION,
                          step="waiting for a job worker to provision it",
                          attachments=[Attachment(primary)], quota_mb=quota_mb,
                          created_at=now)
            self._save_addon(addon, new=True)
        return addon

    def change_addon(self, addon_id: str, change: Callable[[Addon], Any],
                     description: str = "") -> tuple[Addon, Release | None]:
        """Apply `change` to the addon in one transaction; when that changes what the
        app's environment gets from it, make a release (instances roll)."""
        with self._tx():
            addon = self.addon(addon_id)
            before = addon.env()
            change(addon)
            self._save_addon(addon)
            if addon.env() == before or not self._q(
                    "SELECT 1 FROM apps WHERE name = ?", addon.app):
                return addon, None
            cur = self.current_release(addon.app)
            release = self.add_release(
                addon.app, slug=cur.slug if cur else None,
                procfile=cur.procfile if cur else {}, config=cur.config if cur else {},
                description=description or f"Update {addon.id}",
                manifest=cur.manifest if cur else None)
        return addon, release

    def attach_addon(self, addon_id: str, name: str, style: str = "url"
                     ) -> tuple[Addon, Release | None]:
        if style not in addon_rules.STYLES:
            raise Invalid(f"unknown attachment style {style!r}",
                          f"use one of: {', '.join(addon_rules.STYLES)}")
        with self._tx():
            addon = self.addon(addon_id)
            alias = addon_rules.check_alias(name, RESERVED_KEYS)
            if alias in self._attachment_names(addon.app, but=addon.id) or any(
                    a.name == alias for a in addon.attachments):
                raise Conflict(f"'{addon.app}' already has an addon attached as {alias}",
                               f"`berth addons info {addon.id}` shows its names")
            if not addon.live:
                raise Conflict(f"addon {addon.id} is destroyed", "create a new one")

            def add(a: Addon) -> None:
                a.attachments.append(Attachment(alias, style))
            return self.change_addon(addon_id, add, f"Attach {addon.id} as {alias}")

    def detach_addon(self, addon_id: str, name: str) -> tuple[Addon, Release | None]:
        with self._tx():
            addon = self.addon(addon_id)
            alias = name.upper().removesuffix("_URL")
            if not any(a.name == alias for a in addon.attachments):
                raise NotFound(f"addon {addon.id} is not attached as {alias}",
                               f"`berth addons info {addon.id}` shows its names")

            def drop(a: Addon) -> None:
                a.attachments = [x for x in a.attachments if x.name != alias]
            return self.change_addon(addon_id, drop, f"Detach {addon.id} as {alias}")

    def set_addon_quota(self, addon_id: str, state: str, usage_mb: float | None) -> bool:
        """A quota check's result; returns whether the quota state changed."""
        if state not in addon_rules.QUOTA_STATES:
            raise Invalid(f"unknown quota state {state!r}",
                          f"use one of: {', '.join(addon_rules.QUOTA_STATES)}")
        with self._tx():
            addon = self.addon(addon_id)
            before = addon.quota_state
            addon.quota_state, addon.usage_mb = state, usage_mb
            self._save_addon(addon)
        return before != state

        # -- desired state for the reconciler -----------------------------------
    def desired(self) -> dict[str, dict[str, Any]]:
        """Every app with its current release, formation and domains, in one read. A
        formation above what the release's berth.yaml allows (max_processes) counts as
        that maximum."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            domains = self.domains()
            for name in self.list_apps():
                release = self.current_release(name)
                maxima = release.manifest.max_processes if release else {}
                formation = {p: min(n, maxima.get(p, n))
                             for p, n in self.formation(name).items()}
                out[name] = {"release": release, "formation": formation,
                             "domains": domains.get(name, []), **self.limits(name)}
            return out


class _Tx:
    """A transaction that nests (inner blocks join the outer one)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> _Tx:
        self.store._lock.acquire()
        self.outer = not self.store._db.in_transaction
        if self.outer:
            self.store._db.execute("BEGIN")
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            if self.outer:
                self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()

