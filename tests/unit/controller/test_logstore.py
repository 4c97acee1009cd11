"""LogStore: the loop only queues; a writer thread keeps the files open (LRU-bounded),
writes in order and flushes on its own; forget closes and removes; close writes all."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.logstore import LogStore, format_line

TS = 1_700_000_000.25      # 2023-11-14T22:13:20Z


def entry(line: str, proc: str = "router", **more: object) -> dict[str, object]:
    return {"line": line, "proc": proc, "ts": TS, **more}


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def open_fds_to(path: Path) -> int:
    """This process's descriptors open on `path` (also once it is unlinked)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in (str(path), f"{path} (deleted)"):
            n += 1
    return n


def wait_for(what, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.01)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    # a pass only when the test flushes, unless a test makes its own store
    s = LogStore(tmp_path, flush_interval=3600)
    yield s
    s.close()


def test_lines_reach_each_file_in_order(store: LogStore, tmp_path: Path) -> None:
    for i in range(3000):
        store.append(f"app{i % 3}", entry(f"line {i}"))
        if i % 700 == 0:
            store.flush()        # some passes in the middle, some lines left for close
    store.close()
    for a in range(3):
        got = lines_of(tmp_path / "apps" / f"app{a}.log")
        assert got == [f"2023-11-14T22:13:20 router[router]: line {i}"
                       for i in range(a, 3000, 3)]


def test_format_is_unchanged() -> None:
    assert format_line(entry("GET /", "router")) == "2023-11-14T22:13:20 router[router]: GET /"
    assert format_line(entry("up", "web", instance="abcdef123")) == \
        "2023-11-14T22:13:20 app[web.abcdef]: up"
    assert format_line({"line": "hi", "ts": 0}) == "1970-01-01T00:00:00 app[app.?]: hi"
    assert format_line(entry("deployed", "platform")) == \
        "2023-11-14T22:13:20 berth[platform]: deployed"
    assert format_line({"line": "x", "ts": TS + 1}) == "2023-11-14T22:13:21 app[app.?]: x"
    assert format_line({"line": "x", "ts": TS}) == "2023-11-14T22:13:20 app[app.?]: x"


def test_readers_see_lines_at_once_and_the_file_without_close(tmp_path: Path) -> None:
    s = LogStore(tmp_path)                 # the default flush interval
    try:
        got: list[list[dict[str, object]]] = []
        follower = threading.Thread(target=lambda: got.append(s.wait_after("web", 0, 10)[0]))
        follower.start()
        s.append("web", entry("first"))
        follower.join(10)
        assert [e["line"] for e in got[0]] == ["first"]
        assert [e["line"] for e in s.tail("web", 10)[0]] == ["first"]
        # nobody flushes or closes: the writer's own pass puts it in the file
        path = tmp_path / "apps" / "web.log"
        wait_for(lambda: lines_of(path) == ["2023-11-14T22:13:20 router[router]: first"])
        s.append("web", entry("second"))
        wait_for(lambda: len(lines_of(path)) == 2)
        assert s.open_files() == 1             # still open: no open/close per line
        assert open_fds_to(path) == 1
    finally:
        s.close()


def test_forget_closes_the_file_and_drops_what_was_queued(store: LogStore,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "apps" / "doomed.log"
    store.append("doomed", entry("one"))
    store.flush()
    assert open_fds_to(path) == 1
    store.append("doomed", entry("queued, not yet written"))
    store.forget("doomed")
    assert not path.exists()
    assert open_fds_to(path) == 0 and store.open_files() == 0
    store.append("doomed", entry("late line of a destroyed app"))
    store.flush()
    assert not path.exists()                 # neither the queued nor the late line
    assert store.tail("doomed", 10) == ([], 2)
    store.revive("doomed")
    store.append("doomed", entry("anew"))
    store.flush()
    assert lines_of(path) == ["2023-11-14T22:13:20 router[router]: anew"]


def test_beyond_max_open_the_least_recent_are_closed_and_nothing_is_lost(
        tmp_path: Path) -> None:
    s = LogStore(tmp_path, max_open=3, flush_interval=3600)
    try:
        for i in range(500):
            s.append(f"app{i % 10}", entry(f"n{i}"))
            if i % 37 == 0:
                s.flush()
                assert s.open_files() <= 3
        s.flush()
        assert s.open_files() == 3
        open_now = sum(open_fds_to(tmp_path / "apps" / f"app{a}.log") for a in range(10))
        assert open_now == 3
        for a in range(10):
            assert lines_of(tmp_path / "apps" / f"app{a}.log") == \
                [f"2023-11-14T22:13:20 router[router]: n{i}" for i in range(a, 500, 10)]
    finally:
        s.close()


def test_close_writes_what_is_queued_and_later_lines_still_land(tmp_path: Path) -> None:
    s = LogStore(tmp_path, flush_interval=3600)
    for i in range(100):
        s.append("web", entry(f"l{i}"))
    s.build_line("b1", "-----> Building")
    s.close()
    assert s.open_files() == 0 and not s._writer.is_alive()
    path = tmp_path / "apps" / "web.log"
    assert len(lines_of(path)) == 100 and open_fds_to(path) == 0
    s.append("web", entry("after close"))
    s.build_line("b1", "-----> late")
    assert lines_of(path)[-1].endswith("after close") and s.open_files() == 0
    assert lines_of(tmp_path / "builds" / "b1.log") == ["-----> Building", "-----> late"]
    s.close()                                  # twice is fine


def test_build_log_is_written_closed_when_done_and_read_after_a_restart(
        store: LogStore, tmp_path: Path) -> None:
    path = tmp_path / "builds" / "b7.log"
    for line in ("-----> Received 3 kB", "Collecting flask", "-----> Released v1"):
        store.build_line("b7", line)
    assert store.build_read("b7", 1, 0) == (["Collecting flask", "-----> Released v1"], False)
    store.flush()
    assert open_fds_to(path) == 1
    store.build_done("b7")
    store.flush()
    assert open_fds_to(path) == 0
    again = LogStore(tmp_path, flush_interval=3600)
    try:
        assert again.build_read("b7", 0, 0) == (lines_of(path), True)
        assert len(lines_of(path)) == 3
    finally:
        again.close()


def test_a_malformed_entry_does_not_stop_the_writer(store: LogStore, tmp_path: Path) -> None:
    store.append("web", {"line": "odd", "ts": "yesterday", "proc": ["x"], "instance": 5})
    store.append("web", entry("fine"))
    store.flush()
    got = lines_of(tmp_path / "apps" / "web.log")
    assert len(got) == 2 and got[0].endswith(": odd") and got[1].endswith(": fine")


def test_a_full_queue_counts_what_the_files_miss(tmp_path: Path) -> None:
    s = LogStore(tmp_path, flush_interval=3600, max_queued=10)
    try:
        for i in range(15):
            s.append("web", entry(f"l{i}"))
        assert s.dropped == 5
        assert len(s.tail("web", 100)[0]) == 15     # the readers still have them all
        s.flush()
        assert len(lines_of(tmp_path / "apps" / "web.log")) == 10
    finally:
        s.close()


def test_a_store_nobody_keeps_is_collected_with_its_writer(tmp_path: Path) -> None:
    s = LogStore(tmp_path, flush_interval=0.01)
    writer = s._writer
    del s
    gc.collect()
    writer.join(10)
    assert not writer.is_alive()


def test_readers_get_entries_by_number_across_the_ring_limit(tmp_path: Path) -> None:
    s = LogStore(tmp_path, keep=5, flush_interval=3600)
    try:
        for i in range(1, 9):                  # entries 1..8; the ring keeps 4..8
            s.append("web", entry(f"e{i}"))

        def lines(got: list[dict[str, object]]) -> list[object]:
            return [e["line"] for e in got]
        assert lines(s.tail("web", 3)[0]) == ["e6", "e7", "e8"]
        assert lines(s.tail("web", 100)[0]) == ["e4", "e5", "e6", "e7", "e8"]
        assert s.tail("web", 0) == ([], 8)
        assert s.tail("nobody", 10) == ([], 0)
        assert (lines(s.wait_after("web", 6, 0)[0]), s.wait_after("web", 6, 0)[1]) == \
            (["e7", "e8"], 8)
        assert lines(s.wait_after("web", 1, 0)[0]) == ["e4", "e5", "e6", "e7", "e8"]
        assert s.wait_after("web", 8, 0) == ([], 8)
        assert s.wait_after("web", 50, 0) == ([], 8)
        s.forget("web")
        s.revive("web")
        s.append("web", entry("e9"))           # numbers go on after a destroy
        assert lines(s.wait_after("web", 8, 0)[0]) == ["e9"]
        assert lines(s.wait_after("web", 3, 0)[0]) == ["e9"]
    finally:
        s.close()


def test_what_is_queued_is_written_at_interpreter_exit_without_close(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from controller.logstore import LogStore\n"
            "s = LogStore(Path(sys.argv[1]), flush_interval=3600)\n"
            "for i in range(1000): s.append('web', {'line': f'l{i}', 'ts': 0})\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr
    got = lines_of(tmp_path / "apps" / "web.log")
    assert got == [f"1970-01-01T00:00:00 app[app.?]: l{i}" for i in range(1000)]
