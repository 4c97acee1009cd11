"""The backup endpoints and `berth backup`: only the backup-admin role gets in (an
app team's token and the platform's admin token are refused with 403, none with
401), and through the real CLI a volume is listed with its snapshotter and what it
cannot guarantee, snapshotted, restored in place by time (and from a verified offsite
copy), verified and pruned (dry run). The API runs on a real store and a loopback
port; the volume is an app data dir on this (non-btrfs) disk, so the rsync
--link-dest fallback is the one in use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from controller.api import ApiServer
from controller.backups import BACKUP_ADMIN
from controller.settings import SPEC
from controller.store import Store
from dbprovision.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def api(tmp_path) -> Iterator[SimpleNamespace]:
    apps = tmp_path / "runner" / "apps"
    (apps / "blog" / "data").mkdir(parents=True)
    s = SPEC.load(None)
    s.addons_dir, s.backup_apps_dirs = str(tmp_path / "addons"), [str(apps)]
    store = Store(tmp_path / "state.db")
    controller = SimpleNamespace(store=store, settings=s, platform_token="p" * 48,
                                 runner_token="r" * 48, data_dir=tmp_path,
                                 instances=lambda app: [], wake=lambda: None)
    port = free_port("127.0.0.1")
    server = ApiServer(controller, "127.0.0.1", port)  # type: ignore[arg-type]
    server.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", admin=store.add_token("admin"),
                              backup=store.add_token(BACKUP_ADMIN),
                              team=store.create_token("blog-deploy", "blog"),
                              data=apps / "blog" / "data", tmp=tmp_path)
    finally:
        server.stop()


def call(api, path: str, token: str | None, method: str = "GET", body=None):
    req = urllib.request.Request(api.url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def berth(api, token: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BERTH_CLI_API_URL": api.url, "BERTH_CLI_TOKEN": token,
           "BERTH_CLI_CONFIG_DIR": str(api.tmp / "cli"), "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "backup", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_only_backup_admins_reach_the_backup_endpoints(api):
    for method, path, body in (("GET", "/v1/backups", None),
                               ("GET", "/v1/backups/app-blog", None),
                               ("POST", "/v1/backups/app-blog/snapshots", {}),
                               ("POST", "/v1/backups/app-blog/restore", {}),
                               ("POST", "/v1/backups/app-blog/verify", {}),
                               ("POST", "/v1/backups/prune", {"dry_run": True})):
        for token in (api.admin, api.team):      # the platform's admin, an app's team
            status, raw = call(api, path, token, method, body)
            assert status == 403, (path, raw)
            err = json.loads(raw)["error"]
            assert err["code"] == "forbidden" and "backup-admin.token" in err["hint"]
        assert call(api, path, None, method, body)[0] == 401
        assert call(api, path, "not-a-token", method, body)[0] == 401
    assert not (api.tmp / "runner" / "backups" / "snapshots").exists() or \
        not any((api.tmp / "runner" / "backups" / "snapshots").iterdir())
    status, raw = call(api, "/v1/backups", api.backup)
    assert status == 200 and json.loads(raw)["volumes"][0]["name"] == "app-blog"
    assert call(api, "/v1/apps", api.admin)[0] == 200       # the admin token still works

    refused = berth(api, api.admin, "list", check=False)
    assert refused.returncode != 0 and "backup admins" in refused.stderr


def test_backup_cli_lists_snapshots_restores_by_time_verifies_prunes(api):
    (api.data / "notes.txt").write_text("v1")
    listed = berth(api, api.backup, "list").stdout
    assert "Snapshotter rsync-link-dest" in listed and "cannot guarantee" in listed
    assert "app-blog" in listed and "the volume root is not on btrfs" in listed

    made = berth(api, api.backup, "snapshot", "app-blog").stdout
    assert "app-blog@" in made
    (api.data / "notes.txt").write_text("v2")
    (api.data / "later.txt").write_text("x")

    shown = json.loads(berth(api, api.backup, "show", "app-blog", "--json").stdout)
    assert len(shown["snapshots"]) == 1 and shown["snapshots"][0]["manifest"]

    none_yet = berth(api, api.backup, "restore", "app-blog", "--at", "2 days ago", "--yes",
                     check=False)
    assert none_yet.returncode != 0 and "no snapshot at or before" in none_yet.stderr
    assert (api.data / "notes.txt").read_text() == "v2", "nothing changed"

    out = berth(api, api.backup, "restore", "app-blog", "--at", "now", "--yes").stdout
    assert "As of " in out and "UTC" in out and "kept as app-blog@" in out
    assert "stopping the consumers" in out
    assert (api.data / "notes.txt").read_text() == "v1"
    assert not (api.data / "later.txt").exists()

    verified = berth(api, api.backup, "verify", "app-blog").stdout
    assert "files match the manifest" in verified

    dry = berth(api, api.backup, "prune", "--dry-run").stdout
    assert "dry run: nothing deleted" in dry and "keep app-blog@" in dry and "newest" in dry
    assert len(json.loads(berth(api, api.backup, "show", "app-blog", "--json").stdout)
               ["snapshots"]) == 2, "the replaced data was kept as a snapshot"


def test_restore_from_a_verified_offsite_copy_gives_the_files_back_to_their_owner(api):
    """A copy brought back from the offsite host (pulled as its own user, so owned by
    it): restored in place only once verified, its files given back to the volume's
    owner; a copy that no longer matches its manifest is not offered."""
    from backup import manifest
    (api.data / "notes.txt").write_text("copied")
    name = berth(api, api.backup, "snapshot", "app-blog").stdout.split("Snapshot ")[1].split()[0]
    snapshot = api.tmp / "runner" / "backups" / "snapshots" / name
    copies = api.tmp / "brought-back"
    copies.mkdir()
    subprocess.run(["cp", "-a", str(snapshot), str(copies / name)], check=True)
    subprocess.run(["cp", "-a", str(manifest.manifest_path(snapshot)), str(copies)], check=True)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(copies / name)], check=True)
    (api.data / "notes.txt").write_text("live")

    unverified = berth(api, api.backup, "restore", "app-blog", "--from-copies", str(copies),
                       "--yes", check=False)
    assert unverified.returncode != 0 and "no snapshot at or before" in unverified.stderr
    manifest.verify(copies / name)
    out = berth(api, api.backup, "restore", "app-blog", "--from-copies", str(copies),
                "--yes").stdout
    assert f"chosen {name}" in out
    assert (api.data / "notes.txt").read_text() == "copied"
    owner = api.data.stat().st_uid
    assert all(p.stat().st_uid == owner for p in api.data.rglob("*"))
