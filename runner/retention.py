"""How many releases and virtualenvs an app keeps on a host.

Every push unpacks a new release and may build a new virtualenv; without pruning a
busy app fills the disk. The newest `keep` of each stay (by modification time: a
release dir is renamed into place when complete, a venv is touched when reused),
plus whatever a running instance still uses, so a rollback to a recent release is
fast and nothing running loses its files.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from runner.isolation import AppPaths

log = logging.getLogger(__name__)


def _prune(parent: Path, keep: int, in_use: set[Path]) -> list[str]:
    if not parent.is_dir():
        return []
    entries = [p for p in parent.iterdir()
               if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    gone = []
    for old in entries[keep:]:
        if old in in_use:
            continue
        shutil.rmtree(old, ignore_errors=True)
        gone.append(old.name)
    return gone


def prune_app(paths: AppPaths, keep: int, releases_in_use: set[Path],
              venvs_in_use: set[Path]) -> tuple[list[str], list[str]]:
    """Remove releases and venvs beyond the newest `keep` that nothing runs."""
    releases = _prune(paths.releases, keep, releases_in_use)
    venvs = _prune(paths.venvs, keep, venvs_in_use)
    if releases or venvs:
        log.info("pruned", extra={"app": paths.root.name, "releases": len(releases),
                                  "venvs": len(venvs)})
    return releases, venvs
