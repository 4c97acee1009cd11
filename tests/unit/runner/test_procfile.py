"""Procfile commands run through /bin/sh as on Heroku, and the app (not a shell) is
the process the runner watches and signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from runner.procfile import is_simple, shell_argv, with_exec


@pytest.mark.parametrize("command, simple", [
    ("gunicorn app:app", True),
    ("FOO=bar gunicorn app:app --bind 127.0.0.1:$PORT", True),
    ("echo 'a && b'", True),
    ("python manage.py migrate && gunicorn app:app", False),
    ("echo a | cat", False),
    ("a; b", False),
    ("echo $(date)", False),
    ("gunicorn app:app > /dev/null", False),
])
def test_operators_outside_quotes_make_a_command_compound(command, simple):
    assert is_simple(command) is simple


def test_exec_goes_after_the_leading_assignments():
    assert with_exec("A=1 B='x y' C=\"q r\" cmd --x=1") == "A=1 B='x y' C=\"q r\" exec cmd --x=1"
    assert with_exec("cmd A=1") == "exec cmd A=1"
    assert with_exec("X=1") == "X=1"
    assert with_exec("exit 5") == "exit 5"              # builtins stay the shell's
    assert with_exec("cd sub") == "cd sub"
    with pytest.raises(ValueError):
        shell_argv("   ")


def run(command, env=None, **kw):
    return subprocess.Popen(shell_argv(command), env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_assignments_expansions_and_exit_codes_reach_the_app():
    p = run(f"GREETING='hi there' {sys.executable} -c "
            "\"import os, sys; print(os.environ['GREETING'], os.environ['PORT']); sys.exit(3)\"",
            env={"PORT": "5123"})
    out, _ = p.communicate(timeout=10)
    assert out.decode().strip() == "hi there 5123" and p.returncode == 3


def test_a_simple_command_replaces_the_shell_so_signals_reach_the_app():
    p = run(f"FOO=bar {sys.executable} -c \"import time; print('up', flush=True); "
            "time.sleep(30)\"")
    assert p.stdout.readline() == b"up\n"
    cmdline = open(f"/proc/{p.pid}/cmdline", "rb").read().split(b"\0")
    assert cmdline[0] == sys.executable.encode()         # no shell left in between
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == -signal.SIGTERM


def test_a_compound_command_stops_after_its_job_when_the_group_is_signalled():
    marker = "second-command-ran"
    p = run(f"{sys.executable} -c \"import time; print('up', flush=True); time.sleep(30)\""
            f" && echo {marker}", start_new_session=True)
    assert p.stdout.readline() == b"up\n"
    started = time.monotonic()
    os.killpg(p.pid, signal.SIGTERM)                     # as the runner stops an instance
    out, _ = p.communicate(timeout=10)
    assert marker.encode() not in out and p.returncode == 143
    assert time.monotonic() - started < 5


def test_a_missing_program_is_the_shells_127():
    p = run("berth-no-such-program --flag")
    _, err = p.communicate(timeout=10)
    assert p.returncode == 127 and b"not found" in err
