"""Commands sent to runners and not yet answered, with explicit state.

A Command knows its host, action, deadline and what happens next: `on_result` with
the reply's result, or `on_error` with a BerthError (the runner's own error, a
timeout, or the runner lost) and the raw error body (which may carry extras such as
a build's log_lines). Exactly one of the two runs, exactly once: the command leaves
the table before its callback runs.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.errors import command_timeout, runner_lost
from messaging.envelope import Message, command
from messaging.errors import BerthError

log = logging.getLogger(__name__)

OnResult = Callable[["Command", dict[str, Any]], None]
OnError = Callable[["Command", BerthError, dict[str, Any]], None]


def _ignore_result(cmd: Command, result: dict[str, Any]) -> None:
    return None


def _log_error(cmd: Command, err: BerthError, body: dict[str, Any]) -> None:
    log.warning("command failed", extra={"action": cmd.action, "runner": cmd.host,
                                         "subject": cmd.subject, "error": err.message})


@dataclass
class Command:
    id: str
    host: str
    action: str
    subject: str              # what it is about: a build, an instance, an app
    sent_at: float
    deadline: float
    on_result: OnResult = _ignore_result
    on_error: OnError = _log_error
    args: dict[str, Any] = field(default_factory=dict, repr=False)


class Commands:
    """The table of commands in flight; owned by the controller's loop thread."""

    def __init__(self, sender: str, send: Callable[[str, Message], None]) -> None:
        self.sender = sender
        self._send = send
        self.in_flight: dict[str, Command] = {}

    def send(self, host: str, action: str, args: dict[str, Any], *, subject: str,
             now: float, timeout: float = 30.0, on_result: OnResult | None = None,
             on_error: OnError | None = None) -> Command:
        msg = command(action, self.sender, **args)
        cmd = Command(msg.id, host, action, subject, now, now + timeout,
                      on_result or _ignore_result, on_error or _log_error, args)
        self.in_flight[cmd.id] = cmd
        self._send(host, msg)
        return cmd

    def answered(self, msg: Message) -> Command | None:
        """A reply arrived: run the command's callback. Unknown ids (a reply after the
        deadline, or to a controller that restarted) are dropped."""
        cmd = self.in_flight.pop(msg["re"], None)
        if cmd is None:
            return None
        if msg["ok"]:
            cmd.on_result(cmd, msg.get("result") or {})
        else:
            body = msg.get("error") or {}
            cmd.on_error(cmd, BerthError.from_dict(body), body)
        return cmd

    def expire(self, now: float) -> None:
        for cmd in [c for c in self.in_flight.values() if now > c.deadline]:
            del self.in_flight[cmd.id]
            cmd.on_error(cmd, command_timeout(cmd.action, cmd.host), {})

    def host_lost(self, host: str) -> None:
        for cmd in [c for c in self.in_flight.values() if c.host == host]:
            del self.in_flight[cmd.id]
            cmd.on_error(cmd, runner_lost(host), {})
