"""Runner errors: each carries a code the controller can act on and a hint a person can."""
from __future__ import annotations

from messaging.errors import BerthError


class RunnerError(BerthError):
    code = "runner"


class SlugError(RunnerError):
    """A slug could not be fetched, did not match its sha256, or was unsafe to unpack."""

    code = "slug_failed"


class BuildError(RunnerError):
    """Making a virtualenv (virtualenv or pip) failed; message carries the output tail."""

    code = "build_failed"


class CommandError(RunnerError):
    """A control command that is malformed or cannot be carried out now."""

    code = "bad_command"
    default_hint = "run the same Berth version on the controller and every runner"


class LimitError(RunnerError):
    """A cgroup for an instance's memory and process limits could not be made or used."""

    code = "limits"


class IsolationError(RunnerError):
    """An app's user, jail, cgroup or firewall rule could not be set up or removed."""

    code = "isolation"
