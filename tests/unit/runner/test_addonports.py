"""runner/addonports.py: which ports the runner adds to and takes out of the
firewall's set. The Firewall here is a test double (a set in memory); the real nft
path is tried by attempt in tests/e2e/test_addons.py."""
from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from runner.addonports import AddonPorts
from runner.jobs import JobDone, Jobs


class SetFirewall:
    def __init__(self, present: set[int]) -> None:
        self.ports = set(present)

    def allowed(self) -> set[int]:
        return set(self.ports)

    def allow(self, port: int) -> None:
        self.ports.add(port)

    def disallow(self, port: int) -> None:
        self.ports.discard(port)


def settle(ports: AddonPorts, events: queue.Queue[Any]) -> None:
    while True:
        try:
            event = events.get(timeout=5)
        except queue.Empty:
            return
        assert isinstance(event, JobDone)
        ports.done(event)
        if events.empty() and not ports._busy:
            return


def test_adds_wanted_ports_and_removes_only_its_own(tmp_path: Path):
    events: queue.Queue[Any] = queue.Queue()
    fw = SetFirewall({9999})                       # another runner's port
    ports = AddonPorts(fw, Jobs(events), tmp_path / "addon_ports.json")  # type: ignore[arg-type]
    ports.want([5432, 6379])
    settle(ports, events)
    assert fw.ports == {9999, 5432, 6379}
    ports.want([6379, 9999])
    settle(ports, events)
    assert fw.ports == {9999, 6379}                # 9999 stays: not ours to remove
    # a restarted runner remembers what it added
    again = AddonPorts(fw, Jobs(events), tmp_path / "addon_ports.json")  # type: ignore[arg-type]
    assert again.added == {6379}
    again.want([])
    settle(again, events)
    assert fw.ports == {9999}


def test_ignores_garbage_and_does_nothing_without_isolation(tmp_path: Path):
    events: queue.Queue[Any] = queue.Queue()
    off = AddonPorts(None, Jobs(events), tmp_path / "a.json")
    off.want([5432])
    assert events.empty()
    fw = SetFirewall(set())
    ports = AddonPorts(fw, Jobs(events), tmp_path / "b.json")  # type: ignore[arg-type]
    ports.want([0, 70000, True, "80", 5432])
    settle(ports, events)
    assert fw.ports == {5432}
    ports.want(None)
    assert events.empty()
