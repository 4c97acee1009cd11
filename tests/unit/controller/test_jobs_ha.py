"""The periodic ha check: every postgres ha addon's primary is watched, bounded in
time; a fenced node is rebuilt; every ha addon's credentials as they stand are
reported as `moved`; one whose watch raises does not stop the others. Doubles stand
in for the Provisioner and the API (the real failover is tested in
tests/integration/test_dbprovision_ha.py, and through the platform in
tests/integration/test_addon_jobs.py)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from controller import jobs


class FakeProvisioner:
    def __init__(self) -> None:
        self.watched: list[tuple[str, dict[str, Any]]] = []
        self.rejoined: list[str] = []

    def ha_addons(self, engine: str = "postgres") -> list[str]:
        return ["pg-dead", "pg-fine", "pg-broken"] if engine == "postgres" else ["rd-ha"]

    def watch(self, addon_id: str, **kwargs: Any) -> bool:
        self.watched.append((addon_id, kwargs))
        if addon_id == "pg-broken":
            raise RuntimeError("standby behind")
        return addon_id == "pg-dead"

    def needs_rejoin(self, addon_id: str) -> tuple[str, str] | None:
        return ("127.0.0.2", "127.0.0.3", time.time() - 60) \
            if addon_id == "pg-dead" and addon_id not in self.rejoined else None

    def rejoin(self, addon_id: str) -> None:
        self.rejoined.append(addon_id)

    def services(self, addon_id: str) -> list[Any]:
        return []

    def live_credentials(self, addon_id: str) -> Any:
        from dbprovision.service import Credentials
        return Credentials(url=f"x://{addon_id}", env={"X": addon_id}, host="h", port=1,
                           extra={})


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if path == "/v1/platform/hosts":
            return {"live": ["127.0.0.2"], "lost": []}
        self.calls.append((method, path, body))
        return {}


def test_check_ha_watches_each_ha_addon_bounded(monkeypatch: pytest.MonkeyPatch):
    fake, api = FakeProvisioner(), FakeApi()
    monkeypatch.setattr(jobs, "_provisioner", fake)
    monkeypatch.setattr(jobs, "api", lambda: api)
    monkeypatch.setattr(jobs, "_settings", SimpleNamespace(heartbeat_interval=1.0,
                                                           dead_after=5))
    locked: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def lock(addon_id: str, wait: float = 120) -> Iterator[None]:
        locked.append((addon_id, wait))     # the real one is a lock in the broker
        yield
    monkeypatch.setattr(jobs, "addon_lock", lock)
    assert jobs.check_ha() == {
        "pg-dead": "failed over to the standby; old primary rebuilt as standby",
        "pg-fine": "ok", "pg-broken": "check failed", "rd-ha": "ok"}
    assert [a for a, _ in fake.watched] == ["pg-dead", "pg-fine", "pg-broken"]
    for _, kwargs in fake.watched:
        assert kwargs["failures"] == jobs.HA_FAILURES
        assert kwargs["max_seconds"] <= 10
        assert kwargs["once"] is True       # a healthy pair ends the run at once
    assert fake.rejoined == ["pg-dead"]
    # each addon checked under its lock, never waiting for it
    assert locked == [(a, 0) for a in ("pg-dead", "pg-fine", "pg-broken", "rd-ha")]
    reported = {path.split("/")[4]: body for _, path, body in api.calls}
    assert set(reported) == {"pg-dead", "pg-fine", "rd-ha"}
    assert all(b["op"] == "moved" and b["outcome"] == "done" for b in reported.values())
    assert reported["rd-ha"]["credentials"]["env"] == {"X": "rd-ha"}


def test_beat_schedules_the_ha_check(monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace
    monkeypatch.setattr(jobs, "_settings", jobs._settings)      # restored afterwards
    saved = (jobs.app.conf.broker_url, jobs.app.conf.beat_schedule)
    try:
        app = jobs.configure(SimpleNamespace(broker_url="redis://127.0.0.1:1/0",
                                             quota_check_seconds=60.0, ha_check_seconds=5.0))
        assert app.conf.beat_schedule["check-ha"] == {"task": jobs.CHECK_HA,
                                                      "schedule": 5.0}
    finally:
        jobs.app.conf.broker_url, jobs.app.conf.beat_schedule = saved
