"""The lease rules (controller/locks.py) over a real SQLite store, with a hand-driven
clock."""
from __future__ import annotations

from pathlib import Path

import pytest

from controller.locks import LeaseTable
from controller.store import Store
from messaging.errors import BerthError, LeaseBusy, LeaseLost


def table(tmp_path: Path, now: float = 100.0) -> LeaseTable:
    return LeaseTable(Store(tmp_path / "state.db"), now)


def test_grant_renew_release_and_fences_only_grow(tmp_path):
    t = table(tmp_path)
    lease, new = t.acquire("deploy/a", "b1", 10, 100.0)
    assert new and lease.fence == 1 and lease.expires_in == 10
    with pytest.raises(LeaseBusy, match="held by b1"):
        t.acquire("deploy/a", "b2", 10, 105.0)
    same, new = t.acquire("deploy/a", "b1", 10, 105.0)     # the owner again: a renewal
    assert not new and same.fence == 1
    assert t.renew("deploy/a", "b1", 1, 10, 110.0).expires_in == 10
    t.release("deploy/a", "b1", 1, 111.0)
    with pytest.raises(LeaseLost):
        t.release("deploy/a", "b1", 1, 111.0)
    assert t.acquire("deploy/a", "b2", 10, 112.0)[0].fence == 2


def test_the_watchdog_frees_expired_leases_and_the_old_holder_cannot_renew(tmp_path):
    t = table(tmp_path)
    t.acquire("rec/1", "w1", 5, 100.0)
    t.acquire("rec/2", "w2", 50, 100.0)
    assert t.expire(104.9) == []
    gone = t.expire(105.0)
    assert [(g.name, g.owner, g.fence) for g in gone] == [("rec/1", "w1", 1)]
    with pytest.raises(LeaseLost, match="no longer w1's"):
        t.renew("rec/1", "w1", 1, 5, 105.1)
    assert t.acquire("rec/1", "w3", 5, 105.2)[0].fence == 3     # one counter for all
    assert t.holder("rec/2", 106.0).owner == "w2"


def test_an_expired_lease_is_granted_even_before_the_watchdog_ran(tmp_path):
    t = table(tmp_path)
    t.acquire("rec/1", "w1", 5, 100.0)
    lease, new = t.acquire("rec/1", "w2", 5, 106.0)
    assert new and lease.fence == 2


def test_a_restarted_table_keeps_leases_and_gives_holders_one_ttl(tmp_path):
    t = table(tmp_path)
    t.acquire("rec/1", "w1", 5, 100.0)
    again = LeaseTable(t.store, now=200.0)      # the controller was away 100 s
    with pytest.raises(LeaseBusy):
        again.acquire("rec/1", "w2", 5, 201.0)
    assert again.renew("rec/1", "w1", 1, 5, 204.0).fence == 1
    assert again.expire(210.0)[0].owner == "w1"
    assert again.acquire("rec/1", "w2", 5, 210.0)[0].fence == 2


@pytest.mark.parametrize("name,owner,ttl,needle", [
    ("", "w", 5, "invalid lease name"),
    ("../x", "w", 5, "invalid lease name"),
    ("a" * 201, "w", 5, "invalid lease name"),
    ("ok", "", 5, "owner"),
    ("ok", "w", 0.01, "ttl"),
    ("ok", "w", 7200, "ttl"),
])
def test_bad_requests_say_what_is_wrong(tmp_path, name, owner, ttl, needle):
    with pytest.raises(BerthError, match=needle) as err:
        table(tmp_path).acquire(name, owner, ttl, 100.0)
    assert err.value.hint


def test_fences_never_repeat_across_restarts_even_when_nothing_is_held(tmp_path):
    t = table(tmp_path)
    for i in range(3):
        lease, _ = t.acquire(f"rec/{i}", "w", 5, 100.0)
        t.release(lease.name, "w", lease.fence, 100.0)
    assert t.leases == {}
    again = LeaseTable(t.store, now=200.0)
    assert again.acquire("rec/0", "w", 5, 200.0)[0].fence == 4
    assert sorted(r[0] for r in t.store.leases()) == ["#fence", "rec/0"]


def test_renewals_move_the_deadline_the_watchdog_sees(tmp_path):
    t = table(tmp_path)
    t.acquire("rec/1", "w1", 5, 100.0)
    t.renew("rec/1", "w1", 1, 5, 104.0)
    assert t.expire(105.0) == []               # the first deadline passed, renewed
    assert [g.owner for g in t.expire(109.0)] == ["w1"]
