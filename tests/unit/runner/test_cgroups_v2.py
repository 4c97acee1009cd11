"""The cgroup v2 backend of runner.cgroups against a FAKE cgroup tree in tmp_path.

It is a fake because this host mounts cgroup v1: the memory and pids controllers are
bound to the v1 hierarchies under /sys/fs/cgroup, so the v2 tree at
/sys/fs/cgroup/unified offers neither and a v2 memory controller cannot run here. The
real kernel behaviour (OOM kill, pids.max, kill and rmdir) is covered on v1 by
tests/integration/test_cgroups.py.

A fake directory differs from cgroupfs: mkdir creates no control files, so each test
creates the files the code reads, and written files simply keep what was written.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from runner.cgroups import Cgroups, Limits
from runner.errors import LimitError

MB = 1 << 20


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "cgroup.procs").write_text("")
    return tmp_path


def test_detection_picks_v2_when_cgroup_controllers_exists(root: Path) -> None:
    cg = Cgroups("r1", root)
    assert cg.version == 2 and cg.why_unavailable() == ""


def test_detection_picks_v1_without_cgroup_controllers(tmp_path: Path) -> None:
    for controller in ("memory", "pids"):
        (tmp_path / controller).mkdir()
        (tmp_path / controller / "cgroup.procs").write_text("")
    assert Cgroups("r1", tmp_path).version == 1


def test_nothing_mounted_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    cg = Cgroups("r1", tmp_path)
    assert cg.version is None
    assert str(tmp_path / "memory") in cg.why_unavailable()
    assert cg.apps() == []
    with pytest.raises(LimitError, match="unavailable"):
        cg.create("app", "web.1", Limits(64 * MB, 20))


def test_v2_without_the_pids_controller_is_unavailable(root: Path) -> None:
    (root / "cgroup.controllers").write_text("cpu io memory\n")
    cg = Cgroups("r1", root)
    assert cg.version is None and "pids" in cg.why_unavailable()


def test_create_enables_controllers_in_every_ancestor_and_writes_limits(root: Path) -> None:
    group = Cgroups("r1", root).create("shop", "web.1", Limits(64 * MB, 20))
    leaf = root / "berth" / "r1" / "shop" / "web.1"
    assert group.dirs == [leaf]
    assert group.procs_files == [leaf / "cgroup.procs"]
    for ancestor in (root, root / "berth", root / "berth" / "r1", root / "berth" / "r1" / "shop"):
        assert (ancestor / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert not (leaf / "cgroup.subtree_control").exists()   # the leaf holds processes
    assert (leaf / "memory.max").read_text() == str(64 * MB)
    assert (leaf / "pids.max").read_text() == "20"
    assert not (leaf / "memory.swap.max").exists()          # no swap accounting: left alone


def test_only_missing_controllers_are_enabled(root: Path) -> None:
    (root / "cgroup.subtree_control").write_text("cpu memory\n")
    Cgroups("r1", root).create("shop", "web.1", Limits(64 * MB, 20))
    assert (root / "cgroup.subtree_control").read_text() == "+pids"


def test_swap_is_closed_when_memory_swap_max_exists(root: Path) -> None:
    leaf = root / "berth" / "r1" / "shop" / "web.1"
    leaf.mkdir(parents=True)
    (leaf / "memory.swap.max").write_text("max\n")
    Cgroups("r1", root).create("shop", "web.1", Limits(64 * MB, 20))
    assert (leaf / "memory.swap.max").read_text() == "0"


def test_zero_means_unlimited(root: Path) -> None:
    leaf = root / "berth" / "r1" / "shop" / "web.1"
    leaf.mkdir(parents=True)
    (leaf / "memory.swap.max").write_text("0\n")
    Cgroups("r1", root).create("shop", "web.1", Limits(0, 0))
    assert (leaf / "memory.max").read_text() == "max"
    assert (leaf / "memory.swap.max").read_text() == "max"
    assert (leaf / "pids.max").read_text() == "max"


def test_oom_kills_come_from_memory_events(root: Path) -> None:
    group = Cgroups("r1", root).create("shop", "web.1", Limits(64 * MB, 20))
    (group.dirs[0] / "memory.events").write_text(
        "low 0\nhigh 0\nmax 41\noom 3\noom_kill 2\noom_group_kill 0\n")
    assert group.oom_kills() == 2


def test_add_writes_the_pid_and_pids_reads_it_back(root: Path) -> None:
    group = Cgroups("r1", root).create("shop", "web.1", Limits(64 * MB, 20))
    group.add(4242)
    assert (group.dirs[0] / "cgroup.procs").read_text() == "4242"
    assert group.pids() == [4242]


def test_apps_lists_the_apps_of_this_scope_only(root: Path) -> None:
    Cgroups("r1", root).create("shop", "web.1", Limits(64 * MB, 20))
    Cgroups("r1", root).create("blog", "web.1", Limits(64 * MB, 20))
    Cgroups("r2", root).create("wiki", "web.1", Limits(64 * MB, 20))
    assert Cgroups("r1", root).apps() == ["blog", "shop"]


def test_a_failed_write_names_the_file_and_the_errno(root: Path) -> None:
    leaf = root / "berth" / "r1" / "shop" / "web.1"
    (leaf / "pids.max").mkdir(parents=True)     # a directory cannot be written to
    with pytest.raises(LimitError) as caught:
        Cgroups("r1", root).create("shop", "web.1", Limits(64 * MB, 20))
    assert caught.value.code == "limits"
    assert str(leaf / "pids.max") in caught.value.message
    assert "EISDIR" in caught.value.message and caught.value.hint


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "x\0y"])
def test_names_must_be_plain(root: Path, name: str) -> None:
    with pytest.raises(LimitError, match="cannot name a cgroup"):
        Cgroups("r1", root).create(name, "web.1", Limits(64 * MB, 20))
    with pytest.raises(LimitError, match="cannot name a cgroup"):
        Cgroups("r1", root).create("shop", name, Limits(64 * MB, 20))
    with pytest.raises(LimitError, match="cannot name a cgroup"):
        Cgroups(name, root)


def test_negative_limits_are_refused() -> None:
    with pytest.raises(LimitError, match="cannot be negative"):
        Limits(memory_bytes=-1, pids=0)
