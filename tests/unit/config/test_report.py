"""The daemons' one error reporter."""
import errno
import io

import pytest

from config import SettingsError, report, reporting
from config.report import SETTINGS, START, as_berth_error
from messaging.errors import BerthError


def test_report_prints_error_and_hint():
    buf = io.StringIO()
    assert report(BerthError("it broke", "fix it"), 7, buf) == 7
    assert buf.getvalue() == "Error: it broke\nHint: fix it\n"


def test_report_leaves_out_an_empty_hint():
    buf = io.StringIO()
    report(BerthError("it broke"), stream=buf)
    assert buf.getvalue() == "Error: it broke\n"


def test_settings_errors_always_have_a_hint():
    assert SettingsError("bad").hint


def test_reporting_turns_berth_errors_into_the_exit_code(capsys):
    with pytest.raises(SystemExit) as exit_, reporting(SETTINGS):
        raise SettingsError("setting x.y is bad", "set it right")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "Error: setting x.y is bad\nHint: set it right\n"


def test_reporting_wraps_os_errors_with_a_hint_by_errno(capsys):
    with pytest.raises(SystemExit) as exit_, reporting(START, doing="start the thing"):
        raise OSError(errno.EADDRINUSE, "Address already in use")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Error: cannot start the thing: Address already in use"
    assert err[1].startswith("Hint: another process is using that address")


def test_wrapped_errors_name_the_file_and_always_hint():
    err = as_berth_error(PermissionError(errno.EACCES, "Permission denied", "/srv/x"), "go")
    assert err.message == "cannot go: Permission denied (/srv/x)"
    assert "permissions" in err.hint
    assert as_berth_error(OSError("odd"), "go").hint


def test_reporting_lets_other_exceptions_through():
    with pytest.raises(KeyError), reporting(START):
        raise KeyError("x")
    with pytest.raises(OSError), reporting(START, wrap=()):
        raise OSError("not wrapped")
