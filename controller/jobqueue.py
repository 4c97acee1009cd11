"""The controller's side of the job workers: a thread that sends the Celery task of
every addon op in flight (the store's `op` column), and sends it again while no
worker has said anything about it for `job_retry_seconds`.

The API only writes the addon's row and pokes this thread, so a slow or absent
broker never holds up an API request, and the controller loop never sees the broker
at all. What the store says is the truth: after a controller restart every op still
in flight is sent again (the tasks are idempotent and serialized per addon).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from controller.addons import Addon, Op
from controller.store import Store

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

BROKER_DOWN_RETRY = 5.0      # seconds between sends while the broker is unreachable


class JobQueue:
    def __init__(self, store: Store, celery: Celery, retry_seconds: float) -> None:
        self.store = store
        self.celery = celery
        self.retry_seconds = retry_seconds
        self._sent: dict[tuple[str, Op], float] = {}      # (addon, op) -> monotonic
        self._failed: dict[tuple[str, Op], float] = {}    # broker refused it then
        self._poke = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jobqueue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        self._thread.join(10)

    def poke(self) -> None:
        """Thread-safe: an op was asked for; send its task now."""
        self._poke.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poke.wait(1.0)
            self._poke.clear()
            try:
                self.step(time.monotonic(), time.time())
            except Exception:               # keep sending; the store says what is due
                log.exception("job queue step failed")

    def due(self, addon: Addon, now: float, wall: float) -> bool:
        assert addon.op is not None
        key = (addon.id, addon.op)
        if key in self._failed:
            return now - self._failed[key] >= BROKER_DOWN_RETRY
        sent = self._sent.get(key)
        if sent is None:
            return True
        quiet_since = max(sent, now - (wall - addon.updated_at))
        return now - quiet_since >= self.retry_seconds

    def step(self, now: float, wall: float) -> int:
        """Send what is due; returns how many tasks were sent."""
        in_flight = self.store.addons_in_flight()
        keys = {(a.id, a.op) for a in in_flight}
        for table in (self._sent, self._failed):
            for key in list(table):
                if key not in keys:
                    del table[key]
        sent = 0
        for addon in in_flight:
            if self._stop.is_set() or not self.due(addon, now, wall):
                continue
            assert addon.op is not None
            key = (addon.id, addon.op)
            if self._send(addon):
                self._failed.pop(key, None)
                self._sent[key] = now
                sent += 1
            else:
                self._failed[key] = now
        return sent

    def _send(self, addon: Addon) -> bool:
        from controller.jobs import TASKS

        assert addon.op is not None
        op = addon.op
        try:
            self.celery.send_task(TASKS[op], args=[addon.id], retry=True,
                                  retry_policy={"max_retries": 1, "interval_start": 0.2,
                                                "interval_step": 0.5})
        except Exception as exc:
            log.warning("cannot queue %s of %s: %s", op.value, addon.id, exc)
            if not addon.step.startswith("waiting for the job queue"):
                self._note(addon, op, f"waiting for the job queue (broker: {exc})", False)
            return False
        first = addon.attempts == 0
        self._note(addon, op, "queued for a job worker" if first else
                   f"no word from a job worker; queued again (attempt {addon.attempts + 1})",
                   True)
        return True

    def _note(self, addon: Addon, op: Op, step: str, sent: bool) -> None:
        def change(a: Addon) -> None:
            if a.op is not op:
                return                      # a worker finished it meanwhile
            if sent:
                a.attempts += 1
            a.step = step
        try:
            self.store.change_addon(addon.id, change)
        except Exception:
            log.exception("cannot note the job of %s", addon.id)
