"""`--at` as people say it, to UTC, against a fixed now in a fixed zone."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from backup.timespec import BadTime, parse_at

PARIS = timezone(timedelta(hours=1))
NOW = datetime(2026, 12, 1, 2, 30, tzinfo=PARIS)        # 01:30 UTC


@pytest.mark.parametrize("text, expected", [
    ("now", datetime(2026, 12, 1, 1, 30, tzinfo=UTC)),
    ("14:00 yesterday", datetime(2026, 11, 30, 13, 0, tzinfo=UTC)),
    ("yesterday 14:00", datetime(2026, 11, 30, 13, 0, tzinfo=UTC)),
    ("yesterday at 2pm", datetime(2026, 11, 30, 13, 0, tzinfo=UTC)),
    ("14:00 yesterday UTC", datetime(2026, 11, 30, 14, 0, tzinfo=UTC)),
    ("today 00:15", datetime(2026, 11, 30, 23, 15, tzinfo=UTC)),
    ("12am", datetime(2026, 11, 30, 23, 0, tzinfo=UTC)),
    ("3 hours ago", datetime(2026, 11, 30, 22, 30, tzinfo=UTC)),
    ("90m ago", datetime(2026, 12, 1, 0, 0, tzinfo=UTC)),
    ("2 days ago", datetime(2026, 11, 29, 1, 30, tzinfo=UTC)),
    ("2026-11-30 14:00", datetime(2026, 11, 30, 13, 0, tzinfo=UTC)),
    ("2026-11-30T14:00Z", datetime(2026, 11, 30, 14, 0, tzinfo=UTC)),
    ("20261130T140005Z", datetime(2026, 11, 30, 14, 0, 5, tzinfo=UTC)),   # a snapshot's
    ("2026-11-30T14:00:05+02:00", datetime(2026, 11, 30, 12, 0, 5, tzinfo=UTC)),
])
def test_times_people_say(text, expected):
    got = parse_at(text, NOW)
    assert got == expected and got.tzinfo is UTC


@pytest.mark.parametrize("text", ["", "tomorrowish", "25:00 yesterday", "13pm",
                                  "yesterday today 10:00", "3 fortnights ago"])
def test_unreadable_times_say_how_to_write_them(text):
    with pytest.raises(BadTime) as err:
        parse_at(text, NOW)
    assert err.value.hint and "yesterday" in err.value.hint
