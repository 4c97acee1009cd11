"""Controller errors: each maps to an HTTP status and tells the user what to do."""
from __future__ import annotations

from messaging.errors import BerthError


class NotFound(BerthError):
    code = "not_found"
    status = 404


class Invalid(BerthError):
    code = "invalid"
    status = 400


class Conflict(BerthError):
    code = "conflict"
    status = 409


class Unauthorized(BerthError):
    code = "unauthorized"
    status = 401


class TooLarge(BerthError):
    code = "too_large"
    status = 413


class Unavailable(BerthError):
    code = "unavailable"
    status = 503


def app_not_found(name: str) -> NotFound:
    return NotFound(f"app '{name}' not found",
                    "run `berth apps list` to see your apps, or `berth apps create "
                    f"{name}` to make it")


class CommandFailed(BerthError):
    """A command to a runner that got no useful answer: the runner went away, or the
    deadline passed."""

    code = "command_failed"
    status = 503


def runner_lost(host: str) -> CommandFailed:
    return CommandFailed(f"runner {host} stopped answering",
                         "push again; another runner will take it", code="runner_lost")


def command_timeout(action: str, host: str) -> CommandFailed:
    return CommandFailed(f"{action} got no answer from {host} in time",
                         "try again; if it keeps happening, see that runner's log",
                         code="timeout")


def no_runner() -> Unavailable:
    return Unavailable("no runner host is connected",
                       "start one (`berth up` does) and push again", code="no_runner")


def build_interrupted() -> Unavailable:
    return Unavailable("the controller restarted during this build",
                       "push again with `berth push`", code="interrupted")


def internal(exc: BaseException) -> BerthError:
    return BerthError(f"internal error: {exc}", "see the controller's log",
                      code="internal", status=500)


class ReleasePhaseFailed(BerthError):
    """The Procfile's `release:` command did not exit 0: the release was not made."""

    code = "release_failed"
    status = 422


class Forbidden(BerthError):
    code = "forbidden"
    status = 403
