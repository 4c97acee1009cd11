"""runner.cgroups against the kernel: real v1 memory and pids controllers, as root.

This host mounts cgroup v1 (memory and pids under /sys/fs/cgroup); the v2 backend is
checked against a fake tree in tests/unit/runner/test_cgroups_v2.py. Every test uses
its own scope (berth/t<hex>) and removes it at the end; every process it starts has a
bounded life and is killed and reaped by PID.
"""
from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.cgroups import Cgroups, InstanceGroup, Limits
from runner.errors import LimitError

ROOT = Path("/sys/fs/cgroup")
MEMORY, PIDS = ROOT / "memory", ROOT / "pids"
MB = 1 << 20
Started = list[subprocess.Popen[str]]

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not (MEMORY.is_dir() and os.access(MEMORY, os.W_OK)),
                       reason="needs root and a writable cgroup v1 memory controller "
                              "at /sys/fs/cgroup/memory"),
]

# Joins the group before exec, so the Python that follows is limited from its start.
TRAMPOLINE = 'for f; do echo $$ > "$f" || exit 111; done; exec "$PYTHON" -c "$CODE"'

ALLOCATE_200MB = "b = b'x' * (200 << 20); print('survived', len(b))"   # touches every page

FORK_LOOP = """
import os, time
made, deadline = 0, time.monotonic() + 10
for _ in range(200):
    if time.monotonic() > deadline:
        break
    try:
        pid = os.fork()
    except BlockingIOError:
        print("EAGAIN", made, flush=True)
        break
    if pid == 0:
        time.sleep(10)
        os._exit(0)
    made += 1
else:
    print("no EAGAIN", made, flush=True)
time.sleep(10)
"""


def start_in(group: InstanceGroup, code: str, started: Started,
             stdout: int | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHON": sys.executable, "CODE": code}
    proc = subprocess.Popen(["sh", "-c", TRAMPOLINE, "sh", *map(str, group.procs_files)],
                            env=env, text=True, stdout=stdout)
    started.append(proc)
    return proc


def alive(pid: int) -> bool:
    """True for a running process; a zombie waiting for its reaper counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.fixture
def started() -> Iterator[Started]:
    """Processes a test started; killed (if still running) and reaped by PID."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def cgroups(started: Started) -> Iterator[Cgroups]:
    """A Cgroups with a scope of its own, removed with all its groups afterwards."""
    scope = "t" + secrets.token_hex(4)
    cg = Cgroups(scope)
    assert cg.version == 1, cg.why_unavailable()
    yield cg
    for app in cg.apps():
        cg.remove_app(app)
    for base in (MEMORY, PIDS):
        scope_dir = base / "berth" / scope
        if scope_dir.exists():
            scope_dir.rmdir()


def test_allocation_over_the_memory_limit_is_oom_killed(cgroups: Cgroups, started: Started) -> None:
    group = cgroups.create("hog", "web.1", Limits(memory_bytes=64 * MB, pids=0))
    assert group.oom_kills() == 0
    proc = start_in(group, ALLOCATE_200MB, started, subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out)
    assert "survived" not in out
    assert group.oom_kills() >= 1


def test_fork_loop_stops_at_pids_max_and_kill_all_ends_it(cgroups: Cgroups,
                                                          started: Started) -> None:
    group = cgroups.create("forker", "worker.1", Limits(memory_bytes=0, pids=20))
    assert group.dirs == [base / "berth" / cgroups.scope / "forker" / "worker.1"
                          for base in (MEMORY, PIDS)]
    proc = start_in(group, FORK_LOOP, started, subprocess.PIPE)
    assert proc.stdout is not None
    seen: set[int] = set()
    most, line = 0, ""
    deadline = time.monotonic() + 15
    while True:
        now = group.pids()              # sampled while the loop forks, and once after
        most = max(most, len(now))
        seen.update(now)
        if line or time.monotonic() > deadline:
            break
        if select.select([proc.stdout], [], [], 0.05)[0]:
            line = proc.stdout.readline()

    word, made = line.split()
    assert word == "EAGAIN", line
    assert int(made) == 19                  # the loop itself is the 20th
    assert most <= 20 and len(now) == 20

    group.kill_all()
    assert group.pids() == []
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert not [pid for pid in seen if alive(pid)]
    group.remove()
    group.remove()                          # idempotent
    for d in group.dirs:
        assert not d.exists()


def test_remove_app_removes_every_group_of_the_app(cgroups: Cgroups, started: Started) -> None:
    web1 = cgroups.create("shop", "web.1", Limits(64 * MB, 20))
    cgroups.create("shop", "web.2", Limits(64 * MB, 20))
    cgroups.create("blog", "web.1", Limits(64 * MB, 20))
    proc = start_in(web1, "import time; time.sleep(30)", started)
    deadline = time.monotonic() + 5
    while proc.pid not in web1.pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert web1.pids() == [proc.pid]
    assert cgroups.apps() == ["blog", "shop"]

    cgroups.remove_app("shop")

    assert proc.wait(timeout=5) == -signal.SIGKILL
    for base in (MEMORY, PIDS):
        assert not (base / "berth" / cgroups.scope / "shop").exists()
        assert (base / "berth" / cgroups.scope / "blog" / "web.1").is_dir()
    assert cgroups.apps() == ["blog"]
    cgroups.remove_app("shop")              # nothing left: still fine


def read(path: Path) -> str:
    return path.read_text().strip()


def test_memsw_follows_the_memory_limit_up_and_down(cgroups: Cgroups) -> None:
    memsw = MEMORY / "berth" / "memory.memsw.limit_in_bytes"
    group = cgroups.create("swap", "web.1", Limits(64 * MB, 20))
    mem_dir, pids_dir = group.dirs
    if not (mem_dir / "memory.memsw.limit_in_bytes").exists():
        pytest.skip(f"this kernel has no swap accounting ({memsw} absent)")
    # Raising needs memsw first, lowering needs it last: the kernel keeps memsw >= limit.
    for mb in (64, 128, 32):
        group = cgroups.create("swap", "web.1", Limits(mb * MB, 20))
        assert read(mem_dir / "memory.limit_in_bytes") == str(mb * MB)
        assert read(mem_dir / "memory.memsw.limit_in_bytes") == str(mb * MB)
        assert read(pids_dir / "pids.max") == "20"
    cgroups.create("swap", "web.1", Limits(0, 0))
    unlimited = read(MEMORY / "memory.limit_in_bytes")     # the root's: no limit
    assert read(mem_dir / "memory.limit_in_bytes") == unlimited
    assert read(mem_dir / "memory.memsw.limit_in_bytes") == unlimited
    assert read(pids_dir / "pids.max") == "max"


def test_a_limit_below_current_use_names_the_file_and_errno(cgroups: Cgroups,
                                                            started: Started) -> None:
    group = cgroups.create("busy", "web.1", Limits(64 * MB, 20))
    proc = start_in(group, "b = b'x' * (40 << 20); print('ready', flush=True); "
                           "import time; time.sleep(30)", started, subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    with pytest.raises(LimitError) as caught:
        cgroups.create("busy", "web.1", Limits(1 * MB, 20))   # no swap to reclaim into
    err = caught.value
    assert err.code == "limits"
    assert "memory.limit_in_bytes" in err.message and "EBUSY" in err.message
    assert "more memory than the new limit" in err.hint
    assert group.pids() == [proc.pid]       # a failed re-limit leaves the instance alone
