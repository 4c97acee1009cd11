"""Real Django and Flask apps deploy with no edits (issue 8: settings_templates,
static files, app manifest): an unedited `django-admin startproject` plus a Procfile
and requirements.txt, and a Flask app factory, pushed through the real CLI and
checked through the balancer."""
from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Response, request

DJANGO_HOST = "www.djangoshop.example"


@pytest.fixture(scope="module")
def django_lib(tmp_path_factory: pytest.TempPathFactory, venv_cache: Path) -> Path:
    """Django for the test's own `django-admin startproject` (the app gets its own in
    its virtualenv): wheels from the shared cache when there, else the index."""
    target = tmp_path_factory.mktemp("django-lib")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "--target", str(target),
                    "--find-links", str(venv_cache), "Django"],
                   check=True, capture_output=True, timeout=170)
    return target


def startproject(lib: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite", str(dest)],
                   check=True, env={**os.environ, "PYTHONPATH": str(lib)}, timeout=60)
    # gunicorn's access log on stdout, so `berth logs` shows what reached the app
    (dest / "Procfile").write_text("web: gunicorn --access-logfile - mysite.wsgi\n")
    (dest / "requirements.txt").write_text("Django\ngunicorn\n")
    return dest


@pytest.mark.timeout(180)
def test_unedited_django_project_is_served_with_its_admin(berth, tmp_path, django_lib):
    app = startproject(django_lib, tmp_path / "mysite")
    assert "DEBUG = True" in (app / "mysite" / "settings.py").read_text()   # as generated
    berth("apps", "create", "dj")
    started = time.monotonic()
    out = berth("push", str(app), "-a", "dj", timeout=150).stdout
    print(out)
    print(f"\nDjango push (cold venv: {'Making virtualenv' in out}): "
          f"{time.monotonic() - started:.1f}s")
    assert "Django project (settings mysite.settings)" in out
    assert "collectstatic --noinput" in out and "static files copied" in out
    assert "Made a SECRET_KEY" in out

    # DEBUG is off: a 404 is Django's plain page, not the debug page
    home = berth.get("dj", "/")
    assert home.status == 404, home.text
    assert "DEBUG = True" not in home.text and "URLconf" not in home.text
    assert berth.get("dj", "/admin/").status == 302
    login = berth.get("dj", "/admin/login/")
    assert login.status == 200 and "Django administration" in login.text
    css = re.search(r'href="(/static/admin/css/[^"]+\.css)"', login.text)
    assert css, login.text[:500]
    sheet = berth.get("dj", css.group(1))
    assert sheet.status == 200 and sheet.headers["Content-Type"].startswith("text/css")
    assert b"{" in sheet.body
    # ... served by the platform's static file server, not by gunicorn
    assert sheet.headers["Server"] == "berth-static", sheet.headers
    assert sheet.headers["Cache-Control"] == "public, max-age=60"     # not a hashed name
    probe = f"{css.group(1)}?probe={time.time_ns()}"
    fresh = conditional_get(berth.platform.ports.balancer, probe)
    assert fresh.status == 200 and fresh.headers["ETag"] == sheet.headers["ETag"]
    again = conditional_get(berth.platform.ports.balancer, probe, sheet.headers["ETag"])
    assert again.status == 304 and again.body == b"" and again.headers["Server"] == "berth-static"
    berth.wait_for(lambda: "GET /admin/login/" in berth("logs", "-a", "dj").stdout,
                   what="gunicorn's access log in berth logs")
    logs = berth("logs", "-a", "dj", "-n", "1000").stdout.splitlines()
    gunicorn = [line for line in logs if " app[web." in line]
    assert any("GET /admin/login/" in line for line in gunicorn)
    assert not [line for line in gunicorn if "probe=" in line], gunicorn
    assert [line for line in logs if " router[" in line and "probe=" in line]  # balancer's

    key = berth("config", "get", "SECRET_KEY", "-a", "dj").stdout.strip()
    assert len(key) >= 50 and not key.startswith("django-insecure")

    # a custom domain is in ALLOWED_HOSTS once the release it made is serving
    berth("domains", "add", DJANGO_HOST, "-a", "dj")
    port = berth.platform.ports.balancer
    berth.wait_for(lambda: request(port, DJANGO_HOST, "/admin/login/").status == 200,
                   timeout=90, what="the custom domain accepted by Django")
    assert "Add domain" in berth("releases", "-a", "dj").stdout


def conditional_get(port: int, path: str, etag: str | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Host": "dj.localhost", **({"If-None-Match": etag} if etag else {})}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


FLASK_APP = '''\
from flask import Flask


def create_app():
    app = Flask(__name__)

    @app.get("/")
    def index():
        return {"secret": app.config["SECRET_KEY"]}

    @app.get("/healthz")
    def health():
        return "ok"

    return app
'''


@pytest.mark.timeout(180)
def test_flask_factory_gets_its_secret_key_and_the_manifest_holds(berth, tmp_path):
    app = tmp_path / "flaskapp"
    app.mkdir()
    (app / "app.py").write_text(FLASK_APP)
    (app / "requirements.txt").write_text("flask\ngunicorn\n")
    (app / "Procfile").write_text("web: gunicorn 'app:create_app()'\n")
    (app / "berth.yaml").write_text('python: "3.99"\nhealthcheck: /healthz\n'
                                    'max_processes:\n  web: 2\n')
    berth("apps", "create", "fl")
    failed = berth("push", str(app), "-a", "fl", check=False, timeout=120)
    assert failed.returncode != 0
    have = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert "asks for python 3.99" in failed.stdout + failed.stderr
    assert have in failed.stdout + failed.stderr

    (app / "berth.yaml").write_text(f'python: "{have[6:]}"\nhealthcheck: /healthz\n'
                                    'max_processes:\n  web: 2\n')
    # a top-level static/ (Flask's default) is found and served by the platform
    (app / "static").mkdir()
    (app / "static" / "site.css").write_text("body { color: teal }\n")
    out = berth("push", str(app), "-a", "fl", timeout=150).stdout
    assert "Flask app: Berth's settings layers are on" in out
    secret = berth("config", "get", "SECRET_KEY", "-a", "fl").stdout.strip()
    r = berth.get("fl", "/")
    assert r.status == 200, r.text
    assert r.text and secret and secret in r.text
    sheet = berth.wait_for(lambda: (lambda r: r.headers.get("Server") == "berth-static" and r)(
        berth.get("fl", "/static/site.css")), timeout=30, what="Flask static from the platform")
    assert sheet.status == 200 and sheet.text == "body { color: teal }\n"
    assert sheet.headers["Content-Type"].startswith("text/css") and sheet.headers["ETag"]

    refused = berth("scale", "web=3", "-a", "fl", check=False)
    assert refused.returncode != 0 and "allows at most 2" in refused.stderr

    # the app may turn the layers off: its own (unset) SECRET_KEY again
    berth("config", "set", "BERTH_SETTINGS_INJECTION=off", "-a", "fl")
    berth.wait_for(lambda: '"secret":null' in berth.get("fl", "/").text.replace(" ", ""),
                   timeout=60, what="injection off")
