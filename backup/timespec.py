"""`--at` for restores: the time a person says, as an aware UTC datetime.

    now | 2026-11-30T14:00Z | 20261130T140000Z | 2026-11-30 14:00[:ss] [+01:00] | 14:00 yesterday |
    yesterday 14:00 | yesterday at 2pm | today 09:30 | 3 hours ago | 90m ago | 2d ago

A time without an offset is in the local time zone (of `now`, the CLI's machine)
unless the text says `UTC` (or ends in Z); the result is always UTC, and the CLI
prints it so nobody restores the wrong hour.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo

from .errors import BackupError

UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
         "hour": 3600, "d": 86400, "day": 86400, "w": 604800, "week": 604800}
AGO = re.compile(r"^(\d+)\s*([a-z]+?)s?\s+ago$")
CLOCK = re.compile(r"^(\d{1,2})(?::(\d{2}))?(?::(\d{2}))?\s*(am|pm)?$")
HINT = ("say e.g. '14:00 yesterday', 'today 09:30', '3 hours ago', '2026-11-30 14:00' "
        "(local time) or '2026-11-30T14:00Z' (UTC)")


class BadTime(BackupError):
    code = "bad_time"
    status = 400
    default_hint = HINT


def parse_at(text: str, now: datetime | None = None) -> datetime:
    """`text` as a UTC datetime; `now` (aware) fixes "now" and the local zone."""
    now = now if now is not None and now.tzinfo else datetime.now().astimezone()
    words = text.strip().lower().replace(",", " ")
    zone: tzinfo = now.tzinfo or UTC
    if re.search(r"\butc\b", words):
        zone, words = UTC, re.sub(r"\butc\b", " ", words)
    words = " ".join(words.split())
    if words == "now":
        return now.astimezone(UTC)
    if m := AGO.match(words):
        unit = UNITS.get(m.group(2))
        if unit is None:
            raise BadTime(f"--at {text!r}: unknown unit {m.group(2)!r}")
        return (now - timedelta(seconds=int(m.group(1)) * unit)).astimezone(UTC)
    try:
        text_iso = words.upper()        # also ISO basic, as in snapshot names
        if re.match(r"^\d{4}-\d\d-\d\d ", text_iso):
            text_iso = text_iso.replace(" ", "T", 1)
        iso = datetime.fromisoformat(text_iso)
        return (iso if iso.tzinfo else iso.replace(tzinfo=zone)).astimezone(UTC)
    except ValueError:
        pass
    day, clock = _split_day(words)
    if day is None or clock is None:
        raise BadTime(f"cannot read the time {text!r}")
    c = CLOCK.match(clock)
    if not c:
        raise BadTime(f"cannot read the clock time {clock!r} in {text!r}")
    hour, minute, second = int(c.group(1)), int(c.group(2) or 0), int(c.group(3) or 0)
    if c.group(4):
        if not 1 <= hour <= 12:
            raise BadTime(f"{clock!r}: an am/pm hour is 1 to 12")
        hour = hour % 12 + (12 if c.group(4) == "pm" else 0)
    if hour > 23 or minute > 59 or second > 59:
        raise BadTime(f"{clock!r} is not a time of day")
    base = now.astimezone(zone).date() - timedelta(days=day)
    return datetime(base.year, base.month, base.day, hour, minute, second,
                    tzinfo=zone).astimezone(UTC)


def _split_day(words: str) -> tuple[int | None, str | None]:
    """('14:00 yesterday' | 'yesterday at 14:00' | '14:00') -> (days back, clock)."""
    parts = [w for w in words.split() if w != "at"]
    days = {"today": 0, "yesterday": 1}
    found = [w for w in parts if w in days]
    rest = [w for w in parts if w not in days]
    if len(found) > 1 or not rest:
        return None, None
    return (days[found[0]] if found else 0), " ".join(rest)
