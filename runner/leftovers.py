"""Processes a previous run of this runner left behind.

A runner killed with SIGKILL cannot stop its instances: they run in their own
sessions and keep their ports. On start the runner adopts those that are whole
(runner/adopt.py: a record, a live leader) and ends every other process group that
still carries one of its own instance ids (BERTH_INSTANCE, set in every instance's
environment) before it takes new work. One-off runs are found the same way: each has a
dir `run-<id>` beside the instances' while it runs, and BERTH_RUN=<id> in its
environment. Instance and run ids are unique per platform, so several runners on one
machine never touch each other's processes.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _instance_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"BERTH_INSTANCE="):
            return item[len(b"BERTH_INSTANCE="):].decode(errors="replace")
        if item.startswith(b"BERTH_RUN="):
            return "run-" + item[len(b"BERTH_RUN="):].decode(errors="replace")
    return None


def find(instances_dir: Path, keep: frozenset[str] = frozenset()) -> dict[str, set[int]]:
    """{instance id: process group ids} for live processes of our old instances (but
    those in `keep`: adopted)."""
    if not instances_dir.exists():
        return {}
    ours = {p.name for p in instances_dir.iterdir() if p.is_dir()} - keep
    found: dict[str, set[int]] = {}
    if not ours:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        iid = _instance_of(int(entry))
        if iid in ours:
            try:
                found.setdefault(iid, set()).add(os.getpgid(int(entry)))
            except ProcessLookupError:
                pass
    return found


def end(instances_dir: Path, grace: float = 5.0,
        keep: frozenset[str] = frozenset()) -> list[str]:
    """SIGTERM the leftover groups, SIGKILL what remains after `grace`, then forget
    the old instance dirs, but those of the instances in `keep` (adopted). Returns
    the instance ids that had processes."""
    found = find(instances_dir, keep)
    groups = {g for gs in found.values() for g in gs}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline \
                and find(instances_dir, keep):
            time.sleep(0.1)
        if not find(instances_dir, keep):
            break
    for iid in found:
        log.warning("ended a leftover instance", extra={"instance": iid})
    if instances_dir.exists():
        for old in instances_dir.iterdir():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    return sorted(found)
