"""Tokens, app ownership and per-app roles against a real controller process: a
token of team A gets 403 on every endpoint of team B's apps (each endpoint of the
API, walked from its route table), sees only its team's apps in listings, and admin
tokens keep reaching everything. A team granted a role on one app (`berth access`)
reaches the endpoints that role allows (walked by each endpoint's declared role) and
no others, until the grant is removed."""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from controller.api import ROLES_NEEDED, ROUTES, SCOPES
from controller.store import Store
from messaging.shapes import ROLES, role_at_least
from tests.integration.controllerproc import ROOT, ControllerProc, running_controller

SLUG = "0" * 64
OWN_AUTH = {"health", "get_slug"}       # no token / the runner token; platform_*: its own


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_controller(tmp_path_factory.mktemp("access")) as ctl:
        tokens = {}
        for team in ("team-a", "team-b", "team-c"):
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


def path_for(pattern: re.Pattern[str], first: str, rest: str = "DATABASE") -> str:
    """The route's path with `first` as its first part and `rest` as the others."""
    path = pattern.pattern.strip("^$").replace("\\", "")
    groups = re.findall(r"\([^)]*\)", path)
    for i, group in enumerate(groups):
        path = path.replace(group, first if i == 0 else rest, 1)
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


# -- per-app roles ----------------------------------------------------------------
APP_SCOPES = ("app", "build", "run", "addon")


def status_of(ctl: ControllerProc, method: str, path: str, token: str
              ) -> tuple[int, dict[str, Any] | None]:
    """The status (and a 403's error) only: a stream the token may read is left
    unread, so a build's log that never ends does not hold the walk."""
    conn = http.client.HTTPConnection("127.0.0.1", ctl.ports.api, timeout=10)
    try:
        body = b"{}" if method in ("POST", "PATCH", "PUT") else None
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}",
                                                       "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())["error"] if resp.status == 403 else None
    finally:
        conn.close()


def walk(world: dict[str, Any], team: str) -> list[tuple[str, str, str, int, Any]]:
    """(name, role needed, "METHOD path", status, 403 error) of every app's endpoint."""
    found = []
    for method, pattern, name in ROUTES:
        scope = SCOPES[name]
        if scope not in APP_SCOPES:
            continue
        # no second part that exists: a deployer's DELETE must not detach beta's addon
        path = path_for(pattern, world["ids"].get(scope, "beta"), rest="NOSUCH")
        status, error = status_of(world["ctl"], method, path, world["tokens"][team])
        found.append((name, ROLES_NEEDED[name], f"{method} {path}", status, error))
    return found


def grant(world: dict[str, Any], team: str, role: str, app: str = "beta") -> None:
    status, body = world["ctl"].request("POST", f"/v1/apps/{app}/access",
                                        {"team": team, "role": role},
                                        token=world["tokens"]["team-b"])
    assert status in (200, 201) and body["role"] == role, body


def revoke(world: dict[str, Any], team: str, app: str = "beta") -> None:
    status, body = world["ctl"].request("DELETE", f"/v1/apps/{app}/access/{team}",
                                        token=world["tokens"]["team-b"])
    assert status == 200, body


def test_every_app_endpoint_declares_a_role_and_the_default_is_not_viewer():
    assert set(ROLES_NEEDED) == set(SCOPES) and set(ROLES_NEEDED.values()) <= set(ROLES)
    reads = {n for n, r in ROLES_NEEDED.items() if r == "viewer" and SCOPES[n] in APP_SCOPES}
    # the viewer's endpoints read state and never secrets (config, credentials, runs)
    assert {"get_config", "create_run", "attach_run"}.isdisjoint(reads)
    assert {"ps", "releases", "app_logs", "build_log", "get_addon", "get_access"} <= reads
    assert all(method == "GET" for method, _, n in ROUTES if n in reads)


@pytest.mark.parametrize("role", ["viewer", "deployer"])
def test_a_granted_team_reaches_what_its_role_allows_and_nothing_more(world, role):
    grant(world, "team-c", role)
    try:
        results = walk(world, "team-c")
    finally:
        revoke(world, "team-c")
    wrong = []
    for name, need, call, status, error in results:
        if role_at_least(role, need):
            if status == 403:
                wrong.append(f"{call} ({name}, needs {need}): 403 {error}")
        elif status != 403:
            wrong.append(f"{call} ({name}, needs {need}): {status}, not 403")
        elif error["message"] != f"needs {need} on app 'beta'; team-c is {role}" or \
                f"`berth access add team-c --role {need} -a beta`" not in error["hint"] or \
                "team-b" not in error["hint"]:
            wrong.append(f"{call}: {error}")
    allowed = [r for r in results if role_at_least(role, r[1])]
    print(f"\n{role}: {len(allowed)} endpoints allowed, {len(results) - len(allowed)} "
          "refused: " + ", ".join(f"{r[2]} {r[3]}" for r in results))
    assert not wrong, "\n".join(wrong)
    assert len(allowed) >= (12 if role == "viewer" else 20)
    assert len(results) - len(allowed) >= (5 if role == "deployer" else 15)


def test_a_removed_grant_leaves_nothing(world):
    grant(world, "team-c", "deployer")
    revoke(world, "team-c")
    results = walk(world, "team-c")
    wrong = [r for r in results if r[3] != 403
             or r[4]["message"] != f"needs {r[1]} on app 'beta'; team-c has no role on it"]
    assert not wrong and len(results) >= 30, wrong
    status, body = world["ctl"].request("GET", "/v1/apps", token=world["tokens"]["team-c"])
    assert status == 200 and body["apps"] == []


def test_listings_show_a_granted_app_with_its_role(world):
    ctl, token_c = world["ctl"], world["tokens"]["team-c"]
    grant(world, "team-c", "viewer")
    try:
        status, body = ctl.request("GET", "/v1/apps", token=token_c)
        assert status == 200 and [(a["name"], a["role"]) for a in body["apps"]] == [
            ("beta", "viewer")]
        status, body = ctl.request("GET", "/v1/addons", token=token_c)
        assert [a["id"] for a in body["addons"]] == [world["ids"]["addon"]]
        status, body = ctl.request("GET", "/v1/apps", token=world["tokens"]["team-b"])
        assert [(a["name"], a["role"]) for a in body["apps"]] == [("beta", "owner")]
        status, body = ctl.request("GET", "/v1/apps")
        assert {a["role"] for a in body["apps"]} == {"admin"}
        status, body = ctl.request("GET", "/v1/apps/beta/access", token=token_c)
        assert status == 200 and body["owner"] == "team-b"
        assert [(g["team"], g["role"]) for g in body["grants"]] == [("team-c", "viewer")]
    finally:
        revoke(world, "team-c")


def test_granting_is_the_owners_and_says_what_was_wrong(world):
    ctl, tokens = world["ctl"], world["tokens"]
    path = "/v1/apps/beta/access"
    for payload, words in (({"team": "team-c", "role": "admin"}, "unknown role 'admin'"),
                           ({"team": "team-c"}, "unknown role None"),
                           ({"role": "viewer"}, "give the team"),
                           ({"team": "Team C", "role": "viewer"}, "invalid team name"),
                           ({"team": "team-b", "role": "viewer"}, "owns app 'beta'")):
        status, body = ctl.request("POST", path, payload, token=tokens["team-b"])
        assert status == 400 and words in body["error"]["message"], (payload, body)
    status, body = ctl.request("DELETE", f"{path}/team-c", token=tokens["team-b"])
    assert status == 404 and "no grant" in body["error"]["message"]
    # a granted owner manages access too; a deployer may not
    grant(world, "team-c", "owner")
    try:
        status, body = ctl.request("POST", path, {"team": "team-a", "role": "viewer"},
                                   token=tokens["team-c"])
        assert status == 201, body
        status, body = ctl.request("GET", "/v1/apps", token=tokens["team-a"])
        assert ("beta", "viewer") in [(a["name"], a["role"]) for a in body["apps"]]
        grant(world, "team-c", "deployer")
        status, body = ctl.request("DELETE", f"{path}/team-a", token=tokens["team-c"])
        assert status == 403 and body["error"]["message"] == \
            "needs owner on app 'beta'; team-c is deployer"
        status, body = ctl.request("DELETE", f"{path}/team-a")       # an admin may
        assert status == 200 and body["revoked"] == "viewer"
    finally:
        revoke(world, "team-c")


def test_grants_leave_with_their_app(world):
    ctl, tokens = world["ctl"], world["tokens"]
    assert ctl.request("POST", "/v1/apps", {"name": "delta"}, token=tokens["team-b"])[0] == 201
    grant(world, "team-c", "viewer", app="delta")
    assert ctl.request("GET", "/v1/apps/delta", token=tokens["team-c"])[0] == 200
    assert ctl.request("DELETE", "/v1/apps/delta", token=tokens["team-b"])[0] == 200
    assert ctl.request("POST", "/v1/apps", {"name": "delta"}, token=tokens["team-b"])[0] == 201
    status, body = ctl.request("GET", "/v1/apps/delta/access", token=tokens["team-b"])
    assert status == 200 and body["grants"] == []
    assert ctl.request("GET", "/v1/apps/delta", token=tokens["team-c"])[0] == 403
    assert ctl.request("DELETE", "/v1/apps/delta", token=tokens["team-b"])[0] == 200


def berth(world: dict[str, Any], team: str, *args: str, check: bool = True
          ) -> subprocess.CompletedProcess[str]:
    """The real CLI, as `team`'s token."""
    env = {**os.environ, "BERTH_CLI_API_URL": f"http://127.0.0.1:{world['ctl'].ports.api}",
           "BERTH_CLI_TOKEN": world["tokens"][team], "NO_COLOR": "1", "COLUMNS": "200",
           "BERTH_CLI_CONFIG_DIR": str(world["ctl"].data_dir / "cli")}
    env.pop("BERTH_APP", None)
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
    return proc


def test_berth_access_add_list_remove_through_the_cli(world):
    # the group's -a serves its subcommands too
    out = berth(world, "team-b", "access", "-a", "beta", "add", "team-c", "--role", "viewer")
    assert "Team team-c is now viewer on beta" in out.stdout + out.stderr
    listed = berth(world, "team-c", "access", "-a", "beta").stdout
    rows = [line.split()[:2] for line in listed.splitlines()[1:]]
    assert rows == [["team-b", "owner"], ["team-c", "viewer"]], listed
    assert "beta" in berth(world, "team-c", "apps", "list").stdout
    refused = berth(world, "team-c", "config", "get", "-a", "beta", check=False)
    assert refused.returncode != 0
    assert "Error: needs deployer on app 'beta'; team-c is viewer" in refused.stderr
    assert "Hint: ask the app's owner (team-b): `berth access add team-c --role deployer " \
           "-a beta`" in refused.stderr
    out = berth(world, "team-b", "access", "add", "team-c", "--role", "deployer", "-a", "beta")
    assert "Team team-c is now deployer on beta (was viewer)" in out.stdout + out.stderr
    berth(world, "team-c", "config", "get", "-a", "beta")
    bad = berth(world, "team-b", "access", "add", "team-c", "--role", "admin", "-a", "beta",
                check=False)
    assert bad.returncode != 0 and "'admin' is not one of" in bad.stderr
    out = berth(world, "team-b", "access", "remove", "team-c", "-a", "beta")
    assert "Team team-c has no role on beta any more (was deployer)" in out.stdout + out.stderr
    again = berth(world, "team-b", "access", "remove", "team-c", "-a", "beta", check=False)
    assert again.returncode != 0 and "team team-c has no grant on app 'beta'" in again.stderr
    assert "beta" not in berth(world, "team-c", "apps", "list").stdout


def test_an_app_of_no_team_sends_a_team_to_the_admins_who_may_grant_it(world):
    ctl, token_c = world["ctl"], world["tokens"]["team-c"]
    assert ctl.request("POST", "/v1/apps", {"name": "platform-app"})[0] == 201
    status, body = ctl.request("GET", "/v1/apps/platform-app/config", token=token_c)
    assert status == 403 and body["error"]["message"] == \
        "needs deployer on app 'platform-app'; team-c has no role on it"
    assert body["error"]["hint"].startswith("ask an admin")
    status, body = ctl.request("POST", "/v1/apps/platform-app/access",
                               {"team": "team-c", "role": "deployer"})
    assert status == 201 and body["before"] is None
    assert ctl.request("GET", "/v1/apps/platform-app/config", token=token_c)[0] == 200
    status, body = ctl.request("GET", "/v1/apps/platform-app/access", token=token_c)
    assert body["owner"] is None and body["grants"][0]["role"] == "deployer"
    assert ctl.request("DELETE", "/v1/apps/platform-app", token=token_c)[0] == 403
    assert ctl.request("DELETE", "/v1/apps/platform-app")[0] == 200
