"""backup.retention: a pure plan, tested per boundary and across a simulated year
(an injected clock, no sleeps)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from backup.errors import InvalidPolicy
from backup.retention import Policy, label, plan


@dataclass(frozen=True)
class Snap:
    time: datetime


def at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


def kept(snaps, now, policy):
    return [s.time for s, keep, _ in plan(snaps, now, Policy.parse(policy)) if keep]


def every(start: datetime, end: datetime, step: timedelta) -> list[Snap]:
    out, t = [], start
    while t <= end:
        out.append(Snap(t))
        t += step
    return out


# -- parsing -------------------------------------------------------------------------

def test_parse_the_issue_policy():
    p = Policy.parse("24h 7d 4w 12m")
    assert p.counts == (("h", 24), ("d", 7), ("w", 4), ("m", 12))
    assert p.minimum == 1
    assert str(Policy.parse("12m 24h min=3")) == "24h 12m min=3"


@pytest.mark.parametrize("text", ["", "min=3", "24x", "24h 3h", "h", "-1d", "24 h"])
def test_parse_refuses(text):
    with pytest.raises(InvalidPolicy) as err:
        Policy.parse(text)
    assert err.value.hint


# -- boundaries ------------------------------------------------------------------------

def test_hourly_window_is_now_hour_and_the_23_before():
    now = at("2026-11-30T22:15:00")
    snaps = every(at("2026-11-28T00:00:00"), now, timedelta(minutes=15))
    got = kept(snaps, now, "24h")
    # first of each hour 2026-11-29T23 .. 2026-11-30T22, nothing of 2026-11-29T22
    assert got == [at("2026-11-29T23:00:00") + timedelta(hours=i) for i in range(24)] + [now]


def test_first_of_the_hour_is_kept_not_the_last():
    now = at("2026-11-30T22:59:59")
    snaps = [Snap(at("2026-11-30T21:59:59")), Snap(at("2026-11-30T22:00:00")),
             Snap(at("2026-11-30T22:30:00")), Snap(now)]
    assert kept(snaps, now, "2h") == [at("2026-11-30T21:59:59"), at("2026-11-30T22:00:00"), now]


def test_day_boundary_is_utc_midnight():
    now = at("2026-11-30T12:00:00")
    snaps = [Snap(at("2026-11-28T23:59:59")), Snap(at("2026-11-29T00:00:00")),
             Snap(at("2026-11-29T12:00:00")), Snap(at("2026-11-30T00:00:00")), Snap(now)]
    # 2d: today and yesterday; the 28th's last second is outside
    assert kept(snaps, now, "2d") == [at("2026-11-29T00:00:00"), at("2026-11-30T00:00:00"), now]


def test_times_in_other_zones_are_bucketed_in_utc():
    plus2 = timezone(timedelta(hours=2))
    now = at("2026-11-30T12:00:00")
    # 01:00 at +02:00 on the 30th is 23:00 UTC on the 29th: yesterday, not today
    early = Snap(datetime(2026, 11, 30, 1, 0, tzinfo=plus2))
    first_today = Snap(at("2026-11-30T00:30:00"))
    decisions = plan([early, first_today, Snap(now)], now, Policy.parse("1d"))
    assert [keep for _, keep, _ in decisions] == [False, True, True]
    assert decisions[0][2] == "pruned: older than every window (the widest is 1 days)"


def test_week_boundary_is_monday_and_iso_weeks_cross_years():
    assert label("w", at("2027-01-01T00:00:00")) == "week 2026-W53"
    assert label("w", at("2027-01-04T00:00:00")) == "week 2027-W01"
    now = at("2026-11-30T08:00:00")            # a Monday, week 49
    snaps = [Snap(at("2026-11-22T23:00:00")),   # Sunday of W47
             Snap(at("2026-11-23T00:00:00")),   # Monday of W48
             Snap(at("2026-11-29T23:59:59")),   # Sunday of W48
             Snap(at("2026-11-30T00:00:00")),   # Monday of W49
             Snap(now)]
    decisions = plan(snaps, now, Policy.parse("2w"))
    assert [keep for _, keep, _ in decisions] == [False, True, False, True, True]
    assert decisions[1][2] == "kept: first of week 2026-W48"
    assert decisions[2][2] == "pruned: not the first of week 2026-W48"


def test_month_boundary_and_twelve_months():
    now = at("2026-11-30T22:00:00")
    snaps = every(at("2025-10-01T00:00:00"), now, timedelta(days=1))
    got = kept(snaps, now, "12m")
    firsts = [at(f"{y}-{m:02d}-01T00:00:00") for y, m in
              [(2025, 12)] + [(2026, m) for m in range(1, 12)]]
    assert got == firsts + [at("2026-11-30T00:00:00")]    # + the newest


def test_newest_is_always_kept_even_outside_every_window():
    now = at("2026-11-30T22:00:00")
    snaps = [Snap(at("2026-01-01T00:00:00")), Snap(at("2026-02-01T00:00:00"))]
    decisions = plan(snaps, now, Policy.parse("24h"))
    assert [keep for _, keep, _ in decisions] == [False, True]
    assert decisions[1][2] == "kept: newest"


def test_minimum_keeps_the_n_newest():
    now = at("2026-11-30T22:00:00")
    snaps = [Snap(at(f"2026-01-0{d}T00:00:00")) for d in range(1, 6)]
    decisions = plan(snaps, now, Policy.parse("1h min=3"))
    assert [keep for _, keep, _ in decisions] == [False, False, True, True, True]
    assert decisions[2][2] == "kept: one of the 3 newest (#3)"


def test_snapshot_after_now_is_kept_and_said_so():
    now = at("2026-11-30T22:00:00")
    future = Snap(at("2026-12-01T00:00:00"))
    decisions = plan([Snap(now), future], now, Policy.parse("1h"))
    assert all(keep for _, keep, _ in decisions)
    assert "clock skew" in decisions[1][2]


def test_reasons_name_every_rule_that_keeps():
    now = at("2026-11-30T22:00:00")
    monday = Snap(at("2026-11-30T00:00:00"))
    decisions = plan([monday, Snap(now)], now, Policy.parse("24h 7d 4w 12m"))
    assert decisions[0][2] == ("kept: first of hour 2026-11-30T00; first of day 2026-11-30; "
                               "first of week 2026-W49; first of month 2026-11")
    assert decisions[1][2] == "kept: newest; first of hour 2026-11-30T22"


def test_empty_and_order_independent():
    now = at("2026-11-30T22:00:00")
    assert plan([], now, Policy.parse("24h")) == []
    snaps = every(at("2026-11-29T00:00:00"), now, timedelta(hours=5))
    assert plan(list(reversed(snaps)), now, Policy.parse("6h 2d")) == \
        plan(snaps, now, Policy.parse("6h 2d"))


# -- a simulated year ------------------------------------------------------------------

def test_a_year_of_hourly_snapshots_pruned_every_hour():
    """Hourly snapshots for a year, pruned after each one (an injected clock): what is
    left is exactly what the policy names, counted independently."""
    policy = Policy.parse("24h 7d 4w 12m")
    start = at("2025-11-01T00:00:00")
    end = at("2026-11-30T22:00:00")
    live: list[Snap] = []
    t = start
    while t <= end:
        live.append(Snap(t))
        live = [s for s, keep, _ in plan(live, t, policy) if keep]
        t += timedelta(hours=1)
    got = {s.time for s in live}

    hourly = {end - timedelta(hours=i) for i in range(24)}
    daily = {datetime.combine(end.date() - timedelta(days=i), datetime.min.time(), UTC)
             for i in range(7)}
    monday = end.date() - timedelta(days=end.weekday())
    weekly = {datetime.combine(monday - timedelta(weeks=i), datetime.min.time(), UTC)
              for i in range(4)}
    months = [(2026, m) for m in range(11, 0, -1)] + [(2025, 12)]
    monthly = {datetime.combine(date(y, m, 1), datetime.min.time(), UTC) for y, m in months}
    assert got == hourly | daily | weekly | monthly
    # today's midnight is an hourly, and this Monday (today) a daily too
    assert len(got) == 24 + 6 + 3 + 12
    # the same as planning once at the end (keeping firsts makes pruning stable)
    everything = every(start, end, timedelta(hours=1))
    assert {s.time for s, keep, _ in plan(everything, end, policy) if keep} == got
