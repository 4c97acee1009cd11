"""One error shape for the whole platform: code, message, hint.

It lives in messaging/ because errors cross the wire: control replies and the HTTP
API carry them as `{"code", "message", "hint"}` and the CLI prints them.
"""
from __future__ import annotations

from typing import Any


class BerthError(Exception):
    """An error a person can act on: what was wrong (message) and what to do (hint)."""

    code = "error"
    status = 400
    default_hint = ""       # what to do, for a subclass whose errors share one answer

    def __init__(self, message: str, hint: str = "", *, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "hint": self.hint}

    @classmethod
    def from_dict(cls, data: dict[str, Any], status: int = 400) -> BerthError:
        return cls(str(data.get("message", "unknown error")), str(data.get("hint", "")),
                   code=str(data.get("code", "error")), status=status)

    def __str__(self) -> str:
        return self.message


class ProtocolError(BerthError):
    """A frame or message that does not match the declared protocol."""

    code = "protocol"
    default_hint = "the two ends disagree on the wire protocol: run the same Berth " \
                   "version on every host"


class LeaseBusy(BerthError):
    """Another owner holds the lease."""

    code = "lease_busy"
    status = 409
    default_hint = "wait for its holder to release it, or for it to expire"


class LeaseLost(BerthError):
    """The lease expired or was granted to someone else: stop the work it guarded."""

    code = "lease_lost"
    status = 409
    default_hint = "renew more often than the TTL (every third of it), and acquire " \
                   "the lease again before redoing the work"


class LocksUnavailable(BerthError):
    """The controller's locks channel did not answer in time."""

    code = "locks_unavailable"
    status = 503
    default_hint = "check that the controller runs and that locks_endpoint names its " \
                   "locks channel"
