from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from backup.errors import BadSnapshotName
from backup.snapshots import parse_name, snapshot_name


def test_name_is_volume_at_utc_iso_basic():
    t = datetime(2026, 11, 30, 22, 15, tzinfo=UTC)
    assert snapshot_name("app-data", t) == "app-data@20261130T221500Z"
    local = t.astimezone(timezone(timedelta(hours=-5)))
    assert snapshot_name("app-data", local) == "app-data@20261130T221500Z"
    assert parse_name("app-data@20261130T221500Z") == ("app-data", t)


@pytest.mark.parametrize("name", ["app@2026-11-30T22:15:00Z", "app@20261130T221500",
                                  "@20261130T221500Z", "a/b@20261130T221500Z",
                                  "app@20261331T221500Z", "app"])
def test_bad_names(name):
    with pytest.raises(BadSnapshotName):
        parse_name(name)
