"""Fixtures shared by integration and e2e tests: everything they start is real and is
stopped by PID when the fixture ends."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def venv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One virtualenv cache for the session, so each requirements set is built once
    per run (the first build of each is real: virtualenv + pip from PyPI)."""
    preset = os.environ.get("BERTH_TEST_VENV_CACHE")
    if preset:
        Path(preset).mkdir(parents=True, exist_ok=True)
        return Path(preset)
    return tmp_path_factory.mktemp("venv-cache")
