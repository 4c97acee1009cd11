"""Addons end to end (issue 9): the platform as `berth up` starts it, with its broker,
Celery job worker and beat, and the real provisioner (dbprovision.service) making real
PostgreSQL and Redis databases; a pushed Flask app (psycopg2-binary, redis) writes and
reads through them; the firewall lets it reach its database's port and still not the
platform's; destroying an addon takes the variables out in a new release."""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

from cli.localplatform import LocalPlatform
from tests.conftest import forget_apps, new_apps_dir
from tests.e2e.conftest import Berth, start_platform

pytest.importorskip("dbprovision.service", reason="the provisioner is not built yet")

APP_PY = '''\
import json, os, socket
from flask import Flask, request

app = Flask(__name__)


@app.get("/env")
def env():
    return json.dumps(sorted(k for k in os.environ
                             if k.endswith("_URL") or k.startswith("DB_")))


@app.get("/pg")
def pg():
    url = os.environ.get("DATABASE_URL")
    if not url:
        return "no DATABASE_URL", 404
    import psycopg2
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, "
                        "body text NOT NULL)")
            cur.execute("INSERT INTO notes (body) VALUES (%s)",
                        (request.args.get("note", "hello"),))
            cur.execute("SELECT count(*), string_agg(body, ',' ORDER BY id) FROM notes")
            count, bodies = cur.fetchone()
    finally:
        conn.close()
    return json.dumps({"count": count, "bodies": bodies})


@app.get("/redis")
def red():
    url = os.environ.get("REDIS_URL")
    if not url:
        return "no REDIS_URL", 404
    import redis
    from urllib.parse import urlsplit
    # a shared plan's user may touch only keys under its own prefix
    user = urlsplit(url).username
    key = os.environ.get("REDIS_KEY_PREFIX") or (f"{user}:" if user else "")
    key += "hits"
    client = redis.Redis.from_url(url)
    return json.dumps({"hits": client.incr(key), "key": key})


@app.get("/connect/<int:port>")
def connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return f"refused: {exc}"
'''

APP = "notes"


@pytest.fixture(scope="module")
def platform(venv_cache: Path, berth_root: Path):
    apps = new_apps_dir(berth_root)
    # database servers run as postgres/redis: their data dir must be reachable (o+x)
    data = berth_root / f"addons-platform-{uuid.uuid4().hex[:8]}"
    p = start_platform(data, venv_cache, apps, jobs=True)
    yield p
    p.stop()
    forget_apps(apps)


@pytest.fixture(scope="module")
def berth(platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory) -> Berth:
    return Berth(platform, tmp_path_factory.mktemp("cli-config"))


@pytest.fixture(scope="module")
def pushed(berth: Berth, tmp_path_factory: pytest.TempPathFactory) -> str:
    src = tmp_path_factory.mktemp("notes-app")
    (src / "app.py").write_text(APP_PY)
    (src / "requirements.txt").write_text("flask>=3\ngunicorn>=23\npsycopg2-binary\nredis\n")
    (src / "Procfile").write_text("web: gunicorn app:app --workers 2\n")
    berth("apps", "create", APP)
    berth("push", str(src), "-a", APP, timeout=280)
    berth.wait_for(lambda: berth.get(APP, "/env").status == 200, 60, "the app serving")
    return APP


def addon_id(out: str) -> str:
    return out.strip().splitlines()[-1]


def env_keys(berth: Berth) -> list[str]:
    resp = berth.get(APP, "/env")
    assert resp.status == 200, resp.text
    return json.loads(resp.text)


@pytest.mark.timeout(400)
def test_postgres_addon_through_the_app(berth: Berth, pushed: str,
                                                   platform: LocalPlatform):
    before = berth.json("releases", "-a", APP)["current"]
    started = time.monotonic()
    out = berth("addons", "create", "postgres", "--plan", "shared", "-a", APP).stdout
    took = time.monotonic() - started
    print(out, f"\n`berth addons create postgres --plan shared`: {took:.2f}s wall")
    pg = addon_id(out)
    assert re.match(r"^postgres-[0-9a-f]{6}$", pg)
    assert re.search(r"DATABASE_URL.* in release v\d+", out)
    releases = berth.json("releases", "-a", APP)
    assert releases["current"] > before
    assert "DATABASE_URL" in releases["releases"][0]["config_keys"]

    # the instances roll to the release with the URL, with no manual step
    berth.wait_for(lambda: "DATABASE_URL" in env_keys(berth), 60, "DATABASE_URL in the app")
    first = json.loads(berth.wait_for(lambda: (r := berth.get(APP, "/pg?note=a")).status
                                      == 200 and r.text, 30, "a row written"))
    second = json.loads(berth.get(APP, "/pg?note=b").text)
    assert second["count"] == first["count"] + 1 and second["bodies"].endswith("a,b")

    # the firewall: its database's port is open to it, the platform's ports are not
    info = berth.json("addons", "info", pg)
    assert info["state"] == "ready" and "DATABASE_URL" in info["env_keys"]
    assert "***" in info["url"]
    assert berth.get(APP, f"/connect/{info['port']}").text == "connected"
    for port in (platform.ports.api, platform.ports.broker, platform.ports.control):
        assert berth.get(APP, f"/connect/{port}").text.startswith("refused"), port

    # psql inside the app's jail, through berth run
    out = berth("psql", "-a", APP, "--", "-At", "-c", "SELECT count(*) FROM notes").stdout
    assert out.strip().splitlines()[-1] == str(second["count"])

    # another name for it; split variables
    out = berth("addons", "attach", pg, "--as", "STORAGE").stdout
    assert "STORAGE_URL" in out
    berth("addons", "attach", pg, "--as", "DB", "--split")
    berth.wait_for(lambda: {"STORAGE_URL", "DB_HOST", "DB_PASSWORD"} <= set(env_keys(berth)),
                   60, "the aliases in the app")

    # rotation: a new release, the app keeps working with the new password
    old_url = berth("config", "get", "DATABASE_URL", "-a", APP).stdout.strip()
    berth("addons", "credentials", "rotate", pg)
    new_url = berth("config", "get", "DATABASE_URL", "-a", APP).stdout.strip()
    assert new_url != old_url
    berth.wait_for(lambda: (r := berth.get(APP, "/pg?note=c")).status == 200 and r.text,
                   60, "writes with the rotated password")

    # destroy: the variables leave in a new release, the database goes, a dump stays
    refused = berth("addons", "destroy", pg, check=False, input="wrong\n")
    assert refused.returncode != 0 and "nothing was destroyed" in refused.stderr
    out = berth("addons", "destroy", pg, "--confirm", APP).stdout
    print(out)
    assert "final dump:" in out
    dump = Path(out.split("final dump:")[1].split()[0])
    assert dump.exists() and dump.stat().st_size > 0
    rel = berth.json("releases", "-a", APP)["releases"][0]
    assert not {"DATABASE_URL", "STORAGE_URL", "DB_HOST"} & set(rel["config_keys"])
    berth.wait_for(lambda: berth.get(APP, "/pg").status == 404, 60, "DATABASE_URL gone")
    assert berth.json("addons", "info", pg)["state"] == "destroyed"
    assert berth.json("addons", "-a", APP)["addons"] == []


@pytest.mark.timeout(300)
def test_redis_addon_through_the_app(berth: Berth, pushed: str):
    started = time.monotonic()
    out = berth("addons", "create", "redis", "--plan", "shared", "-a", APP).stdout
    print(out, f"\n`berth addons create redis --plan shared`: "
               f"{time.monotonic() - started:.2f}s wall")
    red = addon_id(out)
    berth.wait_for(lambda: berth.get(APP, "/redis").status == 200, 60, "REDIS_URL in the app")
    hits = json.loads(berth.get(APP, "/redis").text)["hits"]
    again = json.loads(berth.get(APP, "/redis").text)
    assert again["hits"] == hits + 1
    out = berth("redis-cli", "-a", APP, "--", "get", again["key"]).stdout
    assert out.strip().splitlines()[-1].strip('"') == str(hits + 1)

    out = berth("addons", "destroy", red, "--confirm", APP).stdout
    assert "REDIS_URL left" in out
    assert "REDIS_URL" not in berth.json("releases", "-a", APP)["releases"][0]["config_keys"]
    berth.wait_for(lambda: berth.get(APP, "/redis").status == 404, 60, "REDIS_URL gone")
