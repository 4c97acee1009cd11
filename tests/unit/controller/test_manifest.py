"""The app manifest (berth.yaml): parsed at upload, errors naming the line; stored
with builds and releases; its maxima and switch honoured by the store."""
from __future__ import annotations

import sqlite3

import pytest

from controller import manifest
from controller.errors import Invalid
from controller.store import MIGRATIONS, Store
from messaging.manifest import Manifest
from tests.unit.controller.test_slugcheck import GOOD, check, make_tar

PROCFILE = {"web": "gunicorn app:app", "worker": "python worker.py"}

FULL = b"""# every key
python: 3.10
healthcheck: /healthz
static:
  url: /assets
  dirs: [web/static, more/]
memory_mb: 256
max_processes:
  web: 4
  worker: 0
env_aliases:
  DB_URL: DATABASE_URL
settings_injection: off
"""


def test_every_key_parses() -> None:
    m = manifest.parse(FULL, PROCFILE)
    assert m == Manifest(python="3.10", healthcheck="/healthz", static_url="/assets/",
                         static_dirs=("web/static", "more"), memory_mb=256,
                         max_processes={"web": 4, "worker": 0},
                         env_aliases={"DB_URL": "DATABASE_URL"}, settings_injection=False)
    assert Manifest.from_wire(m.to_wire()) == m


@pytest.mark.parametrize("text, default", [(b"", Manifest()), (b"# nothing\n", Manifest()),
                                           (b'python: "python3.12"\n', Manifest("3.12"))])
def test_empty_file_and_spellings(text: bytes, default: Manifest) -> None:
    assert manifest.parse(text, PROCFILE) == default


@pytest.mark.parametrize("text, line, words", [
    (b"python: 3.12\nweb: 2\n", 2, "unknown key 'web'"),
    (b"python: 2.7\n", 1, "python must be a version like 3.12"),
    (b"python: 3.12\nhealthcheck: healthz\n", 2, "must be a URL path starting with /"),
    (b"memory_mb: 8\n", 1, "memory_mb must be a whole number of MB from 16"),
    (b"memory_mb: [1]\n", 1, "memory_mb must be a single value"),
    (b"max_processes:\n  web: 2\n  clock: 1\n", 3, "names 'clock', which the Procfile"),
    (b"max_processes:\n  web: -1\n", 2, "max_processes.web must be a count from 0"),
    (b"max_processes: 3\n", 1, "max_processes must be a mapping"),
    (b"static:\n  url: /s/\n  dirs: /abs\n", 3, "static dirs must be a list"),
    (b"static:\n  dirs:\n    - ok\n    - ../up\n", 4, "static dir '../up' must be a path"),
    (b"static:\n  root: x\n", 2, "unknown key static.root"),
    (b"env_aliases:\n  PORT: X\n", 2, "env alias 'PORT' is not a name an app may set"),
    (b"env_aliases:\n  A: not a name\n", 2, "env_aliases.A must name a config var"),
    (b"settings_injection: maybe\n", 1, "settings_injection must be on or off"),
    (b"python: 3.12\npython: 3.11\n", 2, "python appears twice"),
    (b"- python\n", 1, "berth.yaml must be a mapping"),
    (b"python: 3.12\nstatic:\n  url: [/s/\n", 4, "not valid YAML"),
    (b"python: 3.12\n  healthcheck: /x\n", 2, "not valid YAML"),
])
def test_errors_name_the_file_and_line(text: bytes, line: int, words: str) -> None:
    with pytest.raises(Invalid) as err:
        manifest.parse(text, PROCFILE)
    assert err.value.message.startswith(f"berth.yaml line {line}: "), err.value.message
    assert words in err.value.message
    assert err.value.hint


def test_slugcheck_reads_the_manifest_and_reserves_the_platform_dir(tmp_path) -> None:
    plain = check(make_tar(tmp_path / "a.tgz"))
    assert plain.manifest == Manifest()
    withm = check(make_tar(tmp_path / "b.tgz", {**GOOD, "berth.yaml": b"memory_mb: 64\n"}))
    assert withm.manifest.memory_mb == 64
    with pytest.raises(Invalid, match="berth.yaml line 1: unknown key"):
        check(make_tar(tmp_path / "c.tgz", {**GOOD, "berth.yaml": b"nope: 1\n"}))
    with pytest.raises(Invalid, match="is the platform's"):
        check(make_tar(tmp_path / "d.tgz", {**GOOD, ".berth/static.json": b"{}"}))


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "state.db")
    s.create_app("shop")
    return s


def deploy(store: Store, m: Manifest) -> None:
    build = store.add_build("shop", "a" * 64, PROCFILE, m)
    store.add_release("shop", slug="a" * 64, procfile=PROCFILE, config={"A": "1"},
                      description="Deploy", manifest=store.build_manifest(build))
    store.finish_build(build, "succeeded", 1, detected={"framework": "django"})


def test_the_manifest_travels_with_builds_and_every_later_release(store: Store) -> None:
    m = Manifest(python="3.11", max_processes={"web": 2})
    deploy(store, m)
    assert store.current_release("shop").manifest == m
    assert store.change_config("shop", {"B": "2"}).manifest == m
    store.add_domain("shop", "shop.example", "localhost")
    assert store.current_release("shop").description == "Add domain shop.example"
    assert store.rollback("shop", 1).manifest == m
    builds = store._q("SELECT id FROM builds")
    assert store.build(builds[0][0])["detected"] == {"framework": "django"}
    assert store.build(builds[0][0])["manifest"]["python"] == "3.11"


def test_domains_roll_a_deployed_app_only(store: Store) -> None:
    store.add_domain("shop", "early.example", "localhost")
    assert store.current_release("shop") is None
    deploy(store, Manifest())
    store.add_domain("shop", "www.example.com", "localhost")
    store.remove_domain("shop", "early.example")
    assert [r.description for r in store.releases("shop")[:2]] == [
        "Remove domain early.example", "Add domain www.example.com"]
    assert store.desired()["shop"]["domains"] == ["www.example.com"]


def test_max_processes_bounds_scale_and_the_formation(store: Store) -> None:
    store.scale("shop", {"web": 3})
    deploy(store, Manifest(max_processes={"web": 2}))
    assert store.desired()["shop"]["formation"]["web"] == 2
    with pytest.raises(Invalid, match="berth.yaml allows at most 2") as err:
        store.scale("shop", {"web": 3})
    assert "max_processes.web" in err.value.hint
    assert store.scale("shop", {"web": 2})["web"] == 2


def test_the_injection_switch_is_the_one_berth_var_an_app_sets(store: Store) -> None:
    assert store.change_config("shop", {"BERTH_SETTINGS_INJECTION": "off"}).config == {
        "BERTH_SETTINGS_INJECTION": "off"}
    with pytest.raises(Invalid, match="must be on or off"):
        store.change_config("shop", {"BERTH_SETTINGS_INJECTION": "sometimes"})
    with pytest.raises(Invalid, match="set by the platform"):
        store.change_config("shop", {"BERTH_HOSTNAMES": "evil.example"})


def test_a_store_from_before_the_manifest_migrates(tmp_path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (3)")
    for steps in MIGRATIONS[:3]:
        for stmt in steps:
            db.execute(stmt)
    db.execute("INSERT INTO apps (name, created_at) VALUES ('old', 0)")
    db.execute("INSERT INTO releases VALUES ('old', 1, 'x', '{\"web\": \"w\"}', '{}', 'D', 0)")
    db.close()
    store = Store(path)
    assert store.schema_version() == len(MIGRATIONS)
    assert store.current_release("old").manifest == Manifest()
