"""Team tokens through the real CLI: an admin (the token `berth up` wrote) makes a
team's token; with it `berth` works on the team's apps and is refused, with a
reason, on another team's."""
from __future__ import annotations


def test_a_team_token_works_on_its_apps_and_is_refused_on_others(berth):
    berth("apps", "create", "admins-app")
    out = berth("tokens", "create", "dev-a", "--team", "team-a")
    token = out.stdout.strip().splitlines()[-1]
    assert len(token) == 64
    listed = berth.json("tokens")
    assert {"name": "dev-a", "team": "team-a"}.items() <= next(
        t for t in listed["tokens"] if t["name"] == "dev-a").items()
    as_a = {"BERTH_CLI_TOKEN": token}
    out = berth("apps", "create", "team-a-app", env=as_a)
    assert "team team-a" in out.stderr + out.stdout
    names = [a["name"] for a in berth.json("apps", "list")["apps"]]
    assert {"admins-app", "team-a-app"} <= set(names)       # the admin sees both
    mine = berth("apps", "list", "--json", env=as_a).stdout
    assert "team-a-app" in mine and "admins-app" not in mine
    berth("config", "set", "X=1", "-a", "team-a-app", env=as_a)
    refused = berth("config", "get", "-a", "admins-app", env=as_a, check=False)
    assert refused.returncode != 0
    assert "Error: needs deployer on app 'admins-app'; team-a has no role on it" \
        in refused.stderr
    assert "Hint: ask an admin" in refused.stderr
    berth("tokens", "revoke", "dev-a")
    gone = berth("apps", "list", env=as_a, check=False)
    assert gone.returncode != 0 and "not recognized" in gone.stderr
