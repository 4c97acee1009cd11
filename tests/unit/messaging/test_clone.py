from messaging.clone import ClonePublisher, CloneReplica


def _route(port):
    return {"hosts": ["a.localhost"], "backends": [{"id": "i", "address": "127.0.0.1", "port": port}]}


def test_replica_follows_updates_in_order():
    pub, rep = ClonePublisher(), CloneReplica()
    rep.load(pub.snapshot())
    for port in (1, 2, 3):
        assert rep.apply(pub.set("a", _route(port)))
    assert rep.table == pub.table and rep.seq == pub.seq


def test_unchanged_value_publishes_nothing():
    pub = ClonePublisher()
    assert pub.set("a", _route(1)) is not None
    assert pub.set("a", _route(1)) is None


def test_gap_asks_for_snapshot_and_converges():
    pub, rep = ClonePublisher(), CloneReplica()
    rep.load(pub.snapshot())
    rep.apply(pub.set("a", _route(1)))
    pub.set("b", _route(2))                    # dropped on the way
    assert not rep.apply(pub.set("a", _route(3)))
    assert rep.needs_snapshot and rep.gaps == 1
    later = pub.set("c", _route(4))            # arrives while waiting for the snapshot
    rep.apply(later)
    rep.load(pub.snapshot())
    assert rep.table == pub.table and not rep.needs_snapshot


def test_tick_reveals_a_lost_last_update():
    pub, rep = ClonePublisher(), CloneReplica()
    rep.load(pub.snapshot())
    pub.set("a", _route(1))                    # lost
    rep.apply(pub.tick())
    assert rep.needs_snapshot
    rep.load(pub.snapshot())
    assert rep.table == pub.table


def test_updates_before_first_snapshot_are_replayed():
    pub, rep = ClonePublisher(), CloneReplica()
    pub.set("a", _route(1))
    snap = pub.snapshot()
    newer = pub.set("a", _route(2))
    rep.apply(newer)                           # came before the snapshot answer
    rep.load(snap)
    assert rep.table == pub.table


def test_delete_removes_entry():
    pub, rep = ClonePublisher(), CloneReplica()
    pub.set("a", _route(1))
    rep.load(pub.snapshot())
    rep.apply(pub.set("a", None))
    assert rep.table == {} == pub.table


def test_restarted_publisher_is_noticed_and_followed():
    old, rep = ClonePublisher(), CloneReplica()
    for port in (1, 2, 3):
        old.set("a", _route(port))
    rep.load(old.snapshot())
    new = ClonePublisher()                     # the controller restarted: seq from 0
    new.set("b", _route(9))
    rep.apply(new.tick())
    assert rep.needs_snapshot
    assert rep.table == old.table              # keeps serving what it had meanwhile
    rep.load(new.snapshot())
    assert rep.table == new.table and rep.seq == 1
    assert rep.apply(new.set("b", _route(10)))
