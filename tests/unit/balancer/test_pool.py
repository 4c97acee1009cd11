"""Backend choice (least outstanding of two random choices), down-marking with
backoff, idle connection bookkeeping."""
from __future__ import annotations

import random

from balancer.pool import Pool
from messaging.shapes import Backend, Route


def backend_key(entry: Backend) -> str:
    return entry.key


def entries(n: int) -> list[Backend]:
    return [Backend(f"i{i}", "127.0.0.2", 5000 + i) for i in range(n)]


def table(es: list[Backend]) -> dict[str, Route]:
    return {"app": Route(hosts=("a",), backends=tuple(es))}


def test_two_choices_prefer_fewer_outstanding() -> None:
    pool = Pool(random.Random(1))
    es = entries(2)
    pool.sync(table(es))
    busy = pool.backends[backend_key(es[0])]
    for _ in range(3):
        pool.acquire(busy)
    for _ in range(20):
        assert pool.choose(es, set(), 0.0).key == backend_key(es[1])


def test_choice_spreads_over_backends() -> None:
    pool = Pool(random.Random(2))
    es = entries(4)
    pool.sync(table(es))
    counts: dict[str, int] = {}
    for _ in range(400):
        b = pool.choose(es, set(), 0.0)
        pool.acquire(b)            # requests stay outstanding: load must spread
        counts[b.key] = counts.get(b.key, 0) + 1
    assert len(counts) == 4 and max(counts.values()) - min(counts.values()) <= 40


def test_down_backend_is_skipped_until_backoff_ends() -> None:
    pool = Pool(random.Random(3), base_backoff=1.0, max_backoff=4.0)
    es = entries(2)
    pool.sync(table(es))
    down = pool.backends[backend_key(es[0])]
    assert pool.mark_down(down, 100.0) == 1.0
    assert all(pool.choose(es, set(), 100.5).key == backend_key(es[1]) for _ in range(20))
    assert down.is_up(101.0)
    assert pool.mark_down(down, 100.5) == 0.5     # concurrent failures do not compound
    assert pool.mark_down(down, 101.0) == 2.0     # doubles
    assert pool.mark_down(down, 103.0) == 4.0
    assert pool.mark_down(down, 107.0) == 4.0     # capped
    pool.mark_up(down)
    assert down.is_up(107.0) and down.failures == 0


def test_exclude_and_all_down_fallback() -> None:
    pool = Pool(random.Random(4))
    es = entries(3)
    pool.sync(table(es))
    b0, b1, b2 = (pool.backends[backend_key(e)] for e in es)
    pool.mark_down(b0, 10.0)
    pool.mark_down(b1, 10.0)
    pool.mark_down(b1, 10.0)          # b1's backoff ends later than b0's
    assert pool.choose(es, {b2.key}, 10.1) is b0   # all left are down: soonest back
    assert pool.choose(es, {b0.key, b1.key, b2.key}, 10.1) is None


def test_sync_keeps_state_and_returns_idle_of_removed() -> None:
    pool = Pool()
    es = entries(2)
    pool.sync(table(es))
    keep = pool.backends[backend_key(es[0])]
    gone = pool.backends[backend_key(es[1])]
    pool.mark_down(keep, 0.0)
    pool.put_idle(gone, "conn-g", 0.0)
    assert pool.sync(table(es[:1])) == ["conn-g"]
    assert pool.backends[backend_key(es[0])] is keep and keep.failures == 1
    assert pool.put_idle(gone, "late", 0.0) == ["late"]   # not in the table any more


def test_idle_connections_expire_and_overflow() -> None:
    pool = Pool(max_idle=2, idle_ttl=5.0)
    es = entries(1)
    pool.sync(table(es))
    b = pool.backends[backend_key(es[0])]
    assert pool.put_idle(b, "c1", 0.0) == []
    assert pool.put_idle(b, "c2", 1.0) == []
    assert pool.put_idle(b, "c3", 2.0) == ["c1"]
    conn, expired = pool.take_idle(b, 6.5)      # c2 is past its TTL
    assert conn == "c3" and expired == ["c2"]
    assert pool.take_idle(b, 7.0) == (None, [])
