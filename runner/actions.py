"""The runner's control actions as a registry: one declared entry per action of
messaging.messages.ACTIONS.

A handler is a Runner method marked `@action("name")`; it gets the command and its
args (already checked against the declaration) and returns the reply's result, or
None when a job replies later. Adding an action (provision a database, snapshot a
volume, run a one-off) is a declaration in messaging/messages.py plus one marked
method; tests/unit/runner/test_actions.py walks both lists so neither can drift.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from messaging.envelope import Message
from messaging.errors import ProtocolError
from messaging.messages import ACTIONS, check_args
from runner.errors import CommandError

Result = dict[str, Any] | None
Handler = Callable[[Any, Message, dict[str, Any]], Result]
H = TypeVar("H", bound=Handler)

REGISTRY: dict[str, Handler] = {}


def action(name: str) -> Callable[[H], H]:
    """Register the decorated method as the handler of the declared action `name`."""
    if name not in ACTIONS:
        raise ProtocolError(f"action {name!r} has a handler but no declaration",
                            "declare it in messaging/messages.py ACTIONS")

    def register(fn: H) -> H:
        if name in REGISTRY:
            raise ProtocolError(f"action {name!r} has two handlers")
        REGISTRY[name] = fn
        return fn
    return register


def dispatch(runner: Any, msg: Message) -> Result:
    """Run the handler of a command; a BerthError it raises becomes the error reply."""
    name, args = msg["action"], msg["args"]
    handler = REGISTRY.get(name)
    if handler is None:
        raise CommandError(f"unknown action {name!r}",
                           f"this runner knows: {', '.join(sorted(REGISTRY))}; run the "
                           "same Berth version on the controller and every runner",
                           code="unknown_action")
    try:
        check_args(name, args)
    except ProtocolError as exc:
        raise CommandError(exc.message, exc.hint, code="bad_args") from exc
    return handler(runner, msg, args)
