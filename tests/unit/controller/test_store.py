import sqlite3

import pytest

from controller.errors import Conflict, Invalid, NotFound
from controller.store import MIGRATIONS, Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "state.db")


def test_schema_is_created_and_migration_is_idempotent(tmp_path):
    s = Store(tmp_path / "s.db")
    assert s.schema_version() == len(MIGRATIONS)
    s.create_app("keep")
    again = Store(tmp_path / "s.db")
    assert again.list_apps() == ["keep"]


@pytest.mark.parametrize("name", ["", "A", "a", "Bad_Name", "-x", "x-", "a" * 31, "x.y", "../etc"])
def test_invalid_app_names_are_refused(store, name):
    with pytest.raises(Invalid, match="invalid app name"):
        store.create_app(name)
    assert store.list_apps() == []


def test_duplicate_app_conflicts(store):
    store.create_app("web1")
    with pytest.raises(Conflict):
        store.create_app("web1")


def test_config_changes_make_releases_and_rollback(store):
    store.create_app("shop")
    v1 = store.add_release("shop", slug="a" * 64, procfile={"web": "gunicorn app:app"},
                           config={}, description="Deploy")
    v2 = store.change_config("shop", {"GREETING": "hi"})
    assert (v1.version, v2.version) == (1, 2) and v2.slug == v1.slug
    assert v2.config == {"GREETING": "hi"} and v2.description == "Set GREETING"
    v3 = store.rollback("shop", None)
    assert v3.version == 3 and v3.config == {} and v3.description == "Rollback to v1"
    assert [r.version for r in store.releases("shop")] == [3, 2, 1]


def test_config_rejects_reserved_and_unknown_keys(store):
    store.create_app("shop")
    for key in ("PORT", "BERTH_APP", "1BAD", "A-B"):
        with pytest.raises(Invalid):
            store.change_config("shop", {key: "x"})
    with pytest.raises(NotFound, match="NOPE"):
        store.change_config("shop", {"NOPE": None})
    assert store.releases("shop") == []


def test_rollback_without_deploys_explains(store):
    store.create_app("shop")
    with pytest.raises(Conflict, match="no releases"):
        store.rollback("shop", None)
    store.change_config("shop", {"A": "1"})
    with pytest.raises(Conflict, match="no earlier deployed release"):
        store.rollback("shop", None)


def test_unknown_app_is_not_found_everywhere(store):
    for call in (lambda: store.releases("ghost"), lambda: store.scale("ghost", {"web": 1}),
                 lambda: store.change_config("ghost", {"A": "1"}),
                 lambda: store.destroy_app("ghost")):
        with pytest.raises(NotFound, match="app 'ghost' not found"):
            call()


def test_domains_are_unique_and_outside_base_domain(store):
    store.create_app("one")
    store.create_app("two")
    store.add_domain("one", "WWW.Example.com", "localhost")
    assert store.domains("one") == {"one": ["www.example.com"]}
    with pytest.raises(Conflict):
        store.add_domain("two", "www.example.com", "localhost")
    with pytest.raises(Invalid):
        store.add_domain("two", "two.localhost", "localhost")


def test_destroy_removes_everything(store, tmp_path):
    store.create_app("gone")
    store.change_config("gone", {"A": "1"})
    store.destroy_app("gone")
    db = sqlite3.connect(tmp_path / "state.db")
    for table in ("apps", "releases", "formation", "domains"):
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    for stmt in MIGRATIONS[0]:
        db.execute(stmt)
    db.execute("INSERT INTO apps (name, created_at) VALUES ('old', 0)")
    db.commit()
    db.close()
    s = Store(tmp_path / "old.db")
    assert s.schema_version() == len(MIGRATIONS)
    assert s.limits("old") == {"maintenance": False, "max_body_mb": None,
                               "memory_mb": None, "pids_max": None}
    s.set_maintenance("old", True)
    s.set_max_body("old", 5)
    s.set_process_limit("old", "memory_mb", 128)
    assert s.limits("old") == {"maintenance": True, "max_body_mb": 5, "memory_mb": 128,
                               "pids_max": None}
    with pytest.raises(Invalid):
        s.set_max_body("old", 0)
    with pytest.raises(Invalid):
        s.set_process_limit("old", "memory_mb", 4)
    with pytest.raises(Invalid):
        s.set_process_limit("old", "pids_max", True)


def test_scale_refuses_release_unknown_types_and_counts_over_the_maximum(store):
    store.create_app("sc")
    store.add_release("sc", slug="s" * 64, procfile={"web": "gunicorn a:a",
                                                     "release": "python migrate.py"},
                      config={}, description="Deploy")
    with pytest.raises(Invalid, match="not a process type") as info:
        store.scale("sc", {"release": 1})
    assert "web=2" in info.value.hint
    with pytest.raises(Invalid, match="'worker' is not in the Procfile"):
        store.scale("sc", {"worker": 1})
    with pytest.raises(Invalid, match="the most this app may run is 4") as info:
        store.scale("sc", {"web": 5}, maximum=4)
    assert "max_per_process_type" in info.value.hint
    for bad in (-1, True, "2"):
        with pytest.raises(Invalid, match="cannot scale web"):
            store.scale("sc", {"web": bad}, maximum=4)
    assert store.scale("sc", {"web": 4}, maximum=4)["web"] == 4


def test_grants_give_other_teams_a_role_and_leave_with_the_app(store, tmp_path):
    store.create_app("shop", "team-a")
    assert store.app_role("shop", "team-a") == "owner"
    assert store.app_role("shop", "team-c") is None
    assert store.grant_access("shop", "team-c", "viewer") is None
    assert store.grant_access("shop", "team-c", "deployer") == "viewer"    # replaced
    assert store.app_role("shop", "team-c") == "deployer"
    assert store.team_roles("team-c") == {"shop": "deployer"}
    assert store.team_roles("team-a") == {"shop": "owner"}
    assert store.access("shop")["owner"] == "team-a"
    assert [(g["team"], g["role"]) for g in store.access("shop")["grants"]] == [
        ("team-c", "deployer")]
    with pytest.raises(Invalid, match="unknown role"):
        store.grant_access("shop", "team-c", "admin")
    with pytest.raises(Invalid, match="owns app 'shop' already"):
        store.grant_access("shop", "team-a", "viewer")
    with pytest.raises(Invalid, match="invalid team name"):
        store.grant_access("shop", "Team C", "viewer")
    with pytest.raises(NotFound):
        store.grant_access("ghost", "team-c", "viewer")
    assert store.revoke_access("shop", "team-c") == "deployer"
    with pytest.raises(NotFound, match="no grant"):
        store.revoke_access("shop", "team-c")
    store.grant_access("shop", "team-d", "owner")
    store.destroy_app("shop")
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("SELECT COUNT(*) FROM app_access").fetchone()[0] == 0
    store.create_app("shop", "team-a")                 # the same name: no old grants
    assert store.team_roles("team-d") == {}
