"""Bookkeeping of one request/response exchange, shared by both engines (no I/O):
the outcome the access log and stats are written from, the state the request body
pump shares with the response reader, and the two signals the engines raise."""
from __future__ import annotations

from dataclasses import dataclass

MAX_RETRIES = 2     # resends of an idempotent bodiless request nothing answered
PUMP_GRACE = 2.0    # seconds the request body pump may lag behind a finished response


class ClientGone(Exception):
    """The client closed or stalled; nothing more can be said to it."""


class Retry(Exception):
    """The backend connection died before any response byte reached the client."""


@dataclass
class Outcome:
    status: int = 0
    bytes: int = 0
    backend: str = "-"
    keep_alive: bool = False
    bytes_in: int = 0          # request head and body bytes read from the client


class PumpState:
    """Shared between the response reader and the request body pump."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline      # for the response head; the pump pushes it on
        self.done = False
        self.error: BaseException | None = None
        self.body_bytes = 0           # request body bytes read from the client
