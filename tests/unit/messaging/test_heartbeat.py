from messaging.heartbeat import PeerTracker


def test_peer_dies_after_silent_intervals():
    t = PeerTracker(interval=1.0, dead_after=3)
    assert t.seen("r1", {"inventory": []}, now=0.0) is True
    assert t.seen("r1", now=1.0) is False
    assert [p.name for p in t.alive(now=3.9)] == ["r1"]
    assert t.alive(now=4.1) == []
    assert [p.name for p in t.reap(now=4.1)] == ["r1"]
    assert t.seen("r1", now=5.0) is True


def test_a_beat_counts_only_from_a_known_peer_whose_loop_steps() -> None:
    t = PeerTracker(interval=0.5, dead_after=3)
    assert t.beat("r1", 0.01, now=0.0) is False         # no full heartbeat yet
    assert "r1" not in t.peers
    t.seen("r1", {"inventory": []}, now=0.0)
    assert t.beat("r1", 0.2, now=1.4)                    # keeps it alive, payload kept
    assert [p.name for p in t.alive(now=2.8)] == ["r1"]
    assert t.peers["r1"].payload == {"inventory": []}
    # a loop that has not stepped for the dead limit: the beat is not counted
    assert t.beat("r1", 1.6, now=2.9) is False
    assert [p.name for p in t.reap(now=3.0)] == ["r1"]
