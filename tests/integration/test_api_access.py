"""Tokens and app ownership against a real controller process: a token of team A
gets 403 on every endpoint of team B's apps (each endpoint of the API, walked from
its route table), sees only its team's apps in listings, and admin tokens keep
reaching everything."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.api import ROUTES, SCOPES
from controller.store import Store
from tests.integration.controllerproc import ControllerProc, running_controller

SLUG = "0" * 64
OWN_AUTH = {"health", "get_slug"}       # no token / the runner token; platform_*: its own


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_controller(tmp_path_factory.mktemp("access")) as ctl:
        tokens = {}
        for team in ("team-a", "team-b"):
            status, body = ctl.request("POST", "/v1/tokens", {"name": team, "team": team})
            assert status == 201, body
            tokens[team] = body["token"]
        for app, team in (("alpha", "team-a"), ("beta", "team-b")):
            status, body = ctl.request("POST", "/v1/apps", {"name": app}, token=tokens[team])
            assert status == 201 and body["team"] == team, body
        # what beta has that a push, a worker or a runner would make: a build, an
        # addon, a release to run commands in (the controller's own store, shared)
        store = Store(ctl.data_dir / "controller" / "state.db")
        build = store.add_build("beta", SLUG, {"web": "gunicorn app:app"})
        addon = store.create_addon("beta", "postgres", "shared").id
        store.add_release("beta", slug=SLUG, procfile={"web": "gunicorn app:app"},
                          config={}, description="test")
        status, body = ctl.request("POST", "/v1/apps/beta/runs", {"command": "true"},
                                   token=tokens["team-b"])
        assert status == 201, body
        yield {"ctl": ctl, "tokens": tokens, "ids": {"app": "beta", "build": build,
                                                      "addon": addon, "run": body["run"]}}


def path_for(pattern: re.Pattern[str], first: str) -> str:
    """The route's path with `first` as its first part and a plausible rest."""
    path = pattern.pattern.strip("^$").replace("\\", "")
    groups = re.findall(r"\([^)]*\)", path)
    for i, group in enumerate(groups):
        path = path.replace(group, first if i == 0 else "DATABASE", 1)
    return path


def test_every_endpoint_declares_who_may_call_it():
    names = {name for _, _, name in ROUTES}
    undeclared = {n for n in names if n not in SCOPES}
    assert not undeclared


def test_a_team_token_gets_403_on_every_endpoint_of_another_teams_apps(world):
    ctl, ids = world["ctl"], world["ids"]
    token_a = world["tokens"]["team-a"]
    checked, wrong = [], []
    for method, pattern, name in ROUTES:
        if name in OWN_AUTH or name.startswith("platform_"):
            continue
        scope = SCOPES[name]
        if scope == "any":
            continue                            # listings: test_listings_are_the_teams
        first = ids.get(scope, "beta")
        path = path_for(pattern, first)
        body = {} if method in ("POST", "PATCH", "PUT") else None
        status, answer = ctl.request(method, path, body, token=token_a,
                                     headers={"Upgrade": "berth-run/1"})
        checked.append(f"{method} {path}")
        if status != 403:
            wrong.append(f"{method} {path} ({name}, {scope}): {status} {answer}")
        else:
            assert answer["error"]["code"] == "forbidden" and answer["error"]["hint"]
    print(f"\n{len(checked)} endpoints refused to team-a: " + ", ".join(checked))
    assert not wrong, "\n".join(wrong)
    assert len(checked) >= 30


def test_listings_are_the_teams_and_its_own_apps_are_open(world):
    ctl = world["ctl"]
    token_a = world["tokens"]["team-a"]
    status, body = ctl.request("GET", "/v1/apps", token=token_a)
    assert status == 200 and [a["name"] for a in body["apps"]] == ["alpha"]
    status, body = ctl.request("GET", "/v1/addons", token=token_a)
    assert status == 200 and body["addons"] == []
    for method, path, payload in (("GET", "/v1/apps/alpha", None),
                                  ("GET", "/v1/apps/alpha/config", None),
                                  ("PATCH", "/v1/apps/alpha/config", {"X": "1"}),
                                  ("GET", "/v1/apps/alpha/logs?lines=5", None),
                                  ("POST", "/v1/apps/alpha/formation", {"web": 1})):
        status, answer = ctl.request(method, path, payload, token=token_a)
        assert status == 200, (path, answer)
    # another team's name is refused, not taken over; a missing app is still 404
    assert ctl.request("POST", "/v1/apps", {"name": "beta"}, token=token_a)[0] == 409
    assert ctl.request("GET", "/v1/apps/gamma", token=token_a)[0] == 404


def test_admin_tokens_reach_everything_and_tokens_can_be_revoked(world):
    ctl = world["ctl"]
    status, body = ctl.request("GET", "/v1/apps")
    assert status == 200 and {a["name"] for a in body["apps"]} >= {"alpha", "beta"}
    assert ctl.request("GET", "/v1/apps/beta/config")[0] == 200
    assert ctl.request("GET", f"/v1/builds/{world['ids']['build']}")[0] == 200
    assert ctl.request("GET", f"/v1/addons/{world['ids']['addon']}")[0] == 200
    status, body = ctl.request("GET", "/v1/tokens")
    assert {(t["name"], t["team"]) for t in body["tokens"]} >= {
        ("admin", None), ("team-a", "team-a"), ("team-b", "team-b")}
    assert all("token" not in t and "hash" not in t for t in body["tokens"])
    status, body = ctl.request("POST", "/v1/tokens", {"name": "temp", "team": "team-a"})
    temp = body["token"]
    assert ctl.request("GET", "/v1/apps", token=temp)[0] == 200
    assert ctl.request("DELETE", "/v1/tokens/temp")[0] == 200
    assert ctl.request("GET", "/v1/apps", token=temp)[0] == 401
    # a team token may not make tokens; names and teams are checked
    assert ctl.request("POST", "/v1/tokens", {"name": "x"},
                       token=world["tokens"]["team-a"])[0] == 403
    status, body = ctl.request("POST", "/v1/tokens", {"name": "y", "team": "Bad Team"})
    assert status == 400 and "team" in body["error"]["message"]
    status, body = ctl.request("POST", "/v1/tokens", {"name": "team-a", "team": "team-a"})
    assert status == 409


def test_platform_endpoints_stay_the_platform_tokens(world):
    ctl = world["ctl"]
    for token in (world["tokens"]["team-a"], ctl.admin_token):
        assert ctl.request("GET", "/v1/platform/addons", token=token)[0] == 401
    platform = (ctl.data_dir / "controller" / "platform.token").read_text().strip()
    assert ctl.request("GET", "/v1/platform/addons", token=platform)[0] == 200
