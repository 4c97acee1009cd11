"""runner.ports.free_port against the real kernel: the kernel offers a port it just
released to the next bind, so a burst of picks repeats ports (1.75 repeats per 200
picks when measured here); instances starting together must still get distinct ones."""
from __future__ import annotations

import socket

from runner import ports


def test_a_burst_of_picks_never_repeats_a_port() -> None:
    picked = [ports.free_port("127.0.0.1") for _ in range(1000)]
    assert len(set(picked)) == len(picked), sorted(
        p for p in set(picked) if picked.count(p) > 1)


def test_a_picked_port_is_free_to_bind() -> None:
    port = ports.free_port("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))     # raises if something holds it
