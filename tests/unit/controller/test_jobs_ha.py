"""The periodic ha check: every postgres ha addon's primary is watched, bounded in
time; one whose watch fails over is reported, one whose watch raises does not stop the
others. A double stands in for the Provisioner (the real failover is tested in
tests/integration/test_dbprovision_ha.py)."""
from __future__ import annotations

from typing import Any

import pytest

from controller import jobs


class FakeProvisioner:
    def __init__(self) -> None:
        self.watched: list[tuple[str, dict[str, Any]]] = []

    def ha_addons(self) -> list[str]:
        return ["pg-dead", "pg-fine", "pg-broken"]

    def watch(self, addon_id: str, **kwargs: Any) -> bool:
        self.watched.append((addon_id, kwargs))
        if addon_id == "pg-broken":
            raise RuntimeError("standby behind")
        return addon_id == "pg-dead"


def test_check_ha_watches_each_ha_addon_bounded(monkeypatch: pytest.MonkeyPatch):
    fake = FakeProvisioner()
    monkeypatch.setattr(jobs, "_provisioner", fake)
    assert jobs.check_ha() == {"pg-dead": True, "pg-fine": False}
    assert [a for a, _ in fake.watched] == ["pg-dead", "pg-fine", "pg-broken"]
    for _, kwargs in fake.watched:
        assert kwargs["failures"] == jobs.HA_FAILURES
        assert kwargs["max_seconds"] <= 10


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
