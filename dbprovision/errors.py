"""Every error dbprovision raises, as BerthError: the controller passes them to the
CLI (and the Celery jobs to their progress) as they are, message + hint."""
from __future__ import annotations

from messaging.errors import BerthError


class AddonError(BerthError):
    """Base of the addon errors."""

    code = "addon"


class CommandFailed(AddonError):
    """An external program (initdb, pg_ctl, redis-server, ...) failed: which one, how it
    ended and the end of what it wrote on stderr, so the log says why without a rerun."""

    code = "command_failed"
    status = 500

    def __init__(self, message: str, hint: str = "", *, program: str = "",
                 exit_code: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message, hint)
        self.program = program
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class CommandTimedOut(CommandFailed):
    """The program ran past its timeout; its whole process group was killed."""

    code = "command_timeout"


class ProgramMissing(CommandFailed):
    """The program is not installed (or not on the given path)."""

    code = "program_missing"
    default_hint = "run scripts/setup.sh, which installs PostgreSQL 15, redis-server, " \
                   "redis-tools and pgbouncer"


class AddonBusy(AddonError):
    """Another job holds the addon's (or the servers') lock; a retry will do."""

    code = "addon_busy"
    status = 503


class InvalidAddon(AddonError):
    """An addon id, engine or plan the provisioner cannot take."""

    code = "invalid_addon"


class AddonNotFound(AddonError):
    """No addon of that id was provisioned here."""

    code = "addon_not_found"
    status = 404


class NotBuiltYet(AddonError):
    """A plan that is designed but not built."""

    code = "not_built"
    status = 501


class ServerUnavailable(AddonError):
    """A database server did not start, or does not answer."""

    code = "server_unavailable"
    status = 503


class UnsafePath(AddonError):
    """A data directory the server's own user could not reach, or one too long for a
    unix socket path."""

    code = "unsafe_path"
    status = 500


class QuotaBusy(AddonError):
    """Quota enforcement could not take its locks in time (a long tenant transaction
    holds one); the next check tries again."""

    code = "quota_busy"
    status = 503
    default_hint = "the periodic quota check retries; nothing was changed"
