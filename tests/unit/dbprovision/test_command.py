"""The command wrapper, with real programs: timeouts kill the whole group, failures
carry stderr, a missing program says so."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dbprovision.command import RunAs, run
from dbprovision.errors import CommandFailed, CommandTimedOut, ProgramMissing
from messaging.errors import BerthError


def test_output_and_exit_code():
    result = run(["sh", "-c", "echo out; echo err >&2"], timeout=5)
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")


def test_false_raises_with_exit_code():
    with pytest.raises(CommandFailed) as caught:
        run(["false"], timeout=5)
    assert caught.value.exit_code == 1
    assert caught.value.program == "false"
    assert isinstance(caught.value, BerthError) and caught.value.hint


def test_stderr_tail_is_in_the_error():
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", "echo first >&2; echo 'the real reason' >&2; exit 3"], timeout=5)
    assert caught.value.exit_code == 3
    assert "the real reason" in caught.value.stderr_tail
    assert "the real reason" in caught.value.message


def test_long_stderr_is_cut_to_its_tail():
    with pytest.raises(CommandFailed) as caught:
        run(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x >&2; echo END >&2; exit 1"],
            timeout=5)
    assert caught.value.stderr_tail.endswith("END")
    assert len(caught.value.stderr_tail) < 3000


def test_check_false_returns_the_failure():
    assert run(["false"], timeout=5, check=False).returncode == 1


def test_missing_program():
    with pytest.raises(ProgramMissing) as caught:
        run(["/nonexistent/initdb", "-D", "x"], timeout=5)
    assert "initdb" in caught.value.message
    assert "setup.sh" in caught.value.hint


def test_timeout_kills_the_whole_process_group(tmp_path: Path):
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(CommandTimedOut) as caught:
        run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo waiting >&2; wait"],
            timeout=0.5)
    assert time.monotonic() - started < 5
    assert "waiting" in caught.value.stderr_tail
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child), "the background sleep outlived the timeout"


def test_env_replaces_the_environment_but_keeps_path():
    os.environ["BERTH_TEST_SECRET"] = "leak"
    try:
        out = run(["sh", "-c", 'echo "$FOO:${BERTH_TEST_SECRET:-none}"'], timeout=5,
                  env={"FOO": "bar"}).stdout
    finally:
        del os.environ["BERTH_TEST_SECRET"]
    assert out == "bar:none\n"


def test_cwd_and_input(tmp_path: Path):
    assert run(["pwd"], timeout=5, cwd=tmp_path).stdout.strip() == str(tmp_path)
    assert run(["cat"], timeout=5, input="hello").stdout == "hello"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_run_as_another_user_without_groups():
    nobody = RunAs.lookup("nobody")
    out = run(["id"], timeout=5, user=nobody).stdout
    assert f"uid={nobody.uid}" in out and f"gid={nobody.gid}" in out
    assert "groups=" not in out or out.split("groups=")[1].count(",") == 0
    env = run(["sh", "-c", "echo $HOME $USER"], timeout=5, user=nobody).stdout.split()
    assert env == [nobody.home, "nobody"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
