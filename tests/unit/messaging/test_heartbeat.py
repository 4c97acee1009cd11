from messaging.heartbeat import PeerTracker


def test_peer_dies_after_silent_intervals():
    t = PeerTracker(interval=1.0, dead_after=3)
    assert t.seen("r1", {"inventory": []}, now=0.0) is True
    assert t.seen("r1", now=1.0) is False
    assert [p.name for p in t.alive(now=3.9)] == ["r1"]
    assert t.alive(now=4.1) == []
    assert [p.name for p in t.reap(now=4.1)] == ["r1"]
    assert t.seen("r1", now=5.0) is True
