"""Fixtures shared by integration and e2e tests: everything they start is real and is
stopped by PID when the fixture ends."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def berth_root() -> Iterator[Path]:
    """A directory app users can walk through. pytest's own temp dirs are 0700, so an
    app's user (runner isolation) could not reach its files below them; and not under
    /tmp, which every jail replaces with a private one."""
    root = Path(tempfile.mkdtemp(prefix="berth-test-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def venv_cache(berth_root: Path) -> Path:
    """One shared wheel cache for the session, so each requirement is downloaded once
    per run (the first build of each is real: virtualenv + pip from PyPI). Each app
    still gets its own virtualenv."""
    preset = os.environ.get("BERTH_TEST_VENV_CACHE")
    path = Path(preset) if preset else berth_root / "wheels"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def new_apps_dir(berth_root: Path) -> Path:
    """A fresh apps dir for one platform or runner; `forget_apps` cleans up after it."""
    return berth_root / f"apps-{uuid.uuid4().hex[:8]}"


def forget_apps(apps_dir: Path) -> None:
    """Remove the users and cgroups a test platform's runner made (files go with
    berth_root): a test that stops a platform without destroying its apps."""
    from runner.cgroups import Cgroups
    from runner.isolation import scope_for
    from runner.users import AppUsers

    if os.geteuid() != 0:
        return
    # a runner's own apps dir, or a platform's, whose runners each have a subdir
    dirs = [apps_dir, *(p for p in apps_dir.iterdir() if p.is_dir())] \
        if apps_dir.is_dir() else [apps_dir]
    for path in dirs:
        scope = scope_for(path)
        cgroups = Cgroups(scope)
        if cgroups.version is not None:
            for app in cgroups.apps():
                cgroups.remove_app(app)
            cgroups.remove_scope()
        users = AppUsers(scope)
        for app in users.apps():
            users.remove(app)
    shutil.rmtree(apps_dir, ignore_errors=True)


@pytest.fixture
def apps_dir(berth_root: Path) -> Iterator[Path]:
    path = new_apps_dir(berth_root)
    yield path
    forget_apps(path)
