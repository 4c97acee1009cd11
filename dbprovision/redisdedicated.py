"""A dedicated redis-server for one addon: its own process, port, memory limit,
eviction policy and AOF, with one ACL user for the tenant.

The tenant's user may use every key and channel and nearly every command, FLUSHALL,
KEYS and INFO included (the data is all its own); it may not administer the server:
no CONFIG, DEBUG, SHUTDOWN, MODULE, ACL changes, REPLICAOF, SAVE/BGSAVE, MONITOR,
CLIENT KILL/LIST/PAUSE (the `@admin` category), nor MIGRATE (the server would connect
where the tenant says). The `default` user is off; the platform keeps `berth-admin` on
the unix socket. maxmemory is the plan's; the policy defaults to noeviction, so a full
cache refuses writes instead of silently dropping a queue's messages (choose
allkeys-lru for a pure cache).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from messaging.shapes import ServiceSpec

from .command import RunAs
from .errors import InvalidAddon
from .redisserver import RedisServer

log = logging.getLogger(__name__)

TENANT_RULES = "+@all -@admin -migrate -restore-asking -config -debug -shutdown -module"
POLICIES = ("noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru",
            "volatile-lfu", "volatile-random", "volatile-ttl")


class RedisDedicated:
    def __init__(self, root: Path, address: str, port: int, *, user: RunAs | None = None,
                 maxmemory_mb: int = 64, policy: str = "noeviction") -> None:
        if policy not in POLICIES:
            raise InvalidAddon(f"unknown maxmemory policy {policy!r}",
                               f"one of: {', '.join(POLICIES)}")
        self.server = RedisServer(root, address, port, user=user,
                                  maxmemory_mb=maxmemory_mb, policy=policy)

    @property
    def port(self) -> int:
        return self.server.port

    def rules(self, name: str, password: str) -> list[str]:
        return ["reset", "on", f">{password}", "~*", "&*", *TENANT_RULES.split()]

    def create(self, name: str, password: str) -> None:
        """Write the config, start (or find running) the server, then set the tenant's
        user: each step idempotent, so a second call finishes a half-made one."""
        self.server.configure()
        self.server.start()
        with self.server.admin() as admin:
            admin.execute_command("ACL", "SETUSER", name, *self.rules(name, password))
            admin.execute_command("ACL", "SAVE")

    def ensure_running(self) -> None:
        if self.server.configured():
            self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def rotate(self, name: str, password: str) -> None:
        self.ensure_running()
        with self.server.admin() as admin:
            admin.execute_command("ACL", "SETUSER", name, "resetpass", f">{password}")
            admin.execute_command("ACL", "SAVE")

    def usage_bytes(self) -> int:
        with self.server.admin() as admin:
            return int(admin.info("memory")["used_memory"])

    def services(self, addon_id: str) -> list[ServiceSpec]:
        """Its redis-server, for a runner to supervise."""
        return [self.server.service(f"{addon_id}-redis", addon_id)]

    def destroy(self, final_dump: Path | None = None) -> None:
        """SAVE and copy the RDB (when asked), stop by PID, remove the directory."""
        if final_dump is not None and self.server.configured():
            self.server.start()
            with self.server.admin() as admin:
                admin.save()
            final_dump.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.server.root / "dump.rdb", final_dump)
            final_dump.chmod(0o600)
        self.server.stop()
        shutil.rmtree(self.server.root, ignore_errors=True)
        log.info("dedicated redis destroyed", extra={"dir": str(self.server.root)})
