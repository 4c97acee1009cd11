"""An ha Redis for one addon: a primary and a replica (two hosts: two loopback
addresses, each node its own dir) and three Sentinels (quorum 2) that promote the
replica when the primary is down.

Layout under `root`: `node-a/`, `node-b/` (RedisServer roots, the same port on each
address), `sentinel-0..2/` (sentinel.conf, written by us then rewritten by Sentinel
itself as it learns; pid, log), `admin.secret` is shared by both nodes.

Auth everywhere: on both nodes the `default` user is off, `berth-admin` (the platform,
and the replica's and Sentinels' login: `masteruser`, `sentinel auth-user`) and the
tenant's ACL user with the dedicated plan's rules (ACLs are not replicated, so both
nodes get the same users.acl). On the Sentinels the `default` user is off too; the
tenant's user may only ask where the primary and replicas are (`SENTINEL
get-master-addr-by-name|masters|master|replicas|slaves|sentinels`), and the Sentinels
talk to each other as `berth-admin` (`sentinel sentinel-user/-pass`).

URLs: `REDIS_URL` = `redis://user:pass@<primary>:<port>/0` (plain clients; the
primary at provisioning, so after a failover a plain client needs a new release), and
`REDIS_SENTINEL_URL` = `redis+sentinel://user:pass@h1:p1,h2:p2,h3:p3/<service>` (the
three Sentinels, then the monitored service name; the same user and password log in
to the Sentinels and to the nodes): Sentinel-aware clients ask a Sentinel for the
current primary and follow failovers with no new release.

Guarantee: Redis replication is asynchronous. A write the primary acknowledged may be
lost if the primary dies before the replica received it; a client that needs a write
to survive a failover sends `WAIT 1 <ms>` after it and counts the write as durable
only when WAIT answers 1 (the replica has it). Sentinel promotes the replica that has
the most data; the old primary, if it comes back, is turned into a replica by the
Sentinels (its un-replicated writes are discarded): that is the fencing here.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from messaging.shapes import ServiceSpec

from .command import RunAs, program_path, run
from .errors import CommandFailed, ServerUnavailable
from .files import own_dir, write_file
from .pidfile import read_pid, terminate
from .redisdedicated import TENANT_RULES
from .redisserver import ADMIN, REDIS_SERVER, RedisServer, acl_password, default_user

log = logging.getLogger(__name__)

QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
SENTINEL_RULES = ("-@all +ping +auth +hello +client|setname "
                  "+sentinel|get-master-addr-by-name +sentinel|masters +sentinel|master "
                  "+sentinel|replicas +sentinel|slaves +sentinel|sentinels")


class Sentinel:
    """One redis-sentinel (`redis-server <conf> --sentinel`), daemonized, by PID."""

    def __init__(self, root: Path, address: str, port: int, user: RunAs) -> None:
        self.root = root
        self.address = address
        self.port = port
        self.user = user
        self.conf = root / "sentinel.conf"
        self.pid_file = root / "sentinel.pid"
        self.log_file = root / "sentinel.log"

    def configure(self, service: str, primary: tuple[str, int], admin_password: str,
                  users: Sequence[str]) -> None:
        """Written once: Sentinel rewrites its file as it learns the topology."""
        own_dir(self.root, self.user)
        if self.conf.exists():
            return
        lines = [f"bind {self.address}", f"port {self.port}", "daemonize yes",
                 f"pidfile {self.pid_file}", f"logfile {self.log_file}", f"dir {self.root}",
                 f"sentinel announce-ip {self.address}",
                 f"sentinel monitor {service} {primary[0]} {primary[1]} {QUORUM}",
                 f"sentinel auth-user {service} {ADMIN}",
                 f"sentinel auth-pass {service} {admin_password}",
                 f"sentinel down-after-milliseconds {service} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {service} {FAILOVER_TIMEOUT_MS}",
                 f"sentinel parallel-syncs {service} 1",
                 f"sentinel sentinel-user {ADMIN}",
                 f"sentinel sentinel-pass {admin_password}",
                 "user default off resetpass resetkeys resetchannels -@all",
                 f"user {ADMIN} on {acl_password(admin_password)} ~* &* +@all",
                 *users]
        write_file(self.conf, "\n".join(lines) + "\n", self.user)

    def service(self, service_id: str, addon_id: str) -> ServiceSpec:
        return ServiceSpec(id=service_id, addon=addon_id, app="", kind="sentinel",
                           argv=(program_path(REDIS_SERVER), str(self.conf), "--sentinel",
                                 "--daemonize", "no"), cwd=str(self.root), user=self.user.name,
                           address=self.address, port=self.port, pidfile=str(self.pid_file))

    def start(self, timeout: float = 10) -> None:
        if self.is_running():
            return
        self.pid_file.unlink(missing_ok=True)
        try:
            run([REDIS_SERVER, self.conf, "--sentinel"], timeout=timeout, user=self.user,
                cwd=self.root)
        except CommandFailed as exc:
            raise ServerUnavailable(f"redis-sentinel in {self.root} did not start: "
                                    f"{exc.message}", f"see {self.log_file}") from exc
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"redis-sentinel on {self.address}:{self.port} "
                                        "did not start", f"see {self.log_file}")
            time.sleep(0.005)

    def stop(self, timeout: float = 10) -> None:
        pid = self.pid()
        if pid is None or not self._is_ours(pid):
            return
        terminate(pid, self._is_ours, timeout)

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and self._is_ours(pid)

    def _is_ours(self, pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        return b"sentinel" in cmdline and f":{self.port}".encode() in cmdline


class RedisHa:
    def __init__(self, root: Path, addresses: Sequence[str], port: int, sentinel_port: int,
                 *, user: RunAs | None = None, maxmemory_mb: int = 64,
                 policy: str = "noeviction") -> None:
        """`addresses`: three hosts; the nodes run on the first two, a Sentinel on
        each."""
        self.root = root
        self.addresses = list(addresses)
        self.port = port
        self.sentinel_port = sentinel_port
        self.user = user or default_user()
        self.maxmemory_mb = maxmemory_mb
        self.policy = policy
        self.secret_file = root / "admin.secret"

    def node(self, i: int) -> RedisServer:
        admin = self.secret_file.read_text().strip() if self.secret_file.exists() else ""
        extra = [("masteruser", ADMIN), ("masterauth", admin),
                 ("replica-announce-ip", self.addresses[i]),
                 ("repl-diskless-sync-delay", "0")]
        if i == 1:
            extra.append(("replicaof", f"{self.addresses[0]} {self.port}"))
        return RedisServer(self.root / f"node-{'ab'[i]}", self.addresses[i], self.port,
                           user=self.user, maxmemory_mb=self.maxmemory_mb,
                           policy=self.policy, extra=extra)

    def sentinels(self) -> list[Sentinel]:
        return [Sentinel(self.root / f"sentinel-{i}", address, self.sentinel_port, self.user)
                for i, address in enumerate(self.addresses[:3])]

    def tenant_line(self, name: str, password: str) -> str:
        return f"user {name} on {acl_password(password)} ~* &* {TENANT_RULES}"

    def create(self, name: str, password: str) -> None:
        """Both nodes (the same admin secret and users.acl), replication, then the
        Sentinels; every step idempotent."""
        own_dir(self.root, RunAs.current(), 0o711)
        if not self.secret_file.exists():
            write_file(self.secret_file, secrets.token_urlsafe(32), RunAs.current())
        nodes = [self.node(0), self.node(1)]
        line = self.tenant_line(name, password)
        for node in nodes:
            own_dir(node.root, self.user)
            if not node.secret_file.exists():
                write_file(node.secret_file, self.secret_file.read_text(), RunAs.current())
            node.configure([line])
            node.start()
        self._wait_replicating(nodes[0])
        for sentinel in self.sentinels():
            sentinel.configure(name, (self.addresses[0], self.port),
                               self.secret_file.read_text().strip(),
                               [f"user {name} on {acl_password(password)} {SENTINEL_RULES}"])
            sentinel.start()
        self._wait_sentinels(name)

    def _wait_sentinels(self, service: str, timeout: float = 15) -> None:
        """Until every Sentinel knows the replica and the two other Sentinels (they
        learn each other from hello messages, every 2 s): before that, a primary that
        dies cannot be agreed down (quorum 2) and nothing fails over."""
        admin_pw = self.secret_file.read_text().strip()
        deadline = time.monotonic() + timeout
        for sentinel in self.sentinels():
            with redis.Redis(host=sentinel.address, port=sentinel.port, username=ADMIN,
                             password=admin_pw, socket_timeout=2) as s:
                while True:
                    info = s.sentinel_master(service)
                    if int(info["num-other-sentinels"]) >= 2 and int(info["num-slaves"]) >= 1:
                        break
                    if time.monotonic() > deadline:
                        raise ServerUnavailable("the Redis Sentinels do not see each other "
                                                "and the replica", f"see {sentinel.log_file}")
                    time.sleep(0.05)

    def _wait_replicating(self, primary: RedisServer, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with primary.admin() as admin:
                info = admin.info("replication")
            if info.get("connected_slaves", 0) >= 1 and \
                    info.get("slave0", {}).get("state") == "online":
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable("the Redis replica does not replicate",
                                        f"see {self.root}/node-b/redis.log")
            time.sleep(0.01)

    def primary(self, service: str) -> tuple[str, int]:
        """Where the Sentinels say the primary is now: the first Sentinel that
        answers (the primary's host may have taken its own Sentinel down with it)."""
        password = self.secret_file.read_text().strip()
        error: Exception | None = None
        for address in self.addresses[:3]:
            try:
                with redis.Redis(host=address, port=self.sentinel_port, username=ADMIN,
                                 password=password, socket_timeout=1,
                                 socket_connect_timeout=1, decode_responses=True) as s:
                    host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                   service)
                return str(host), int(port)
            except (redis.RedisError, OSError) as exc:
                error = exc
        raise ServerUnavailable(f"no Sentinel of {service} answers ({error})",
                                f"see {self.root}/sentinel-*/sentinel.log")

    def rotate(self, name: str, password: str) -> None:
        """A new password on both nodes and the Sentinels (ACL SETUSER, saved)."""
        self.ensure_running()
        for node in (self.node(0), self.node(1)):
            with node.admin() as admin:
                admin.execute_command("ACL", "SETUSER", name, "resetpass", f">{password}")
                admin.execute_command("ACL", "SAVE")
        admin_pw = self.secret_file.read_text().strip()
        for sentinel in self.sentinels():
            with redis.Redis(host=sentinel.address, port=sentinel.port, username=ADMIN,
                             password=admin_pw, socket_timeout=2) as s:
                s.execute_command("ACL", "SETUSER", name, "resetpass", f">{password}")
                s.execute_command("SENTINEL", "FLUSHCONFIG")

    def ensure_running(self) -> None:
        for node in (self.node(0), self.node(1)):
            if node.configured():
                node.start()
        for sentinel in self.sentinels():
            if sentinel.conf.exists():
                sentinel.start()

    def stop(self) -> None:
        for sentinel in self.sentinels():
            sentinel.stop()
        for node in (self.node(1), self.node(0)):
            node.stop()

    def usage_bytes(self, service: str) -> int:
        host, _ = self.primary(service)
        node = self.node(self.addresses.index(host))
        with node.admin() as admin:
            return int(admin.info("memory")["used_memory"])

    def services(self, addon_id: str) -> list[ServiceSpec]:
        """Both nodes and the three Sentinels, for runners to supervise."""
        nodes = [self.node(i).service(f"{addon_id}-node-{'ab'[i]}", addon_id)
                 for i in (0, 1) if self.node(i).configured()]
        return nodes + [s.service(f"{addon_id}-sentinel-{i}", addon_id)
                        for i, s in enumerate(self.sentinels()) if s.conf.exists()]

    def primary_node(self, service: str) -> RedisServer:
        """The node the Sentinels call primary; the first node when no Sentinel
        answers (none configured yet, or all down)."""
        try:
            host, _ = self.primary(service)
            return self.node(self.addresses.index(host))
        except (ServerUnavailable, ValueError):
            return self.node(0)

    def destroy(self, service: str, final_dump: Path | None = None) -> None:
        """SAVE on the current primary and copy its RDB (when asked), then stop every
        process by PID and remove the directory."""
        if final_dump is not None:
            node = self.primary_node(service)
            if node.configured():
                node.start()
                with node.admin() as admin:
                    admin.save()
                final_dump.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(node.root / "dump.rdb", final_dump)
                final_dump.chmod(0o600)
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        log.info("ha redis destroyed", extra={"dir": str(self.root)})
