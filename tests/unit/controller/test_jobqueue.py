"""controller/jobqueue.py: when an addon op's task is sent (again). Celery is a test
double here that records send_task calls (or refuses them, as a broker that is down);
the real broker and workers are in tests/integration/test_addon_jobs.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.addons import Op
from controller.jobqueue import BROKER_DOWN_RETRY, JobQueue
from controller.jobs import TASKS
from controller.store import Store


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []
        self.down = False

    def send_task(self, name: str, args: list[Any], **options: Any) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.sent.append((name, args))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.db")
    s.create_app("shop")
    return s


def test_sends_each_op_once_then_again_when_quiet(store: Store):
    celery = Recorder()
    q = JobQueue(store, celery, retry_seconds=30)    # type: ignore[arg-type]
    addon = store.create_addon("shop", "postgres", "shared")
    assert q.step(0.0, 1000.0) == 1
    assert celery.sent == [(TASKS[Op.PROVISION], [addon.id])]
    assert store.addon(addon.id).attempts == 1
    assert "queued" in store.addon(addon.id).step
    wall = store.addon(addon.id).updated_at
    assert q.step(10.0, wall + 10) == 0              # a worker may be on it
    assert q.step(31.0, wall + 31) == 1              # no word for 30 s: again
    assert store.addon(addon.id).attempts == 2


def test_a_report_counts_as_word_from_a_worker(store: Store):
    celery = Recorder()
    q = JobQueue(store, celery, retry_seconds=30)    # type: ignore[arg-type]
    addon = store.create_addon("shop", "postgres", "shared")
    q.step(0.0, 1000.0)
    store.change_addon(addon.id, lambda a: a.report("provision", "step", step="initdb"))
    wall = store.addon(addon.id).updated_at
    assert q.step(31.0, wall + 5) == 0               # it reported 5 s ago
    store.change_addon(addon.id, lambda a: a.report("provision", "done", credentials={
        "url": "postgresql://u:p@127.0.0.1:5432/d", "env": {}, "port": 5432}))
    assert q.step(100.0, wall + 100) == 0            # done: nothing in flight
    store.change_addon(addon.id, lambda a: a.destroy())
    assert q.step(101.0, wall + 101) == 1
    assert celery.sent[-1] == (TASKS[Op.DESTROY], [addon.id])


def test_a_broker_that_is_down_is_tried_again_soon(store: Store):
    celery = Recorder()
    celery.down = True
    q = JobQueue(store, celery, retry_seconds=30)    # type: ignore[arg-type]
    addon = store.create_addon("shop", "redis", "shared")
    assert q.step(0.0, 1000.0) == 0
    assert store.addon(addon.id).step.startswith("waiting for the job queue")
    assert store.addon(addon.id).attempts == 0
    celery.down = False
    assert q.step(BROKER_DOWN_RETRY / 2, 1000.0) == 0
    assert q.step(BROKER_DOWN_RETRY, 1000.0) == 1
