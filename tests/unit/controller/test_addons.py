"""Addons in the store: the state machine, what the app's releases get, reports from
job workers (here written by hand: no worker, no provisioner; the real ones are in
tests/integration/test_addon_jobs.py and tests/e2e/test_addons.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from controller.addons import (
    AddonState,
    AddonTransitionError,
    Attachment,
    Op,
    attachment_env,
    masked,
)
from controller.errors import Conflict, Invalid
from controller.store import Store

CREDS = {"url": "postgresql://u_1:s3cret@127.0.0.1:5433/db_1",
         "env": {"DATABASE_URL": "postgresql://u_1:s3cret@127.0.0.1:5433/db_1"},
         "host": "127.0.0.1", "port": 5433, "extra": {}}
ROTATED = {**CREDS, "url": "postgresql://u_1:n3w@127.0.0.1:5433/db_1",
           "env": {"DATABASE_URL": "postgresql://u_1:n3w@127.0.0.1:5433/db_1"}}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.db")
    s.create_app("shop")
    s.change_config("shop", {"GREETING": "hi"})
    return s


def ready(store: Store, engine: str = "postgres", app: str = "shop") -> str:
    addon = store.create_addon(app, engine, "shared")
    creds = CREDS if engine == "postgres" else {
        "url": "redis://u:pw@127.0.0.1:6390/0", "env": {"REDIS_URL":
                                                        "redis://u:pw@127.0.0.1:6390/0"},
        "host": "127.0.0.1", "port": 6390, "extra": {}}
    store.change_addon(addon.id, lambda a: a.report("provision", "done", credentials=creds))
    return addon.id


def test_provisioning_then_ready_makes_a_release_with_the_url(store: Store):
    addon = store.create_addon("shop", "postgres", "shared")
    assert addon.state is AddonState.PROVISIONING and addon.op is Op.PROVISION
    assert "DATABASE_URL" not in store.current_release("shop").config
    _, rel = store.change_addon(addon.id, lambda a: a.report("provision", "step",
                                                             step="creating role"))
    assert rel is None and store.addon(addon.id).step == "creating role"
    a, rel = store.change_addon(addon.id, lambda a: a.report("provision", "done",
                                                             credentials=CREDS))
    assert a.state is AddonState.READY and a.op is None
    assert rel is not None
    cur = store.current_release("shop")
    assert cur.config == {"GREETING": "hi", "DATABASE_URL": CREDS["url"]}
    assert cur.addon_keys == ("DATABASE_URL",)
    assert store.addon_ports() == [5433]


def test_a_stale_report_is_refused(store: Store):
    addon_id = ready(store)
    with pytest.raises(Conflict) as err:
        store.change_addon(addon_id, lambda a: a.report("provision", "done",
                                                        credentials=CREDS))
    assert err.value.code == "stale_task"


def test_rotate_makes_a_release_with_the_new_password(store: Store):
    addon_id = ready(store)
    store.change_addon(addon_id, lambda a: a.rotate())
    assert store.addon(addon_id).op is Op.ROTATE
    _, rel = store.change_addon(addon_id, lambda a: a.report("rotate", "done",
                                                             credentials=ROTATED))
    assert rel is not None and rel.config["DATABASE_URL"] == ROTATED["url"]
    assert rel.description.startswith("Update")


def test_a_failed_rotation_keeps_the_addon_ready(store: Store):
    addon_id = ready(store)
    store.change_addon(addon_id, lambda a: a.rotate())
    a, rel = store.change_addon(addon_id, lambda a: a.report(
        "rotate", "failed", error={"message": "boom", "hint": ""}))
    assert a.state is AddonState.READY and rel is None and a.error["message"] == "boom"


def test_destroy_drops_the_env_at_once_and_keeps_the_dump(store: Store):
    addon_id = ready(store)
    a, rel = store.change_addon(addon_id, lambda a: a.destroy(), "Destroy")
    assert a.state is AddonState.DESTROYING and rel is not None
    assert "DATABASE_URL" not in rel.config and rel.config["GREETING"] == "hi"
    assert rel.addon_keys == ()
    assert store.addon_ports() == []
    a, _ = store.change_addon(addon_id, lambda a: a.report("destroy", "done",
                                                           final_dump="/x/y.dump"))
    assert a.state is AddonState.DESTROYED and a.credentials is None
    assert a.final_dump == "/x/y.dump"
    assert store.addons("shop") == [] and len(store.addons("shop", with_destroyed=True)) == 1
    with pytest.raises(AddonTransitionError):
        store.change_addon(addon_id, lambda a: a.destroy())


def test_destroy_while_provisioning_makes_the_late_success_stale(store: Store):
    addon = store.create_addon("shop", "postgres", "shared")
    store.change_addon(addon.id, lambda a: a.destroy())
    with pytest.raises(Conflict):
        store.change_addon(addon.id, lambda a: a.report("provision", "done",
                                                        credentials=CREDS))
    assert store.addon(addon.id).op is Op.DESTROY


def test_attach_as_alias_and_split_then_detach(store: Store):
    addon_id = ready(store)
    _, rel = store.attach_addon(addon_id, "STORAGE")
    assert rel.config["STORAGE_URL"] == CREDS["url"]
    _, rel = store.attach_addon(addon_id, "db", "split")
    assert {k: rel.config[k] for k in rel.config if k.startswith("DB_")} == {
        "DB_HOST": "127.0.0.1", "DB_PORT": "5433", "DB_NAME": "db_1", "DB_USER": "u_1",
        "DB_PASSWORD": "s3cret"}
    with pytest.raises(Conflict):
        store.attach_addon(addon_id, "STORAGE")
    _, rel = store.detach_addon(addon_id, "STORAGE_URL")
    assert "STORAGE_URL" not in rel.config and "DB_HOST" in rel.config


def test_a_second_addon_of_an_engine_is_attached_under_its_id(store: Store):
    ready(store)
    second = store.create_addon("shop", "postgres", "dedicated")
    assert second.attachments[0].name == second.id.upper().replace("-", "_")


def test_bad_names_engines_plans(store: Store):
    with pytest.raises(Invalid):
        store.create_addon("shop", "mysql", "shared")
    with pytest.raises(Invalid):
        store.create_addon("shop", "postgres", "huge")
    addon_id = ready(store)
    for bad in ("1X", "BERTH_X", "PATH", "has space"):
        with pytest.raises(Invalid):
            store.attach_addon(addon_id, bad)


def test_config_cannot_touch_addon_keys(store: Store):
    ready(store)
    with pytest.raises(Invalid) as err:
        store.change_config("shop", {"DATABASE_URL": "postgres://elsewhere"})
    assert "addon" in err.value.message
    with pytest.raises(Invalid):
        store.change_config("shop", {"DATABASE_URL": None})


def test_rollback_keeps_todays_credentials(store: Store):
    store.add_release("shop", slug="a" * 64, procfile={"web": "x"}, config={},
                      description="Deploy")
    old = store.current_release("shop").version
    addon_id = ready(store)
    store.change_addon(addon_id, lambda a: a.rotate())
    store.change_addon(addon_id, lambda a: a.report("rotate", "done", credentials=ROTATED))
    rel = store.rollback("shop", old)
    assert rel.config["DATABASE_URL"] == ROTATED["url"]
    store.change_addon(addon_id, lambda a: a.destroy())
    before_destroy = [r for r in store.releases("shop") if r.addon_keys][0]
    rel = store.rollback("shop", before_destroy.version)
    assert "DATABASE_URL" not in rel.config


def test_redis_env_and_masking():
    creds = {"url": "redis://app:pw@127.0.0.1:6390/0",
             "env": {"REDIS_URL": "redis://app:pw@127.0.0.1:6390/0",
                     "REDIS_SENTINEL_URL": "redis+sentinel://x"}}
    assert attachment_env("redis", creds, Attachment("CACHE")) == {
        "CACHE_URL": creds["url"], "CACHE_SENTINEL_URL": "redis+sentinel://x"}
    assert masked(creds["url"]) == "redis://app:***@127.0.0.1:6390/0"
    assert masked("redis://127.0.0.1:6390/0") == "redis://127.0.0.1:6390/0"


def test_quota_state_changes(store: Store):
    addon_id = ready(store)
    assert store.set_addon_quota(addon_id, "warn", 90.0)
    assert not store.set_addon_quota(addon_id, "warn", 91.0)
    assert store.addon(addon_id).usage_mb == 91.0
    with pytest.raises(Invalid):
        store.set_addon_quota(addon_id, "panic", 1.0)


def test_public_view_has_no_password(store: Store):
    addon_id = ready(store)
    shown = store.addon(addon_id).public()
    assert "s3cret" not in repr(shown) and shown["env_keys"] == ["DATABASE_URL"]


def test_a_moved_addon_makes_a_release_only_when_its_env_changed(store: Store):
    addon_id = ready(store)
    before = store.current_release("shop").version
    # the periodic ha check reports the same credentials: nothing to roll out
    a, rel = store.change_addon(addon_id, lambda a: a.report("moved", "done",
                                                             credentials=CREDS))
    assert rel is None and a.op is None and store.current_release("shop").version == before
    moved = {**CREDS, "extra": {"DATABASE_READ_URL": "postgresql://u_1:s3cret@127.0.0.3:5434/db_1"},
             "env": {**CREDS["env"],
                     "DATABASE_READ_URL": "postgresql://u_1:s3cret@127.0.0.3:5434/db_1"}}
    a, rel = store.change_addon(addon_id, lambda a: a.report(
        "moved", "done", credentials=moved, step="failed over to the standby"))
    assert rel is not None and rel.version == before + 1
    assert rel.config["DATABASE_READ_URL"].endswith("@127.0.0.3:5434/db_1")
    assert a.step == "failed over to the standby"
    # a moved report about an addon being destroyed is stale
    store.change_addon(addon_id, lambda a: a.destroy())
    with pytest.raises(Conflict) as err:
        store.change_addon(addon_id, lambda a: a.report("moved", "done", credentials=moved))
    assert err.value.code == "stale_task"
