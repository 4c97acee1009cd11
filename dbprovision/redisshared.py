"""Tenants of the shared redis-server: one ACL user per addon, its keys and channels
under its own prefix, the commands that would reach past that prefix removed.

A tenant `name` (see names.py) gets the ACL user `name` with a password, the key
pattern `~name:*` and the channel pattern `&name:*`, and the commands of
TENANT_RULES: the data-type, key-space, pub/sub, transaction, scripting and connection
categories, minus the dangerous and admin ones (KEYS, FLUSHALL, FLUSHDB, CONFIG,
DEBUG, SHUTDOWN, MODULE, MONITOR, INFO, CLIENT LIST/KILL, SORT, RESTORE, MIGRATE,
SWAPDB, ACL changes...), minus what would show or touch other tenants' names without
naming a key: SCAN, RANDOMKEY, DBSIZE, PUBSUB CHANNELS/NUMSUB/NUMPAT (and the shard
variants), FUNCTION/FCALL (one namespace for all), SCRIPT FLUSH/KILL/DEBUG, client-side
caching (CLIENT TRACKING: invalidations are not filtered by ACL).

Sold as the cheap plan, with its limits written down: keys must start with the prefix
(REDIS_KEY_PREFIX; Django's KEY_PREFIX, Celery's `global_keyprefix`); no KEYS/SCAN
(a tenant lists its keys itself, e.g. in a set); memory, CPU and the event loop are
shared (maxmemory is the server's, a slow command or a long Lua script delays every
tenant); persistence (AOF, everysec) and restarts are the server's.
"""
from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from .errors import AddonNotFound
from .redisserver import RedisServer

log = logging.getLogger(__name__)

TENANT_RULES = (
    "-@all +@read +@write +@keyspace +@pubsub +@transaction +@connection +@scripting "
    "+@blocking -@dangerous -@admin "
    "-scan -randomkey -dbsize "
    "-pubsub|channels -pubsub|numsub -pubsub|numpat -pubsub|shardchannels "
    "-pubsub|shardnumsub "
    "-function -fcall -fcall_ro -script|flush -script|kill -script|debug "
    "-client|tracking -client|caching -client|getredir -client|trackinginfo "
    "-memory +memory|usage"
)
# over quota: no command that writes, except those that only remove or shorten
BLOCKED_RULES = (
    "-@write +del +unlink +getdel +hdel +srem +zrem +zremrangebyscore +zremrangebyrank "
    "+zremrangebylex +lpop +rpop +blpop +brpop +lrem +ltrim +spop +zpopmin +zpopmax "
    "+xdel +xtrim +xack +expire +pexpire +expireat +pexpireat +persist"
)
SCAN_COUNT = 1000


class RedisShared:
    def __init__(self, server: RedisServer) -> None:
        self.server = server

    @staticmethod
    def prefix(name: str) -> str:
        return f"{name}:"

    def rules(self, name: str, password: str, *, blocked: bool = False) -> list[str]:
        return ["reset", "on", f">{password}", f"~{name}:*", f"&{name}:*",
                *TENANT_RULES.split(), *(BLOCKED_RULES.split() if blocked else ())]

    def create(self, name: str, password: str) -> None:
        """Make or update the ACL user (idempotent), saved to the ACL file; a user
        that is over quota stays blocked."""
        blocked = self.exists(name) and self.is_blocked(name)
        with self.server.admin() as admin:
            admin.execute_command("ACL", "SETUSER", name,
                                  *self.rules(name, password, blocked=blocked))
            admin.execute_command("ACL", "SAVE")

    def is_blocked(self, name: str) -> bool:
        """Whether a SET of its own key would be refused (ACL DRYRUN: nothing runs)."""
        with self.server.admin() as admin:
            answer = admin.execute_command("ACL", "DRYRUN", name, "SET", f"{name}:x", "1")
        return answer != "OK"

    def block(self, name: str) -> None:
        """Over quota: writes that add refused (NOPERM); reads, deletes, expiries
        work. ACL rules apply to the next command of every open connection too."""
        with self.server.admin() as admin:
            admin.execute_command("ACL", "SETUSER", name, *BLOCKED_RULES.split())
            admin.execute_command("ACL", "SAVE")
        log.warning("writes revoked: over quota", extra={"addon": name})

    def restore(self, name: str) -> None:
        with self.server.admin() as admin:
            admin.execute_command("ACL", "SETUSER", name, *TENANT_RULES.split())
            admin.execute_command("ACL", "SAVE")
        log.info("writes restored: back under quota", extra={"addon": name})

    def exists(self, name: str) -> bool:
        with self.server.admin() as admin:
            return name in admin.acl_users()

    def rotate(self, name: str, password: str) -> None:
        """A new password; AUTH with the old one fails from now on. Connections that
        are open stay authenticated, so a rolling release keeps working."""
        if not self.exists(name):
            raise AddonNotFound(f"no Redis user {name} on the shared server")
        with self.server.admin() as admin:
            admin.execute_command("ACL", "SETUSER", name, "resetpass", f">{password}")
            admin.execute_command("ACL", "SAVE")

    def drop(self, name: str, final_dump: Path | None = None) -> None:
        """Dump the tenant's keys (when asked), remove its user (which closes its
        connections), delete its keys. Idempotent."""
        if final_dump is not None:
            self.dump(name, final_dump)
        with self.server.admin() as admin:
            admin.execute_command("ACL", "DELUSER", name)
            admin.execute_command("ACL", "SAVE")
            for keys in self._scan(admin, name):
                admin.unlink(*keys)

    def usage_bytes(self, name: str) -> int:
        """MEMORY USAGE summed over the tenant's keys (a SCAN: O(keys))."""
        total = 0
        with self.server.admin() as admin:
            for keys in self._scan(admin, name):
                pipe = admin.pipeline(transaction=False)
                for key in keys:
                    pipe.memory_usage(key)
                total += sum(int(n or 0) for n in pipe.execute())
        return total

    def dump(self, name: str, path: Path) -> None:
        """The tenant's keys as JSON lines {key, ttl_ms, value}, key and value in
        base64 (value = DUMP's payload), which RESTORE loads back."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out, self.server.admin(decode=False) as raw:
            for keys in self._scan(raw, name):
                pipe = raw.pipeline(transaction=False)
                for key in keys:
                    pipe.dump(key)
                    pipe.pttl(key)
                values = pipe.execute()
                for i, key in enumerate(keys):
                    value, ttl = values[2 * i], values[2 * i + 1]
                    if value is None:
                        continue
                    out.write(json.dumps({
                        "key": base64.b64encode(key).decode(),
                        "ttl_ms": max(int(ttl), 0),
                        "value": base64.b64encode(value).decode()}) + "\n")

    @staticmethod
    def _scan(client: redis.Redis, name: str) -> Iterator[list[Any]]:
        """The tenant's keys, a batch at a time (SCAN never blocks the server long)."""
        cursor = 0
        while True:
            cursor, keys = client.scan(cursor, match=f"{name}:*", count=SCAN_COUNT)
            if keys:
                yield list(keys)
            if cursor == 0:
                return
