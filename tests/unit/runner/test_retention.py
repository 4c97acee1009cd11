"""Old releases and venvs beyond `keep_releases` are pruned, never one in use."""
from __future__ import annotations

import os
from pathlib import Path

from runner.isolation import AppPaths
from runner.retention import prune_app


def make(parent: Path, names: list[str]) -> list[Path]:
    made = []
    for age, name in enumerate(names):
        path = parent / name
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "file").write_text(name)
        when = 1_700_000_000 + age * 60            # later in the list = newer
        os.utime(path, (when, when))
        made.append(path)
    return made


def test_keeps_the_newest_and_what_runs(tmp_path: Path) -> None:
    paths = AppPaths(tmp_path / "app")
    releases = make(paths.releases, ["r1", "r2", "r3", "r4", "r5"])
    venvs = make(paths.venvs, ["v1", "v2", "v3"])
    (paths.releases / ".unpack-x").mkdir()          # an unpack under way: not touched
    gone = prune_app(paths, 2, {releases[0]}, {venvs[0]})
    assert sorted(gone[0]) == ["r2", "r3"] and gone[1] == []
    assert sorted(p.name for p in paths.releases.iterdir()) == [".unpack-x", "r1", "r4",
                                                                 "r5"]
    gone = prune_app(paths, 1, set(), set())
    assert sorted(gone[0]) == ["r1", "r4"] and sorted(gone[1]) == ["v1", "v2"]
    assert [p.name for p in paths.venvs.iterdir()] == ["v3"]


def test_a_link_in_the_releases_dir_is_not_followed(tmp_path: Path) -> None:
    """The app's user owns its dir: a planted link must never lead the root-run
    pruning elsewhere."""
    paths = AppPaths(tmp_path / "app")
    make(paths.releases, ["r1", "r2"])
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    (paths.releases / "zz-link").symlink_to(victim)
    prune_app(paths, 0, set(), set())
    assert (victim / "keep").read_text() == "x"
    assert [p.name for p in paths.releases.iterdir()] == ["zz-link"]
