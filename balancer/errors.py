"""Balancer errors. Each carries the HTTP status the client gets and a hint that
says what to do; pages.py renders them.
"""
from __future__ import annotations

from messaging.errors import BerthError


class BalancerError(BerthError):
    code = "balancer"
    status = 500


class BadRequest(BalancerError):
    """The client sent something we will not forward (framing, syntax). Always
    answered with the status and a closed connection, so a smuggled request can
    never reach a backend."""

    code = "bad_request"
    status = 400

    def __init__(self, message: str, hint: str = "", *, status: int = 400) -> None:
        super().__init__(message, hint or "fix the request; this proxy follows "
                         "RFC 9112 strictly", status=status)


class BackendError(BalancerError):
    """A backend failed in a way the client sees as 502/504."""

    code = "backend"
    status = 502
