"""Adoption records and taking a process over (runner/adopt.py), with real processes."""
from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from runner.adopt import RECORD, AdoptedProcess, Record, find, take
from runner.process import ProcessOps, describe_exit, exited_unreaped

PRINTER = [sys.executable, "-c", "import sys, time; print('one', flush=True); "
           "sys.stdin.close(); time.sleep(0.3); print('two', flush=True); time.sleep(30)"]


def record(instance: str, pid: int = 0) -> Record:
    return Record(instance=instance, app="demo", release=2, proc="web", command="x",
                  env={"SECRET": "s"}, slug="a" * 64, slug_url="http://x/", host_header=None,
                  memory_mb=None, pids_max=None, manifest={}, pid=pid, port=8123,
                  generation=3, restarts=1, release_dir="/r", venv_bin="/v/bin",
                  data_dir=None, control_socket=False, static=("/r/.berth/static", "/static/"))


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[tuple[Path, object]]:
    """A process spawned as the runner spawns instances, with BERTH_INSTANCE=i1."""
    procs = []

    def start(instance: str = "i1", env_instance: str | None = None):
        proc = ProcessOps().spawn(PRINTER, tmp_path, {
            **os.environ, "BERTH_INSTANCE": env_instance or instance})
        procs.append(proc)
        return proc
    yield start  # type: ignore[misc]
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def test_a_record_round_trips_and_stays_root_only(tmp_path: Path) -> None:
    d = tmp_path / "i1"
    d.mkdir()
    rec = record("i1", pid=1234)
    rec.write(d)
    assert (d / RECORD).stat().st_mode & 0o777 == 0o600
    assert Record.read(d) == rec
    other = tmp_path / "i2"         # a record must name its own dir
    other.mkdir()
    (other / RECORD).write_text((d / RECORD).read_text())
    assert Record.read(other) is None
    (d / RECORD).write_text(json.dumps({**json.loads((d / RECORD).read_text()), "v": 99}))
    assert Record.read(d) is None
    (d / RECORD).write_text("{not json")
    assert Record.read(d) is None


def test_take_adopts_the_leader_and_reads_on_its_output(tmp_path: Path, spawned) -> None:
    proc = spawned()
    assert proc.stdout.readline() == b"one\n"
    proc.stdout.close()             # the runner that read it is gone...
    proc.stderr.close()
    adopted = take(record("i1", proc.pid))
    assert isinstance(adopted, AdoptedProcess)
    # ...and what the process writes next waits in the pipe for the next reader
    assert adopted.stdout is not None and adopted.stdout.readline() == b"two\n"
    assert adopted.poll() is None and not exited_unreaped(adopted)
    os.killpg(proc.pid, signal.SIGKILL)
    assert adopted.wait(5) is None          # exited; the status is not ours to know
    assert exited_unreaped(adopted)
    assert describe_exit(None).startswith("exited (status unknown")


def test_take_refuses_a_process_that_is_not_the_instance(tmp_path: Path, spawned) -> None:
    proc = spawned(env_instance="someone-else")
    assert take(record("i1", proc.pid)) is None
    assert take(record("i1", 2 ** 22 + 12345)) is None     # no such pid


def test_find_skips_runs_dead_leaders_and_dirs_without_records(tmp_path: Path,
                                                               spawned) -> None:
    alive = spawned("i1")
    dead = spawned("i2")
    os.killpg(dead.pid, signal.SIGKILL)
    dead.wait(5)
    for iid, pid in (("i1", alive.pid), ("i2", dead.pid)):
        (tmp_path / iid).mkdir()
        replace(record(iid), pid=pid).write(tmp_path / iid)
    (tmp_path / "i3").mkdir()
    (tmp_path / "run-r1").mkdir()
    found = find(tmp_path)
    assert [(r.instance, p.pid) for r, p in found] == [("i1", alive.pid)]
