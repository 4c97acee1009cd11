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
