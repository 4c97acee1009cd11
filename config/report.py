"""The one way a daemon reports an error it cannot run past: `Error: <message>` and
`Hint: <hint>` on stderr, then a non-zero exit. The CLI has its own printer
(cli/output.py, same two lines) because it prints with rich and maps API statuses
to exit codes.

    with reporting(SETTINGS):
        settings = SPEC.load(path)
    with reporting(START, wrap=(OSError, zmq.ZMQError), doing="start the runner"):
        runner = Runner(settings)
        runner.start()

Inside `reporting`, a BerthError is printed as it is; an exception of a `wrap` type
(OSError and the like: a port in use, a directory that cannot be made) becomes a
BerthError saying what failed, with a hint by its errno.
"""
from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from messaging.errors import BerthError

SETTINGS = 2        # exit code: a setting is wrong (nothing was started)
START = 1           # exit code: the daemon could not start

_HINTS = {
    errno.EADDRINUSE: "another process is using that address: stop it, or pick another "
                      "port or endpoint in the settings",
    errno.EADDRNOTAVAIL: "the address is not on this machine: use 127.0.0.1 or another "
                         "local address in the settings",
    errno.EACCES: "check the permissions on that path (or port below 1024), or run as a "
                  "user who may use it",
    errno.EPERM: "this needs privileges the process lacks: run it as root, or turn the "
                 "feature off in the settings",
    errno.ENOENT: "check that the path in the settings exists",
    errno.ENOTDIR: "part of that path is a file, not a directory: fix the path in the "
                   "settings",
    errno.EROFS: "that file system is read-only: point the setting somewhere writable",
    errno.ENOSPC: "the disk is full: free some space",
}
GENERIC_HINT = "check the settings it names (`--help-settings` lists them all)"


def report(err: BerthError, code: int = START, stream: IO[str] | None = None) -> int:
    """Print `Error:` and, when there is one, `Hint:`; return `code` for sys.exit."""
    stream = stream or sys.stderr
    print(f"Error: {err.message}", file=stream)
    if err.hint:
        print(f"Hint: {err.hint}", file=stream)
    stream.flush()
    return code


def as_berth_error(exc: BaseException, doing: str) -> BerthError:
    """An OSError (or ZMQError: anything with errno/strerror) as a BerthError."""
    if isinstance(exc, BerthError):
        return exc
    num = getattr(exc, "errno", None)
    what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    filename = getattr(exc, "filename", None)
    where = f" ({filename})" if filename else ""
    return BerthError(f"cannot {doing}: {what}{where}",
                      _HINTS.get(num, GENERIC_HINT) if isinstance(num, int) else GENERIC_HINT)


@contextmanager
def reporting(code: int, *, wrap: tuple[type[BaseException], ...] = (OSError,),
              doing: str = "start") -> Iterator[None]:
    """Turn a BerthError (or a `wrap` exception) raised inside into Error:/Hint:
    lines on stderr and SystemExit(code)."""
    try:
        yield
    except BerthError as err:
        raise SystemExit(report(err, code)) from err
    except wrap as exc:
        raise SystemExit(report(as_berth_error(exc, doing), code)) from exc
