"""Which snapshots a retention policy keeps: pure, with a reason for every decision
(what `--dry-run` prints).

A policy is counts of periods, `24h 7d 4w 12m` (and `y` for years), plus `min=N`:
- for each unit with a count n, the n most recent periods of that unit (the period
  holding `now` and the n-1 before it) each keep their *first* snapshot;
- the newest snapshot is always kept, and so are the `min` newest;
- snapshots dated after `now` (a clock that went back) are kept and said so.
Periods are UTC: hours, days, ISO weeks (Monday 00:00), calendar months and years.

Borrowed from btrbk (digint/btrbk, `schedule()` and btrbk.conf's RETENTION POLICY):
the `NNh NNd NNw NNm NNy` syntax; keeping the *first* snapshot of each period rather
than the last, so what a period keeps never changes as newer snapshots arrive (the
weekly is the first daily of the week, the monthly the first weekly-or-daily of the
month); windows counted from now's own period; and a minimum that is always kept
(btrbk's `*_preserve_min`, here a count). Not borrowed: btrbk's preserve_day_of_week /
preserve_hour_of_day shifts (UTC midnight and Monday are the boundaries here).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from .errors import InvalidPolicy

UNITS = {"h": "hour", "d": "day", "w": "week", "m": "month", "y": "year"}
ORDER = "hdwmy"
TOKEN = re.compile(r"^(\d+)([hdwmy])$")
MIN_TOKEN = re.compile(r"^min=(\d+)$")


@dataclass(frozen=True)
class Policy:
    counts: tuple[tuple[str, int], ...]     # (unit letter, count), in ORDER
    minimum: int = 1

    @classmethod
    def parse(cls, text: str) -> Policy:
        counts: dict[str, int] = {}
        minimum = 1
        for token in text.split():
            if m := TOKEN.match(token):
                unit = m.group(2)
                if unit in counts:
                    raise InvalidPolicy(f"retention policy {text!r} names {UNITS[unit]}s twice")
                counts[unit] = int(m.group(1))
            elif m := MIN_TOKEN.match(token):
                minimum = max(1, int(m.group(1)))
            else:
                raise InvalidPolicy(f"retention policy {text!r}: cannot read {token!r}")
        if not counts:
            raise InvalidPolicy(f"retention policy {text!r} keeps no period")
        return cls(tuple((u, counts[u]) for u in ORDER if u in counts), minimum)

    def __str__(self) -> str:
        return " ".join(f"{n}{u}" for u, n in self.counts) + f" min={self.minimum}"


def period(unit: str, t: datetime) -> tuple[int, ...]:
    """A sortable key of the UTC period of `unit` holding `t`."""
    t = t.astimezone(UTC)
    if unit == "h":
        return (t.year, t.month, t.day, t.hour)
    if unit == "d":
        return (t.year, t.month, t.day)
    if unit == "w":
        iso = t.isocalendar()
        return (iso.year, iso.week)
    if unit == "m":
        return (t.year, t.month)
    return (t.year,)


def label(unit: str, t: datetime) -> str:
    """How a period reads in a reason: hour 2026-11-30T22, day 2026-11-30, week
    2026-W48, month 2026-11, year 2026."""
    t = t.astimezone(UTC)
    if unit == "h":
        text = t.strftime("%Y-%m-%dT%H")
    elif unit == "d":
        text = t.strftime("%Y-%m-%d")
    elif unit == "w":
        iso = t.isocalendar()
        text = f"{iso.year}-W{iso.week:02d}"
    elif unit == "m":
        text = t.strftime("%Y-%m")
    else:
        text = t.strftime("%Y")
    return f"{UNITS[unit]} {text}"


def periods_between(unit: str, older: datetime, newer: datetime) -> int:
    """How many periods of `unit` lie from `older`'s to `newer`'s (0: the same)."""
    a, b = older.astimezone(UTC), newer.astimezone(UTC)
    if unit == "h":
        start_a = a.replace(minute=0, second=0, microsecond=0)
        start_b = b.replace(minute=0, second=0, microsecond=0)
        return int((start_b - start_a).total_seconds() // 3600)
    if unit == "d":
        return (b.date() - a.date()).days
    if unit == "w":
        monday_a = a.date().toordinal() - a.weekday()
        monday_b = b.date().toordinal() - b.weekday()
        return (monday_b - monday_a) // 7
    if unit == "m":
        return (b.year - a.year) * 12 + b.month - a.month
    return b.year - a.year


class Dated(Protocol):
    @property
    def time(self) -> datetime: ...


S = TypeVar("S", bound=Dated)


def plan(snapshots: Sequence[S], now: datetime, policy: Policy) -> list[tuple[S, bool, str]]:
    """For each snapshot (any order in, oldest first out): keep or not, and why."""
    ordered = sorted(snapshots, key=lambda s: s.time)
    reasons: dict[int, list[str]] = {i: [] for i in range(len(ordered))}
    past = [i for i, s in enumerate(ordered) if s.time <= now]
    for i, s in enumerate(ordered):
        if s.time > now:
            reasons[i].append(f"dated after now ({now:%Y-%m-%dT%H:%M:%SZ}): clock skew?")
    if past:
        reasons[past[-1]].append("newest")
        for rank, i in enumerate(reversed(past[-policy.minimum:][:-1]), start=2):
            reasons[i].append(f"one of the {policy.minimum} newest (#{rank})")
    for unit, count in policy.counts:
        seen: set[tuple[int, ...]] = set()
        for i in past:      # oldest first: the first seen in a period is its first
            t = ordered[i].time
            key = period(unit, t)
            if key in seen:
                continue
            seen.add(key)
            if periods_between(unit, t, now) < count:
                reasons[i].append(f"first of {label(unit, t)}")
    out: list[tuple[S, bool, str]] = []
    for i, s in enumerate(ordered):
        if reasons[i]:
            out.append((s, True, "kept: " + "; ".join(reasons[i])))
        else:
            out.append((s, False, "pruned: " + _why_not(s.time, now, policy)))
    return out


def _why_not(t: datetime, now: datetime, policy: Policy) -> str:
    inside = [(u, n) for u, n in policy.counts if periods_between(u, t, now) < n]
    if not inside:
        widest_unit, widest = policy.counts[-1]
        return f"older than every window (the widest is {widest} {UNITS[widest_unit]}s)"
    return "not the first of " + ", ".join(label(u, t) for u, _ in inside)
