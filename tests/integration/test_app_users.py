"""AppUsers against the real useradd/userdel (needs root). Every test uses its own
random scope and removes the users it made."""
from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.errors import IsolationError
from runner.users import SHELL, AppUser, AppUsers

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="needs root and useradd")


def _cleanup(users: AppUsers) -> None:
    for app in users.apps():
        users.remove(app)


@pytest.fixture
def users() -> Iterator[AppUsers]:
    made = AppUsers(secrets.token_hex(2))
    try:
        yield made
    finally:
        _cleanup(made)


def test_ensure_creates_a_locked_down_user(users: AppUsers, tmp_path: Path) -> None:
    home = tmp_path / "shop" / "data"
    user = users.ensure("shop", home)

    entry = pwd.getpwnam(user.name)
    assert user == AppUser(users.name_for("shop"), entry.pw_uid, entry.pw_gid, "shop")
    assert user.name == f"b{users.scope}-shop"
    assert users.uid_min <= user.uid <= users.uid_max
    assert entry.pw_shell == SHELL
    assert entry.pw_dir == str(home)
    assert entry.pw_gecos == f"berth app shop ({users.scope})"
    assert not home.exists() and not home.parent.exists()
    group = grp.getgrgid(user.gid)
    assert group.gr_name == user.name
    assert user.gid == user.uid             # the group takes the same number


def test_ensure_is_idempotent(users: AppUsers, tmp_path: Path) -> None:
    first = users.ensure("shop", tmp_path / "data")
    assert users.ensure("shop", tmp_path / "data") == first
    assert users.get("shop") == first
    assert [e.pw_name for e in pwd.getpwall()].count(first.name) == 1


def test_two_apps_get_different_uids(users: AppUsers, tmp_path: Path) -> None:
    a = users.ensure("alpha", tmp_path / "a")
    b = users.ensure("beta", tmp_path / "b")
    assert a.uid != b.uid and a.name != b.name


def test_long_names_are_cut_and_kept_apart(users: AppUsers, tmp_path: Path) -> None:
    prefix = "a" * 26
    one, two = prefix + "bbbb", prefix + "cccc"
    assert len(one) == len(two) == 30
    assert len(users.name_for(one)) <= 32
    assert users.name_for(one) != users.name_for(two)
    made = [users.ensure(one, tmp_path / "1"), users.ensure(two, tmp_path / "2")]
    assert [u.app for u in made] == [one, two]
    assert users.apps() == sorted([one, two])


def test_remove_deletes_user_and_group(users: AppUsers, tmp_path: Path) -> None:
    user = users.ensure("shop", tmp_path / "data")
    assert users.apps() == ["shop"]

    assert users.remove("shop") is True
    with pytest.raises(KeyError):
        pwd.getpwnam(user.name)
    with pytest.raises(KeyError):
        grp.getgrnam(user.name)
    assert users.get("shop") is None
    assert users.apps() == []
    assert users.remove("shop") is False


def test_scopes_do_not_share_users(users: AppUsers, tmp_path: Path) -> None:
    other = AppUsers(secrets.token_hex(2))
    try:
        mine = users.ensure("shop", tmp_path / "1")
        theirs = other.ensure("shop", tmp_path / "2")
        assert mine.name != theirs.name and mine.uid != theirs.uid
        assert users.apps() == other.apps() == ["shop"]
        users.remove("shop")
        assert other.get("shop") == theirs
    finally:
        _cleanup(other)


def test_concurrent_runners_get_distinct_uids(tmp_path: Path) -> None:
    """Two scopes (two runners, two locks) racing for the lowest free uid: the loser
    of each race retries on useradd's "UID ... is not unique"."""
    scopes = [AppUsers(secrets.token_hex(2)) for _ in range(2)]
    made: list[AppUser] = []
    errors: list[BaseException] = []

    def make(users: AppUsers, app: str) -> None:
        try:
            made.append(users.ensure(app, tmp_path / app))
        except BaseException as exc:   # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(users, f"app{i}"))
               for users in scopes for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
        assert len(made) == 8
        assert len({u.uid for u in made}) == 8
    finally:
        for users in scopes:
            _cleanup(users)


def test_a_foreign_user_with_our_name_is_refused(users: AppUsers, tmp_path: Path) -> None:
    name = users.name_for("shop")
    subprocess.run(["useradd", "--system", "-M", "-s", SHELL, "-c", "not berth", name],
                   check=True, capture_output=True)
    try:
        with pytest.raises(IsolationError, match="is not app 'shop'"):
            users.ensure("shop", tmp_path / "data")
        assert users.apps() == []
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)


def test_bad_names_are_refused(users: AppUsers) -> None:
    for bad in ("", "a", "Shop", "1shop", "shop-", "a_b", "x" * 31, "../etc"):
        with pytest.raises(IsolationError):
            users.name_for(bad)
    with pytest.raises(IsolationError):
        AppUsers("../x")
