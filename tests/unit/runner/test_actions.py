"""The runner's action registry and messaging's list of actions cannot drift apart."""
from __future__ import annotations

import inspect
import re

import pytest

import runner.daemon  # noqa: F401  (registers the handlers)
from messaging.envelope import make
from messaging.errors import BerthError, ProtocolError
from messaging.messages import ACTIONS
from runner import actions


def test_every_declared_action_has_exactly_one_handler_and_no_more():
    assert set(actions.REGISTRY) == set(ACTIONS)


def test_handlers_read_only_the_args_their_declaration_names():
    for name, handler in actions.REGISTRY.items():
        source = inspect.getsource(handler)
        declared = set(ACTIONS[name].required) | set(ACTIONS[name].optional)
        used = set(re.findall(r'args\[\s*"(\w+)"\s*\]', source)) | \
            set(re.findall(r'args\.get\(\s*"(\w+)"', source))
        assert used <= declared, f"{name} reads undeclared args {used - declared}"


def test_a_handler_for_an_undeclared_action_is_refused():
    with pytest.raises(ProtocolError, match="no declaration"):
        actions.action("make_coffee")


def test_an_unknown_action_gets_an_error_that_says_what_this_runner_knows():
    msg = make("command", "controller", action="make_coffee", args={})
    with pytest.raises(BerthError) as info:
        actions.dispatch(object(), msg)
    assert info.value.code == "unknown_action"
    assert "prepare" in info.value.hint and "same Berth version" in info.value.hint


def test_missing_args_are_refused_before_the_handler_runs():
    msg = make("command", "controller", action="stop", args={})
    with pytest.raises(BerthError) as info:
        actions.dispatch(object(), msg)      # object() has no handler state: never reached
    assert info.value.code == "bad_args" and "instance" in info.value.message
