"""The facade the controller and the Celery jobs call: provision, destroy, rotate,
measure and enforce quotas, for Postgres and Redis addons, shared or dedicated.

Every verb is idempotent and safe to retry (a job may die anywhere): a record with
the addon's name and password is written before the first server-side step, every
step checks before it acts, and each addon has its own lock (records.py). So calling
`provision` again after a crash finishes the half-made addon and returns the same
credentials; `destroy` of an addon that is gone, or half-made, cleans up what is left.

Servers: the shared PostgreSQL cluster and the shared redis-server live under
`data_dir/postgres/shared` and `data_dir/redis/shared`, a dedicated server (Redis, or
a PostgreSQL cluster with its PgBouncer) under `data_dir/dedicated/<engine>-<hash>`.
Ports are chosen once (port 0 = a free one) and kept in `data_dir/servers.json` and in
each addon's record, so credentials stay valid across restarts. Servers daemonize and
outlive the Provisioner; `stop_all` stops the ones under its data_dir, by PID.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from messaging.shapes import ServiceSpec

from .errors import AddonNotFound, InvalidAddon, ServerUnavailable
from .names import addon_name
from .pgcluster import PgCluster
from .pgdedicated import PgDedicated
from .pgha import PgHa
from .pgshared import PgShared
from .ports import free_port, listening
from .records import AddonRecord, Records
from .redisdedicated import RedisDedicated
from .redisha import RedisHa
from .redisserver import RedisServer
from .redisshared import RedisShared

log = logging.getLogger(__name__)

Engine = Literal["postgres", "redis"]
Plan = Literal["shared", "dedicated", "ha"]
QuotaState = Literal["ok", "warn", "blocked", "restored"]
ENGINES = ("postgres", "redis")
PLANS = ("shared", "dedicated", "ha")
HA_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")   # the ha plan's "hosts"
WARN_AT = 0.9                   # of the quota: "warn" from here, "blocked" at 1.0
DEDICATED_REDIS_MB = 64         # maxmemory when no quota is given
SPARE_DATABASES = 3             # empty databases kept ready for shared Postgres
MB = 1024 * 1024


@dataclass
class Credentials:
    """What an app is given: a URL, the env vars to set, and where the server is."""

    url: str
    env: dict[str, str]
    host: str
    port: int
    extra: dict[str, str] = field(default_factory=dict)


class Provisioner:
    def __init__(self, data_dir: Path, address: str = "127.0.0.1", pg_port: int = 0,
                 redis_port: int = 0, *,
                 ha_addresses: tuple[str, str, str] = HA_ADDRESSES) -> None:
        self.data_dir = data_dir
        self.ha_addresses = ha_addresses    # primary, standby, third Sentinel
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o711)           # the servers' users pass through to their dirs
        self.address = address
        self.records = Records(data_dir)
        ports = self._ports(pg_port, redis_port)
        self.pg = PgCluster(data_dir / "postgres" / "shared", address, ports["pg_port"])
        self.pg_shared = PgShared(self.pg)
        self.redis = RedisServer(data_dir / "redis" / "shared", address, ports["redis_port"])
        self.redis_shared = RedisShared(self.redis)

    def _ports(self, pg_port: int, redis_port: int) -> dict[str, int]:
        """The shared servers' ports: as given, else as chosen before, else free ones."""
        path = self.data_dir / "servers.json"
        with self.records.lock("servers"):
            saved = json.loads(path.read_text()) if path.exists() else {}
            ports = {"pg_port": pg_port or saved.get("pg_port") or free_port(self.address),
                     "redis_port": redis_port or saved.get("redis_port")
                     or free_port(self.address)}
            if ports != {k: saved.get(k) for k in ports}:
                path.write_text(json.dumps({**saved, **ports, "address": self.address}))
        return ports

    # -- servers -------------------------------------------------------------------

    def ensure_shared_servers(self) -> None:
        """Init (first time) and start the shared cluster and redis-server unless they
        run; their data dirs are re-used across restarts. A cluster it starts gets
        its spare databases."""
        started = False
        with self.records.lock("servers"):
            if not self.pg.initialized() or not self.pg.is_running():
                self.pg.init()
                self.pg.start()
                self.pg_shared.sync_hba()
                started = True
            if not self.redis.configured() or not self.redis.is_running():
                self.redis.configure()
                self.redis.start()
        if started:
            self.refill_spares()

    def refill_spares(self) -> int:
        """Make empty databases until SPARE_DATABASES wait, so that the next shared
        Postgres addons only rename one. Call after provisioning, off the user's
        clock (the job does); provision works without spares, only slower."""
        with self.records.lock("servers"):
            return self.pg_shared.add_spares(SPARE_DATABASES)

    def ensure_dedicated_servers(self) -> None:
        """Start every dedicated server recorded here that does not run. Runners
        supervise these servers (runner/services.py): this is for a platform without
        runners, and for `python -m controller.jobs start-servers`."""
        for record in self.records.all():
            if record.plan in ("dedicated", "ha") and record.state == "ready":
                with self.records.lock(record.name):
                    self._dedicated(record).ensure_running()

    def stop_all(self) -> None:
        """Stop every server under data_dir (shared and dedicated), by PID."""
        for record in self.records.all():
            if record.plan in ("dedicated", "ha"):
                self._dedicated(record).stop()
        self.redis.stop()
        self.pg.stop()

    # -- verbs -----------------------------------------------------------------------

    def provision(self, addon_id: str, engine: Engine, plan: Plan, *,
                  quota_mb: int | None = None, hosts: list[str] | None = None
                  ) -> Credentials:
        """Make the addon, or finish a half-made one, or return the existing one's
        credentials (the same password). `hosts`: the addresses of the db hosts to
        put its server(s) on, least busy first (the controller's runners with the db
        role); a dedicated server takes the first, an ha addon's nodes the first two
        (its third Sentinel the third, or the provisioner's own address). Without
        them: the provisioner's address, and its default ha addresses."""
        self._check(engine, plan)
        name = addon_name(addon_id)
        started = time.monotonic()
        with self.records.lock(name):
            record = self.records.get(name)
            if record is not None and (record.engine, record.plan) != (engine, plan):
                raise InvalidAddon(f"addon {addon_id} exists as {record.engine} "
                                   f"{record.plan}, not {engine} {plan}",
                                   "destroy it first, or ask for the same engine and plan")
            if record is None:
                record = AddonRecord(addon_id, engine, plan, name,
                                     secrets.token_urlsafe(24), self.address,
                                     quota_mb=quota_mb)
                if plan == "dedicated" and hosts:
                    record.host = hosts[0]
                elif plan == "ha" and hosts and len(hosts) >= 2:
                    third = hosts[2] if len(hosts) > 2 else self.address
                    record.nodes = [hosts[0], hosts[1], third]
                self.records.put(record)
            self._make(record)
            if record.state != "ready":
                record.state = "ready"
                self.records.put(record)
        log.info("addon provisioned", extra={"addon": addon_id, "engine": engine,
                                             "plan": plan,
                                             "seconds": round(time.monotonic() - started, 3)})
        return self.credentials(record)

    def _make(self, record: AddonRecord) -> None:
        if record.plan == "shared":
            self._ensure_shared_running()
        if (record.engine, record.plan) == ("postgres", "shared"):
            with self.records.lock("servers"):      # pg_hba.conf has one writer
                self.pg_shared.create(record.name, record.password)
            self.pg_shared.wait_login(record.name, record.password)
            self._set_port(record, self.pg.port)
        elif (record.engine, record.plan) == ("redis", "shared"):
            self.redis_shared.create(record.name, record.password)
            self._set_port(record, self.redis.port)
        elif record.plan == "ha":
            self._make_ha(record)
        else:
            self._make_dedicated(record)

    def _make_ha(self, record: AddonRecord) -> None:
        """Postgres: `port` is PgBouncer's (on the provisioner's address), `direct_port`
        the nodes' (the same on both hosts). Redis: `port` the nodes', `direct_port`
        the Sentinels'. Chosen once, kept in the record."""
        if not record.port or not record.direct_port:
            if record.engine == "postgres":
                record.port = free_port(self.address)
                record.direct_port = self._free_on_all(self._ha_hosts(record)[:2])
            else:
                record.port = self._free_on_all(self._ha_hosts(record)[:2])
                record.direct_port = self._free_on_all(self._ha_hosts(record))
            self.records.put(record)
        server = self._dedicated(record)
        server.create(record.name, record.password)
        if isinstance(server, PgHa):
            server.wait_login(record.name, record.password)

    def _free_on_all(self, addresses: tuple[str, ...]) -> int:
        """A port free on the first address and answering on none of the others."""
        while True:
            port = free_port(addresses[0])
            if not any(listening(a, port) for a in addresses[1:]):
                return port

    def _make_dedicated(self, record: AddonRecord, tries: int = 3) -> None:
        """Its own server on ports chosen now (and kept); when another process took
        one of them between the choice and the start (two workers choosing at once),
        new ports and another try."""
        for attempt in range(tries):
            if not record.port or (record.engine == "postgres" and not record.direct_port):
                record.port, record.direct_port = self._two_free_ports(record.host)
                self.records.put(record)
            server = self._dedicated(record)
            try:
                server.create(record.name, record.password)
                if isinstance(server, PgDedicated):
                    server.wait_login(record.name, record.password)
                return
            except ServerUnavailable:
                if attempt == tries - 1 or not self._port_taken(record):
                    raise
                log.warning("port taken, choosing others", extra={"addon": record.addon_id,
                                                                  "port": record.port})
                server.stop()           # what did start, on the old ports
                record.port = record.direct_port = 0

    def _port_taken(self, record: AddonRecord) -> bool:
        """One of the record's ports answers although its own server does not run."""
        if record.engine == "redis":
            return not self._dedicated_redis(record).server.is_running() and \
                listening(record.host, record.port)
        pg = self._dedicated_pg(record)
        return (not pg.cluster.is_running() and listening(record.host, record.direct_port)) \
            or (not pg.bouncer.is_running() and listening(record.host, record.port))

    def destroy(self, addon_id: str, engine: Engine, plan: Plan, *,
                final_dump: Path | None = None) -> None:
        """Remove the addon (keeping a final dump at `final_dump` when given); nothing
        to do when it is gone already."""
        self._check(engine, plan)
        name = addon_name(addon_id)
        with self.records.lock(name):
            record = self.records.get(name)
            if record is not None and (record.engine, record.plan) != (engine, plan):
                raise InvalidAddon(f"addon {addon_id} is {record.engine} {record.plan}, "
                                   f"not {engine} {plan}")
            if (engine, plan) == ("postgres", "shared"):
                self._ensure_shared_running()
                with self.records.lock("servers"):
                    self.pg_shared.drop(name, final_dump)
            elif (engine, plan) == ("redis", "shared"):
                self._ensure_shared_running()
                self.redis_shared.drop(name, final_dump)
            elif record is not None and (engine, plan) == ("postgres", "ha"):
                self._pg_ha(record).destroy(name, final_dump)
            elif record is not None and (engine, plan) == ("redis", "ha"):
                self._redis_ha(record).destroy(name, final_dump)
            elif record is not None and engine == "redis":
                self._dedicated_redis(record).destroy(final_dump)
            elif record is not None:
                self._dedicated_pg(record).destroy(name, final_dump)
            elif plan == "dedicated" and engine == "postgres":   # no record: a leftover dir
                PgDedicated(self._dedicated_root("postgres", name), self.address, 0,
                            0).destroy(name)
            self.records.delete(name)
        log.info("addon destroyed", extra={"addon": addon_id, "engine": engine,
                                           "plan": plan})

    def rotate(self, addon_id: str, engine: Engine, plan: Plan) -> Credentials:
        """A new password; the old one is refused from now on."""
        self._check(engine, plan)
        name = addon_name(addon_id)
        with self.records.lock(name):
            record = self._record(addon_id, name)
            record.password = secrets.token_urlsafe(24)
            self.records.put(record)        # first: a retry applies the same password
            if plan == "shared":
                self._ensure_shared_running()
            if (engine, plan) == ("postgres", "shared"):
                self.pg_shared.rotate(name, record.password)
            elif (engine, plan) == ("redis", "shared"):
                self.redis_shared.rotate(name, record.password)
            else:
                self._dedicated(record).rotate(name, record.password)
        log.info("addon credentials rotated", extra={"addon": addon_id})
        return self.credentials(record)

    def usage_mb(self, addon_id: str) -> float:
        """Storage (Postgres: pg_database_size) or memory (Redis) in MiB."""
        record = self._record(addon_id, addon_name(addon_id))
        if (record.engine, record.plan) == ("postgres", "shared"):
            used = self.pg_shared.usage_bytes(record.name)
        elif (record.engine, record.plan) == ("redis", "shared"):
            used = self.redis_shared.usage_bytes(record.name)
        elif (record.engine, record.plan) == ("redis", "ha"):
            used = self._redis_ha(record).usage_bytes(record.name)
        elif record.engine == "redis":
            used = self._dedicated_redis(record).usage_bytes()
        elif record.plan == "ha":
            used = self._pg_ha(record).usage_bytes(record.name)
        else:
            used = self._dedicated_pg(record).usage_bytes(record.name)
        return used / MB

    def enforce_quota(self, addon_id: str, quota_mb: int) -> QuotaState:
        """Compare usage with `quota_mb`: "ok"; "warn" from 90%; "blocked" at or
        over it (writes revoked, reads and deletes work; again on each check while
        over); "restored" when a blocked addon is back under (writes given back).
        Dedicated servers are never blocked (a dedicated Redis is bounded by its own
        maxmemory; a dedicated cluster's disk is its plan's): "ok" or "warn"."""
        name = addon_name(addon_id)
        with self.records.lock(name):
            record = self._record(addon_id, name)
            shared = self._shared_tenants(record)
            blocked = shared.is_blocked(name) if shared else False
            if blocked and record.engine == "postgres":
                self.pg_shared.vacuum(name)
            used = self.usage_mb(addon_id)
            state: QuotaState
            if used >= quota_mb and shared is not None:
                if not blocked:
                    shared.block(name)
                state = "blocked"
            elif blocked and shared is not None:
                shared.restore(name)
                state = "restored"
            else:
                state = "warn" if used >= WARN_AT * quota_mb else "ok"
        log.info("quota checked", extra={"addon": addon_id, "used_mb": round(used, 2),
                                         "quota_mb": quota_mb, "state": state})
        return state

    # -- ha (postgres) -------------------------------------------------------------

    def check_primary(self, addon_id: str) -> bool:
        """Whether an ha Postgres addon's primary accepts connections (for the
        controller's periodic job; N failures in a row -> `failover`)."""
        return self._ha_pg_record(addon_id).check_primary()

    def failover(self, addon_id: str, *, force: bool = False) -> Credentials:
        """Fence the primary, promote the standby, repoint PgBouncer (DATABASE_URL
        does not change). Idempotent. Refused while the standby may be behind (it
        failed and the primary committed alone) unless `force`."""
        name = addon_name(addon_id)
        with self.records.lock(name):
            record = self._record(addon_id, name)
            self._ha_pg_record(addon_id).failover(name, force=force)
        return self.credentials(record)

    def rejoin(self, addon_id: str) -> Credentials:
        """Rebuild the fenced old primary as the new standby (synchronous again)."""
        name = addon_name(addon_id)
        with self.records.lock(name):
            record = self._record(addon_id, name)
            self._ha_pg_record(addon_id).rejoin()
        return self.credentials(record)

    def watch(self, addon_id: str, *, failures: int = 3, interval: float = 0.5,
              stop: threading.Event | None = None, max_seconds: float | None = None,
              once: bool = False) -> bool:
        """Check the primary every `interval` s and fail over after `failures` failed
        checks in a row (True), or return False when `stop` is set or time is up (or,
        `once`, when both nodes answer)."""
        ha = self._ha_pg_record(addon_id)
        return ha.watch(addon_name(addon_id), failures=failures, interval=interval,
                        stop=stop, max_seconds=max_seconds, once=once)

    def ha_addons(self, engine: Engine = "postgres") -> list[str]:
        """The ids of the ready ha addons of `engine` here (for the periodic check)."""
        return [r.addon_id for r in self.records.all()
                if (r.engine, r.plan, r.state) == (engine, "ha", "ready")]

    def services(self, addon_id: str) -> list[ServiceSpec]:
        """The servers of a dedicated or ha addon that runners supervise (none for a
        shared one: the platform's shared servers are the job workers' own)."""
        record = self._record(addon_id, addon_name(addon_id))
        if record.plan == "shared":
            return []
        return self._dedicated(record).services(addon_id)

    def needs_rejoin(self, addon_id: str) -> tuple[str, str, float] | None:
        """(fenced node's address, the other's, when it was fenced) of an ha Postgres
        addon that runs on one node since a failover (the fenced one waits to be
        rebuilt as the standby), or None."""
        ha = self._ha_pg_record(addon_id)
        state = ha.state()
        if not state.get("fenced"):
            return None
        return (ha.address(state["fenced"]), ha.address(ha.primary()),
                float(state.get("fenced_at") or 0))

    def live_credentials(self, addon_id: str) -> Credentials:
        """The credentials of an ha addon as its nodes stand now (after a failover the
        primary's REDIS_URL and the standby's DATABASE_READ_URL move). Raises
        ServerUnavailable when a Redis addon's Sentinels cannot tell where the
        primary is (nothing is known to have moved then)."""
        record = self._record(addon_id, addon_name(addon_id))
        if (record.engine, record.plan) == ("redis", "ha"):
            self._redis_ha(record).primary(record.name)
        return self.credentials(record)

    def _ha_pg_record(self, addon_id: str) -> PgHa:
        record = self._record(addon_id, addon_name(addon_id))
        if (record.engine, record.plan) != ("postgres", "ha"):
            raise InvalidAddon(f"addon {addon_id} is {record.engine} {record.plan}, not "
                               "postgres ha", "failover is for postgres ha addons; redis "
                               "ha fails over by its Sentinels")
        return self._pg_ha(record)

    # -- helpers -------------------------------------------------------------------

    def credentials(self, record: AddonRecord) -> Credentials:
        host, port, user, password = record.host, record.port, record.name, record.password
        extra: dict[str, str] = {}
        if record.engine == "postgres":
            url = f"postgresql://{user}:{password}@{host}:{port}/{record.name}"
            env = {"DATABASE_URL": url, "DB_HOST": host, "DB_PORT": str(port),
                   "DB_NAME": record.name, "DB_USER": user, "DB_PASSWORD": password}
            if record.plan == "dedicated":      # the URL is PgBouncer's; this one not
                extra["DATABASE_DIRECT_URL"] = \
                    f"postgresql://{user}:{password}@{host}:{record.direct_port}/{record.name}"
                env.update(extra)
            elif record.plan == "ha":           # the nodes' own, as they are now
                ha = self._pg_ha(record)
                # no standby while one is fenced: reads go to the primary until then
                reader = ha.primary() if ha.state().get("fenced") else ha.standby()
                for key, node in (("DATABASE_DIRECT_URL", ha.primary()),
                                  ("DATABASE_READ_URL", reader)):
                    extra[key] = (f"postgresql://{user}:{password}@{ha.address(node)}:"
                                  f"{record.direct_port}/{record.name}")
                env.update(extra)
        elif record.plan == "ha":
            ha_redis = self._redis_ha(record)     # REDIS_URL: the primary as it is now
            host, port = ha_redis.primary_node(record.name).address, record.port
            url = f"redis://{user}:{password}@{host}:{port}/0"
            sentinels = ",".join(f"{a}:{record.direct_port}" for a in ha_redis.addresses)
            extra["REDIS_SENTINEL_URL"] = \
                f"redis+sentinel://{user}:{password}@{sentinels}/{record.name}"
            env = {"REDIS_URL": url, **extra}
        else:
            url = f"redis://{user}:{password}@{host}:{port}/0"
            env = {"REDIS_URL": url}
            if record.plan == "shared":
                env["REDIS_KEY_PREFIX"] = RedisShared.prefix(record.name)
        return Credentials(url=url, env=env, host=host, port=port, extra=extra)

    def _check(self, engine: str, plan: str) -> None:
        if engine not in ENGINES or plan not in PLANS:
            raise InvalidAddon(f"unknown addon kind {engine} {plan}",
                               f"engine is one of {', '.join(ENGINES)}; plan one of "
                               f"{', '.join(PLANS)}")

    def _record(self, addon_id: str, name: str) -> AddonRecord:
        record = self.records.get(name)
        if record is None:
            raise AddonNotFound(f"no addon {addon_id} here",
                                "provision it first; `berth addons` lists them")
        return record

    def _set_port(self, record: AddonRecord, port: int) -> None:
        if record.port != port:
            record.port = port
            self.records.put(record)

    def _ensure_shared_running(self) -> None:
        if not (self.pg.is_running() and self.redis.is_running()):
            self.ensure_shared_servers()

    def _shared_tenants(self, record: AddonRecord) -> PgShared | RedisShared | None:
        if record.plan != "shared":
            return None
        return self.pg_shared if record.engine == "postgres" else self.redis_shared

    def _dedicated(self, record: AddonRecord) -> PgDedicated | RedisDedicated | PgHa | RedisHa:
        if record.plan == "ha":
            return self._pg_ha(record) if record.engine == "postgres" \
                else self._redis_ha(record)
        return self._dedicated_pg(record) if record.engine == "postgres" \
            else self._dedicated_redis(record)

    def _pg_ha(self, record: AddonRecord) -> PgHa:
        return PgHa(self._dedicated_root("pgha", record.name),
                    (self._ha_hosts(record)[0], self._ha_hosts(record)[1]),
                    record.direct_port,
                    record.host, record.port)

    def _redis_ha(self, record: AddonRecord) -> RedisHa:
        return RedisHa(self._dedicated_root("redis-ha", record.name), self._ha_hosts(record),
                       record.port, record.direct_port,
                       maxmemory_mb=record.quota_mb or DEDICATED_REDIS_MB)

    def _ha_hosts(self, record: AddonRecord) -> tuple[str, str, str]:
        nodes = record.nodes
        return (nodes[0], nodes[1], nodes[2]) if len(nodes) == 3 else self.ha_addresses

    def _dedicated_root(self, engine: str, name: str) -> Path:
        """`<data_dir>/dedicated/<engine>-<16 hex of the name's hash>`: short, since
        the unix socket inside must fit in 107 bytes (the record maps name to dir)."""
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        return self.data_dir / "dedicated" / f"{engine}-{digest}"

    def _dedicated_redis(self, record: AddonRecord) -> RedisDedicated:
        return RedisDedicated(self._dedicated_root("redis", record.name), record.host,
                              record.port, maxmemory_mb=record.quota_mb or DEDICATED_REDIS_MB)

    def _dedicated_pg(self, record: AddonRecord) -> PgDedicated:
        return PgDedicated(self._dedicated_root("postgres", record.name), record.host,
                           record.direct_port, record.port)

    def _two_free_ports(self, address: str) -> tuple[int, int]:
        first = free_port(address)
        second = free_port(address)
        while second == first:
            second = free_port(address)
        return first, second
