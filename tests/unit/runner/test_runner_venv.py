"""Virtualenv keys, the build/reuse cycle and recovery from a killed build."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

from runner.errors import BuildError
from runner.venv import (MARKER, BuildContext, VenvBuilder, has_control_socket,
                         plain_requirements, python_version, run_streaming, venv_key)


def test_key_depends_on_requirements_and_python() -> None:
    key = venv_key(b"flask\n", "cpython-3.11.7")
    assert key == venv_key(b"flask\n", "cpython-3.11.7") and len(key) == 64
    assert key != venv_key(b"flask\ngunicorn\n", "cpython-3.11.7")
    assert key != venv_key(b"flask\n", "cpython-3.12.1")
    # the parts are length-prefixed, so moving bytes between them changes the key
    assert venv_key(b"1\nflask", "cpython-3.11.") != venv_key(b"flask", "cpython-3.11.1\n")


def test_python_version_names_the_interpreter() -> None:
    major, minor = sys.version_info[:2]
    assert python_version(sys.executable).startswith(f"cpython-{major}.{minor}.")


def test_run_streaming_passes_lines_and_raises_with_the_tail() -> None:
    lines: list[str] = []
    run_streaming([sys.executable, "-c", "print('a'); print('b')"], lines.append, "demo")
    assert lines == ["a", "b"]
    with pytest.raises(BuildError) as err:
        run_streaming([sys.executable, "-c",
                       "import sys; print('went wrong', file=sys.stderr); sys.exit(4)"],
                      lines.append, "demo step")
    assert err.value.code == "build_failed"
    assert "demo step failed (exit 4)" in err.value.message
    assert "went wrong" in err.value.message


def test_build_then_reuse_and_rebuild_an_incomplete_venv(tmp_path: Path) -> None:
    """A venv with no requirements: virtualenv only (a few seconds)."""
    builder = VenvBuilder(tmp_path / "wheels", sys.executable, tmp_path / "locks")
    ctx = BuildContext(tmp_path / "venvs", tmp_path / "cache")
    ctx.venvs.mkdir()
    cache = functools.partial(builder.ensure, ctx)
    reqs = tmp_path / "requirements.txt"         # absent: nothing to install
    lines: list[str] = []
    venv = cache(reqs, lines.append)
    assert not venv.reused and (venv.path / MARKER).exists()
    assert (venv.bin / "python").exists()
    assert any("No requirements.txt" in line for line in lines)

    again = cache(reqs, lines.append)
    assert again.reused and again.key == venv.key

    (venv.path / MARKER).unlink()                # as if killed mid-build
    (venv.path / "half-written").write_text("")
    rebuilt = cache(reqs, lines.append)
    assert not rebuilt.reused and not (venv.path / "half-written").exists()
    assert any("Removing incomplete" in line for line in lines)


def test_control_socket_detection(tmp_path: Path) -> None:
    old = tmp_path / "old"
    new = tmp_path / "new"
    for venv, text in ((old, "class Bind(Setting): pass\n"),
                       (new, "class ControlSocket(Setting):\n    name = 'control_socket'\n")):
        config = venv / "lib" / "python3.11" / "site-packages" / "gunicorn" / "config.py"
        config.parent.mkdir(parents=True)
        config.write_text(text)
    assert has_control_socket(new) and not has_control_socket(old)
    assert not has_control_socket(tmp_path / "none")


def test_only_plain_index_requirements_reach_the_shared_wheel_cache() -> None:
    """Options, URLs, paths and editable installs never go to the platform's download:
    they are left to the app's own pip, as the app's user."""
    text = ("flask>=3  # web\ngunicorn\n-e .\n--index-url https://evil.example/simple\n"
            "./local-pkg\nrequests[socks]==2.32.3 ; python_version >= '3'\n"
            "pkg @ https://example.com/pkg.whl\n# comment\n-r other.txt\n")
    assert plain_requirements(text) == ["flask>=3", "gunicorn",
                                        'requests[socks]==2.32.3; python_version >= "3"']
