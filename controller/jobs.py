"""The platform's job workers: Celery tasks for the slow addon work, on the platform's
own Redis broker (controller setting `broker_url`), with celery beat for the
periodic quota check.

    python -m controller.jobs --config berth.yaml worker     # `berth up` starts both
    python -m controller.jobs --config berth.yaml beat
    python -m controller.jobs --config berth.yaml stop-servers

Workers read the controller's section of the config (the broker, the API and the
platform token, and where addon servers keep their data) and call
dbprovision.service.Provisioner. They never touch the controller's store: each task
asks the API what the addon needs (`GET /v1/platform/addons/<id>`) and reports steps,
its end or its failure (`POST .../report`), so the controller stays the store's only
writer and `berth addons info` shows the last step.

Every task is idempotent: it does only what the addon's op in flight asks (a stale
task, e.g. a provision after a destroy, does nothing), the provisioner's calls are
idempotent, and one task at a time works on an addon (a lock in the broker's Redis,
taken over when its holder on this host died). A failure is retried with backoff
(autoretry_for, max_retries); a worker killed half-way leaves the message
unacknowledged (acks_late) and the controller sends the task again after
`job_retry_seconds` without news (controller/jobqueue.py); so a half-made database is
finished by the next attempt, or, when the retries are spent, dropped before the
addon is reported failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from controller.addons import MOVED, Op
from messaging.errors import BerthError

if TYPE_CHECKING:
    from dbprovision.service import Provisioner

log = logging.getLogger(__name__)

QUEUE = "berth-platform"
TASKS = {Op.PROVISION: "berth.provision_addon", Op.ROTATE: "berth.rotate_addon",
         Op.DESTROY: "berth.destroy_addon"}
CHECK_QUOTAS = "berth.check_quotas"
CHECK_HA = "berth.check_ha"
HA_FAILURES = 3           # failed checks in a row before a failover ...
HA_INTERVAL = 0.5         # ... this many seconds apart
LOCK_TTL = 900            # seconds an addon lock lives without its holder
LOCK_WAIT = 120.0         # seconds a task waits for another task on the same addon
API_TIMEOUT = 30.0

app = Celery("berth", set_as_current=False)
app.conf.update(
    task_serializer="json", accept_content=["json"], result_serializer="json",
    task_ignore_result=True, task_default_queue=QUEUE,
    # a worker killed mid-task leaves its message to be delivered again
    task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True, broker_connection_timeout=3.0,
    broker_transport_options={"visibility_timeout": 3600},
    worker_hijack_root_logger=False, enable_utc=True,
)


def configure(settings: SimpleNamespace) -> Celery:
    """Point the Celery app at the platform's broker (controller and workers alike)."""
    global _settings
    _settings = settings
    app.conf.broker_url = settings.broker_url
    app.conf.beat_schedule = {"check-quotas": {"task": CHECK_QUOTAS,
                                               "schedule": settings.quota_check_seconds},
                              "check-ha": {"task": CHECK_HA,
                                           "schedule": settings.ha_check_seconds}}
    return app


_settings: SimpleNamespace | None = None
_provisioner: Provisioner | None = None


def settings() -> SimpleNamespace:
    if _settings is None:
        raise RuntimeError("controller.jobs is not configured (run it with --config)")
    return _settings


def provisioner() -> Provisioner:
    """One Provisioner per worker process, made after the fork."""
    global _provisioner
    if _provisioner is None:
        from dbprovision.service import Provisioner
        s = settings()
        _provisioner = Provisioner(Path(s.addons_dir).resolve(), s.addon_address,
                                   s.addon_pg_port, s.addon_redis_port)
    return _provisioner


# -- talking to the controller ---------------------------------------------------
class Api:
    """The controller's platform endpoints, with the platform token."""

    def __init__(self, s: SimpleNamespace) -> None:
        self.base = s.public_url or f"http://{s.api_host}:{s.api_port}"
        token = s.platform_token
        if not token:
            path = Path(s.data_dir) / "platform.token"
            token = path.read_text().strip() if path.exists() else ""
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=API_TIMEOUT) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                err = {"message": f"the API answered {exc.code}"}
            raise BerthError.from_dict(err, status=exc.code) from None


def api() -> Api:
    return Api(settings())


def error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, BerthError):
        return exc.to_dict()
    return {"code": "job_failed", "message": f"{type(exc).__name__}: {exc}",
            "hint": "see the job worker's log (logs/jobs-worker.log under `berth up`)"}


def permanent(exc: BaseException) -> bool:
    """Errors another attempt cannot fix: a plan not built, a bad id."""
    return isinstance(exc, BerthError) and (400 <= exc.status < 500 or exc.status == 501) \
        and exc.code not in ("stale_task", "addon_state")


class Permanent(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# -- one task at a time per addon ------------------------------------------------
@contextlib.contextmanager
def addon_lock(addon_id: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """A lock in the broker's Redis: `host:pid:time`. A holder on this host whose
    process is gone (a killed worker) is taken over at once."""
    import redis

    client = redis.Redis.from_url(settings().broker_url, socket_timeout=5,
                                  decode_responses=True)
    key = f"berth:addon-lock:{addon_id}"
    me = f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"
    deadline = time.monotonic() + wait
    while not client.set(key, me, nx=True, ex=LOCK_TTL):
        holder = str(client.get(key) or "")
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            client.delete(key)              # its holder was killed; finish its work
            continue
        if time.monotonic() > deadline:
            raise BerthError(f"addon {addon_id} is busy with another job ({holder})",
                             "it is retried", code="busy", status=503)
        time.sleep(0.2)
    try:
        yield
    finally:
        if client.get(key) == me:
            client.delete(key)
        client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the tasks --------------------------------------------------------------------
class AddonTask(Task):
    """An addon job: retried with backoff; its retries and its end reported."""

    op: Op
    autoretry_for = (Exception,)
    dont_autoretry_for = (Permanent,)
    max_retries = 4
    retry_backoff = 1
    retry_backoff_max = 20
    retry_jitter = False
    acks_late = True

    def report(self, addon_id: str, outcome: str, **fields: Any) -> None:
        try:
            api().call("POST", f"/v1/platform/addons/{addon_id}/report",
                       {"op": self.op.value, "outcome": outcome, **fields})
        except BerthError as exc:
            if exc.code != "stale_task":
                raise
            log.info("addon %s: %s report is stale (%s)", addon_id, self.op.value,
                     exc.message)

    def step(self, addon_id: str, text: str) -> None:
        attempt = self.request.retries + 1
        self.report(addon_id, "step", step=f"{text} (attempt {attempt})" if attempt > 1
                    else text)

    def on_retry(self, exc: BaseException, task_id: str, args: tuple[Any, ...],
                 kwargs: dict[str, Any], einfo: Any) -> None:
        with contextlib.suppress(Exception):
            self.report(args[0], "step", step=f"attempt {self.request.retries + 1} failed: "
                        f"{error_dict(exc)['message']}; trying again")

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any], einfo: Any) -> None:
        cause = exc.cause if isinstance(exc, Permanent) else exc
        addon_id = args[0]
        try:
            self.give_up(addon_id)
        except Exception:
            log.exception("addon %s: cleaning up after a failed %s failed", addon_id,
                          self.op.value)
        with contextlib.suppress(Exception):
            self.report(addon_id, "failed", error=error_dict(cause),
                        step=f"{self.op.value} failed")

    def give_up(self, addon_id: str) -> None:
        """What to undo when the retries are spent (a half-made database)."""

    def addon(self, addon_id: str) -> dict[str, Any] | None:
        """The addon as the controller has it, or None when this task's op is no
        longer in flight (a stale task: nothing to do)."""
        found = api().call("GET", f"/v1/platform/addons/{addon_id}")
        return found if found.get("op") == self.op.value else None

    def run_op(self, addon_id: str) -> str:
        try:
            with addon_lock(addon_id):
                addon = self.addon(addon_id)
                if addon is None:
                    return "stale"
                return self.work(addon)
        except Exception as exc:
            if permanent(exc):
                raise Permanent(exc) from exc
            raise

    def work(self, addon: dict[str, Any]) -> str:
        raise NotImplementedError


class Provision(AddonTask):
    op = Op.PROVISION

    def work(self, addon: dict[str, Any]) -> str:
        prov = provisioner()
        if addon["plan"] == "shared":
            self.step(addon["id"], "starting the shared servers")
            prov.ensure_shared_servers()
        hosts = None
        if addon["plan"] != "shared":       # on the db hosts the runners declare
            hosts = api().call("GET", "/v1/platform/hosts")["db"]
            where = ", ".join(hosts[:2 if addon["plan"] == "ha" else 1]) or "this host"
            self.step(addon["id"], f"creating the {addon['plan']} {addon['engine']} "
                                   f"database on {where}")
        else:
            self.step(addon["id"], f"creating the {addon['plan']} {addon['engine']} database")
        creds = prov.provision(addon["id"], addon["engine"], addon["plan"],
                               quota_mb=addon.get("quota_mb"), hosts=hosts)
        self.report(addon["id"], "done", step="ready", credentials=asdict(creds),
                    services=[s.to_wire() for s in prov.services(addon["id"])])
        if addon["plan"] == "shared" and addon["engine"] == "postgres":
            prov.refill_spares()        # off the user's clock: the next one is faster
        return "ready"

    def give_up(self, addon_id: str) -> None:
        addon = self.addon(addon_id)
        if addon is not None:                  # still ours to clean: drop what was made
            provisioner().destroy(addon_id, addon["engine"], addon["plan"])


class Rotate(AddonTask):
    op = Op.ROTATE

    def work(self, addon: dict[str, Any]) -> str:
        self.step(addon["id"], "setting a new password")
        creds = provisioner().rotate(addon["id"], addon["engine"], addon["plan"])
        self.report(addon["id"], "done", step="credentials rotated",
                    credentials=asdict(creds))
        return "rotated"


class Destroy(AddonTask):
    op = Op.DESTROY

    def work(self, addon: dict[str, Any]) -> str:
        dumps = Path(settings().addons_dir).resolve() / "dumps"
        dumps.mkdir(parents=True, exist_ok=True)
        dumps.chmod(0o700)
        dump = dumps / f"{addon['id']}.dump"
        self.step(addon["id"], "taking a final dump and dropping it")
        provisioner().destroy(addon["id"], addon["engine"], addon["plan"], final_dump=dump)
        self.report(addon["id"], "done", step="destroyed",
                    final_dump=str(dump) if dump.exists() else None)
        return "destroyed"


@app.task(bind=True, base=Provision, name=TASKS[Op.PROVISION], shared=False)
def provision_addon(self: Provision, addon_id: str) -> str:
    return self.run_op(addon_id)


@app.task(bind=True, base=Rotate, name=TASKS[Op.ROTATE], shared=False)
def rotate_addon(self: Rotate, addon_id: str) -> str:
    return self.run_op(addon_id)


@app.task(bind=True, base=Destroy, name=TASKS[Op.DESTROY], shared=False)
def destroy_addon(self: Destroy, addon_id: str) -> str:
    return self.run_op(addon_id)


@app.task(name=CHECK_QUOTAS, acks_late=False, shared=False)
def check_quotas() -> dict[str, str]:
    """Measure every ready shared database against its quota: over it the provisioner
    warns, then revokes writes (reads and deletes go on) until it is back under; the
    controller puts each change in the app's log. Also starts the shared servers
    that are not running (after a reboot; idempotent). Dedicated and ha servers are
    not started here: runners supervise them (runner/services.py), and a server
    whose host is gone must stay down for its standby to take over."""
    prov = provisioner()
    prov.ensure_shared_servers()        # the dedicated ones: runners supervise them
    out: dict[str, str] = {}
    client = api()
    for addon in client.call("GET", "/v1/platform/addons?quota=1")["addons"]:
        try:
            state = prov.enforce_quota(addon["id"], addon["quota_mb"])
            usage = prov.usage_mb(addon["id"])
            client.call("POST", f"/v1/platform/addons/{addon['id']}/quota",
                        {"state": state, "usage_mb": round(usage, 3)})
            out[addon["id"]] = state
        except Exception:
            log.exception("quota check of %s failed", addon["id"])
    return out


@app.task(name=CHECK_HA, acks_late=False, shared=False, expires=30)
def check_ha() -> dict[str, str]:
    """Watch every ha addon and tell the controller where its nodes are now.

    Postgres: the primary is checked a few times (bounded: HA_FAILURES x
    (HA_INTERVAL + 2) s each, room for checks that time out at 1 s: a streak of
    failures must fit in one run, the count does not carry over); after HA_FAILURES
    failures in a row its standby is promoted, the old primary fenced, PgBouncer
    repointed (dbprovision/pgha.py): DATABASE_URL does not change. A fenced node is
    rebuilt as the new standby (`rejoin`) at the next run that can reach its host.
    Redis: its Sentinels fail over by themselves; the plain REDIS_URL follows them.
    Each addon's credentials as they stand are reported as `moved`; the controller
    makes a release only when the app's environment changed (DATABASE_READ_URL,
    DATABASE_DIRECT_URL, REDIS_URL), so instances pick the new nodes up.
    Returns {addon id: what happened}. A failover refused (the standby may be
    behind), a rejoin that failed, or a report that failed is logged and tried again
    at the next run."""
    prov = provisioner()
    client = api()
    out: dict[str, str] = {}
    for addon_id in prov.ha_addons("postgres") + prov.ha_addons("redis"):
        try:
            # one check at a time per addon, and none beside its provision/rotate/
            # destroy: a report made mid-failover would tell the app a half-made state
            with addon_lock(addon_id, wait=0):
                out[addon_id] = _check_ha_addon(prov, client, addon_id)
        except BerthError as exc:
            if exc.code != "busy":
                log.exception("ha check of %s failed", addon_id)
            out[addon_id] = "busy" if exc.code == "busy" else "check failed"
        except Exception:
            log.exception("ha check of %s failed", addon_id)
            out[addon_id] = "check failed"
    return out


def _host_back(client: Api, fenced: str, other: str, fenced_at: float) -> bool:
    """Whether the fenced node's host can take its node again: a runner answers on
    its address, or runners do not stand for the nodes' hosts at all (no runner on
    either address: one host for everything, as under `berth up`). Not before the
    controller could have called that runner dead (heartbeat_interval x dead_after
    since the fencing): a host that died with its primary still looks alive until
    then."""
    s = settings()
    if time.time() - fenced_at < s.heartbeat_interval * (s.dead_after + 1):
        return False
    live = set(client.call("GET", "/v1/platform/hosts")["live"])
    return fenced in live or other not in live


def _check_ha_addon(prov: Provisioner, client: Api, addon_id: str) -> str:
    what = "ok"
    if addon_id in prov.ha_addons("postgres"):
        if prov.watch(addon_id, failures=HA_FAILURES, interval=HA_INTERVAL,
                      max_seconds=HA_FAILURES * (HA_INTERVAL + 2), once=True):
            log.warning("addon %s failed over to its standby", addon_id)
            what = "failed over to the standby"
        nodes = prov.needs_rejoin(addon_id)
        if nodes is not None and not _host_back(client, *nodes):
            log.info("addon %s: the old primary's host %s is away; rebuilt once it is "
                     "back", addon_id, nodes[0])
        elif nodes is not None:
            try:
                prov.rejoin(addon_id)
                what = (what + "; " if what != "ok" else "") + "old primary rebuilt as standby"
            except Exception as exc:        # its host is still away: the next run tries
                log.warning("addon %s: rebuilding the standby failed: %s", addon_id, exc)
    creds = prov.live_credentials(addon_id)
    client.call("POST", f"/v1/platform/addons/{addon_id}/report",
                {"op": MOVED, "outcome": "done", "credentials": asdict(creds),
                 "services": [s.to_wire() for s in prov.services(addon_id)],
                 "step": what if what != "ok" else ""})
    return what


# -- entry point ------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    from config.report import reporting
    from controller.settings import SPEC

    parser = argparse.ArgumentParser(prog="python -m controller.jobs")
    parser.add_argument("--config", help="the platform's berth.yaml (controller section)")
    parser.add_argument("what", choices=("worker", "beat", "stop-servers"))
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    with reporting(2, doing="load the job workers' settings"):
        s = SPEC.load(args.config)
        if not s.broker_url:
            raise BerthError("the controller setting broker_url is empty",
                             "point it at the platform's Redis (`berth up` starts one)")
    configure(s)
    from controller import backupjobs  # the backup tasks and their beat schedule
    backupjobs.install(s)
    logging.basicConfig(level=s.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.what == "stop-servers":
        provisioner().stop_all()
        return
    addons_dir = Path(s.addons_dir).resolve()
    addons_dir.mkdir(parents=True, exist_ok=True)
    if args.what == "worker":
        app.worker_main(["worker", f"--loglevel={s.log_level.upper()}",
                         f"--concurrency={args.concurrency}", "-Q", QUEUE,
                         "-n", f"berth-jobs-{os.getpid()}@{socket.gethostname()}",
                         "--without-gossip", "--without-mingle", "--without-heartbeat"])
    else:
        app.start(["beat", f"--loglevel={s.log_level.upper()}",
                   "-s", str(addons_dir / "celerybeat-schedule")])


if __name__ == "__main__":
    # the tasks under their module's own name (shared=False above keeps this copy's
    # tasks out of that module's app)
    from controller import jobs as _jobs

    _jobs.main()
