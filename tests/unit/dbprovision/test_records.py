"""Addon records survive a crash as written, stay private, and the per-addon lock
excludes a second holder."""
from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

import pytest

from dbprovision.errors import AddonBusy
from dbprovision.records import AddonRecord, Records


def test_put_get_delete(tmp_path: Path):
    records = Records(tmp_path)
    record = AddonRecord("a-1", "postgres", "shared", "addon_a_1_00000000", "pw", "127.0.0.1")
    records.put(record)
    assert records.get(record.name) == record
    mode = (records.dir / f"{record.name}.json").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600 and stat.S_IMODE(records.dir.stat().st_mode) == 0o700
    assert records.all() == [record]
    records.delete(record.name)
    records.delete(record.name)
    assert records.get(record.name) is None


def _hold(root: str, ready, release) -> None:
    with Records(Path(root)).lock("x"):
        ready.set()
        release.wait(10)


def test_lock_excludes_another_process(tmp_path: Path):
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(AddonBusy), Records(tmp_path).lock("x", timeout=0.2):
            pass
        with Records(tmp_path).lock("y", timeout=0.2):
            pass
    finally:
        release.set()
        holder.join(10)
    with Records(tmp_path).lock("x", timeout=2):
        pass
