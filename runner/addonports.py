"""The addon servers' ports apps may reach on loopback.

Apps are refused every loopback port (runner/firewall.py) except those in the
firewall's `@allowed_tcp` set. The controller's heartbeat carries `addon_ports`, the
ports its ready addons' servers listen on; the runner makes the set hold them. Only
ports this runner added are ever taken out again (the table is shared by every runner
on the machine), and it remembers them in its data dir across restarts.

nft runs in a job thread (runner/jobs.py); the loop only compares lists.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from runner.firewall import Firewall
from runner.jobs import JobDone, Jobs

log = logging.getLogger(__name__)


class AddonPorts:
    def __init__(self, firewall: Firewall | None, jobs: Jobs, state_file: Path) -> None:
        self.firewall = firewall            # None: isolation is off, nothing to do
        self.jobs = jobs
        self.state_file = state_file
        self.applied: frozenset[int] | None = None     # what the set holds for us
        self.added: set[int] = set()
        self._busy = False
        self._pending: frozenset[int] | None = None
        try:
            self.added = {int(p) for p in json.loads(state_file.read_text())}
        except (OSError, ValueError, TypeError):
            pass

    def want(self, ports: Any) -> None:
        """The controller's latest list (loop thread)."""
        if self.firewall is None or not isinstance(ports, list):
            return
        wanted = frozenset(p for p in ports if isinstance(p, int) and not isinstance(p, bool)
                           and 1 <= p <= 65535)
        if wanted == self.applied:
            return
        if self._busy:
            self._pending = wanted
            return
        self._busy = True
        self.jobs.submit(("addon_ports",), self._apply, wanted, frozenset(self.added))

    def _apply(self, wanted: frozenset[int], added: frozenset[int]
               ) -> tuple[frozenset[int], set[int]]:
        """(job thread) allow what is wanted, take out what we added and is not."""
        assert self.firewall is not None
        present = self.firewall.allowed()
        now_added = set(added)
        for port in sorted(wanted - present):
            self.firewall.allow(port)
            now_added.add(port)
        for port in sorted(added - wanted):
            self.firewall.disallow(port)
            now_added.discard(port)
        return wanted, now_added

    def done(self, event: JobDone) -> None:
        """(loop thread) the job's result."""
        self._busy = False
        if event.error is not None:
            log.warning("cannot update the addon ports: %s", event.error)
            self.applied = None             # the next heartbeat tries again
        else:
            self.applied, self.added = event.result
            log.info("addon ports apps may reach: %s",
                     ", ".join(map(str, sorted(self.applied))) or "none")
            try:
                self.state_file.write_text(json.dumps(sorted(self.added)))
            except OSError as exc:
                log.warning("cannot remember the addon ports: %s", exc)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.want(list(pending))
