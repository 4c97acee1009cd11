"""Bad input gets a clear error that says what to do, and changes nothing."""
from __future__ import annotations

import io
import json
import os
import tarfile
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import copy_example


def api(berth, method, path, body=None, token="admin", headers=None):
    token = berth.platform.admin_token if token == "admin" else token
    req = urllib.request.Request(berth.platform.api_url + path, data=body, method=method,
                                 headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def tarball(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


GOOD = {"requirements.txt": b"flask\ngunicorn\n", "Procfile": b"web: gunicorn app:app\n",
        "app.py": b"from flask import Flask\napp = Flask(__name__)\n"}


@pytest.fixture(scope="module")
def victim(berth):
    berth("apps", "create", "victim")
    return "victim"


def releases(berth, app):
    return api(berth, "GET", f"/v1/apps/{app}/releases")[1]["releases"]


@pytest.mark.parametrize("files,links,needle", [
    ({**GOOD, "../escape.py": b"x"}, None, "../escape.py"),
    ({**GOOD, "/tmp/berth-abs-escape": b"x"}, None, "/tmp/berth-abs-escape"),
    (GOOD, {"passwd": "/etc/passwd"}, "passwd"),
    (GOOD, {"up": "../../../etc"}, "up"),
])
def test_hostile_tarballs_are_refused(berth, victim, files, links, needle):
    slugs = berth.platform.data_dir / "controller" / "slugs"
    before = set(slugs.iterdir())
    status, body = api(berth, "POST", f"/v1/apps/{victim}/builds", tarball(files, links),
                       headers={"Content-Type": "application/gzip"})
    assert status == 400
    assert needle in body["error"]["message"] and body["error"]["hint"]
    assert releases(berth, victim) == []
    assert not Path("/tmp/berth-abs-escape").exists()
    assert set(slugs.iterdir()) == before
    assert list((berth.platform.data_dir / "controller" / "uploads").iterdir()) == []


@pytest.mark.parametrize("drop,needle", [("requirements.txt", "requirements.txt"),
                                         ("Procfile", "Procfile")])
def test_upload_missing_files_names_them(berth, victim, drop, needle):
    files = {k: v for k, v in GOOD.items() if k != drop}
    status, body = api(berth, "POST", f"/v1/apps/{victim}/builds", tarball(files))
    assert status == 400 and needle in body["error"]["message"]
    assert releases(berth, victim) == []


def test_push_without_web_process_names_it(berth, victim, tmp_path):
    app = copy_example(tmp_path / "noweb")
    (app / "Procfile").write_text("worker: python worker.py\n")
    out = berth("push", str(app), "-a", victim, check=False)
    assert out.returncode != 0
    assert "Error: the Procfile declares no `web` process" in out.stderr
    assert "Hint: add a line like `web: gunicorn app:app`" in out.stderr
    assert releases(berth, victim) == []


def test_push_without_requirements_names_the_file(berth, victim, tmp_path):
    app = copy_example(tmp_path / "noreq")
    (app / "requirements.txt").unlink()
    out = berth("push", str(app), "-a", victim, check=False)
    assert out.returncode != 0 and "requirements.txt is missing" in out.stderr
    assert "Hint:" in out.stderr


def test_push_with_link_outside_is_refused_by_the_cli(berth, victim, tmp_path):
    app = copy_example(tmp_path / "linky")
    os.symlink("/etc/passwd", app / "passwd")
    out = berth("push", str(app), "-a", victim, check=False)
    assert out.returncode != 0 and "outside the app" in out.stderr


def test_unknown_app(berth):
    for args in (("ps", "-a", "ghost"), ("push", ".", "-a", "ghost"), ("releases", "-a", "ghost"),
                 ("config", "set", "A=1", "-a", "ghost"), ("logs", "-a", "ghost")):
        out = berth(*args, check=False)
        assert out.returncode == 4, (args, out.stderr)
        assert "Error: app 'ghost' not found" in out.stderr
        assert "Hint: run `berth apps list`" in out.stderr


def test_invalid_app_name(berth):
    out = berth("apps", "create", "Not_Valid", check=False)
    assert out.returncode != 0 and "invalid app name 'Not_Valid'" in out.stderr
    assert "lowercase" in out.stderr
    assert "Not_Valid" not in berth("apps", "list").stdout


def test_wrong_and_missing_token(berth):
    out = berth("apps", "list", check=False, env={"BERTH_CLI_TOKEN": "wrong"})
    assert out.returncode == 3 and "the token is not recognized" in out.stderr
    status, body = api(berth, "GET", "/v1/apps", token=None)
    assert status == 401 and body["error"]["message"] == "missing bearer token"
    assert "berth login" in body["error"]["hint"]
    status, body = api(berth, "POST", "/v1/apps", json.dumps({"name": "sneaky"}).encode(),
                       token="nope")
    assert status == 401
    assert "sneaky" not in berth("apps", "list").stdout


def test_runner_token_cannot_use_the_api_and_users_cannot_fetch_slugs(berth):
    runner_token = (berth.platform.data_dir / "controller" / "runner.token").read_text().strip()
    assert api(berth, "GET", "/v1/apps", token=runner_token)[0] == 401
    assert api(berth, "GET", "/v1/slugs/" + "0" * 64)[0] == 401


def test_not_a_tarball(berth, victim):
    status, body = api(berth, "POST", f"/v1/apps/{victim}/builds", b"garbage" * 100)
    assert status == 400 and "not a readable gzip tarball" in body["error"]["message"]


def test_build_failure_is_reported_and_keeps_the_old_release(berth, tmp_path):
    berth("apps", "create", "broken")
    app = copy_example(tmp_path / "broken")
    old_body = "old release of broken"
    (app / "app.py").write_text(
        "from flask import Flask\napp = Flask(__name__)\n\n\n"
        f"@app.route('/')\ndef index():\n    return {old_body!r}\n")
    out = berth("push", str(app), "-a", "broken")
    assert "-----> Deployed broken v1" in out.stdout
    r = berth.wait_for(lambda: (lambda r: r.status == 200 and r)(berth.get("broken")),
                       what="v1 served through the balancer")
    assert r.text == old_body

    # the next push changes the code and breaks the build
    (app / "app.py").write_text(
        "from flask import Flask\napp = Flask(__name__)\n\n\n"
        "@app.route('/')\ndef index():\n    return 'new release of broken'\n")
    (app / "requirements.txt").write_text(
        "flask\ngunicorn\nthis-package-does-not-exist-berth-test==0.0.1\n")
    out = berth("push", str(app), "-a", "broken", check=False)
    assert out.returncode != 0
    assert "Error: the build failed" in out.stderr
    assert "Deployed" not in out.stdout

    # v1 is still the current (and only) release, and still what the balancer serves
    status, body = api(berth, "GET", "/v1/apps/broken/releases")
    assert status == 200
    assert [r["version"] for r in body["releases"]] == [1] and body["current"] == 1
    assert "v1 (current)" in berth("releases", "-a", "broken").stdout
    for _ in range(5):
        r = berth.get("broken")
        assert (r.status, r.text) == (200, old_body)


def test_huge_push_is_refused_before_it_is_read(berth, victim):
    import http.client
    p = berth.platform
    conn = http.client.HTTPConnection("127.0.0.1", p.ports.api, timeout=10)
    try:
        conn.putrequest("POST", f"/v1/apps/{victim}/builds")
        conn.putheader("Authorization", f"Bearer {p.admin_token}")
        conn.putheader("Content-Length", str(50 << 30))     # claims 50 GB
        conn.endheaders()
        conn.send(b"\x1f\x8b" + b"\0" * 1000)                # and sends almost nothing
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413
    assert "above the limit of" in body["error"]["message"] and body["error"]["hint"]
    assert releases(berth, victim) == []
    uploads = p.data_dir / "controller" / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []
