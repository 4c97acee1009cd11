"""Tenants are walled off, tried by attack: a hostile app (tests/e2e/attacker) pushed
through the real CLI attempts, from inside its own process, everything another tenant
or the platform must refuse, and each attempt must fail with the OS's own refusal.

Runs as root (runner isolation on: an app user per app, bwrap jails, cgroups, the
nftables owner match); the platform has two runners, 127.0.0.2 and 127.0.0.3.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import pwd
import shutil
import subprocess
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from cli.localplatform import LocalPlatform
from runner.isolation import scope_for
from runner.users import AppUsers
from tests.conftest import forget_apps, new_apps_dir
from tests.e2e.conftest import EXAMPLE, Berth, start_platform

ATTACKER = Path(__file__).parent / "attacker"
RUNNERS = [("runner-1", "127.0.0.2"), ("runner-2", "127.0.0.3")]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs root")


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory, venv_cache: Path, berth_root: Path):
    apps = new_apps_dir(berth_root)
    # the platform's own dir where a real host has it: reachable by path (not in a
    # /tmp that the jail replaces), so that a refusal is the permissions' doing
    data = berth_root / f"iso-data-{apps.name}"
    p = start_platform(data, venv_cache, apps, RUNNERS)
    b = Berth(p, tmp_path_factory.mktemp("iso-cli"))
    b("apps", "create", "victim")
    b("config", "set", "VICTIM_SECRET=s3cret-of-victim", "-a", "victim")
    b("push", str(EXAMPLE), "-a", "victim")
    b("apps", "create", "attacker")
    b("limits", "--memory-mb", "160", "--pids-max", "48", "-a", "attacker")
    b("push", str(ATTACKER), "-a", "attacker")
    yield p, b, apps
    p.stop()
    for name, _ in RUNNERS:
        forget_apps(apps / name)
    shutil.rmtree(apps, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)


def attempt(b: Berth, endpoint: str, **query: Any) -> dict[str, Any]:
    r = b.get("attacker", f"{endpoint}?{urllib.parse.urlencode(query)}", timeout=30)
    assert r.status == 200, (r.status, r.text)
    return json.loads(r.body)


def instances(b: Berth, app: str) -> list[dict[str, Any]]:
    return [i for i in b.json("ps", "-a", app)["instances"] if i["state"] == "RUNNING"]


def app_root(apps: Path, app: str) -> Path:
    """Where the app's files are on the runner that runs its web instance."""
    for name, _ in RUNNERS:
        if (apps / name / app / "releases").is_dir():
            return apps / name / app
    raise AssertionError(f"no runner has files of {app}")


def test_each_app_runs_as_its_own_user(iso: Any) -> None:
    p, b, apps = iso
    me = attempt(b, "/whoami")
    assert me["uid"] >= 200000 and me["uid"] != 0 and me["groups"] in ([], [me["gid"]])
    # ps on the host: every process running from an app's venv belongs to its user
    owners: dict[str, set[int]] = {}
    out = subprocess.run(["ps", "-eo", "uid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        uid, _, args = line.strip().partition(" ")
        for app in ("victim", "attacker"):
            if f"/{app}/venvs/" in args:
                owners.setdefault(app, set()).add(int(uid))
    assert set(owners) == {"victim", "attacker"}, out
    assert len(owners["victim"]) == 1 and len(owners["attacker"]) == 1
    assert owners["victim"] != owners["attacker"] and 0 not in owners["victim"] | owners["attacker"]
    for app, uids in owners.items():
        assert pwd.getpwuid(next(iter(uids))).pw_gecos.startswith(f"berth app {app} ")
    # the victim's own processes are invisible from inside the attacker (own PID namespace)
    victim_pid = instances(b, "victim")[0]["pid"]
    assert victim_pid not in me["pids"] and len(me["pids"]) < 20


@pytest.mark.parametrize("what", ["source", "venv", "data", "releases-dir"])
def test_reading_another_apps_files_is_refused(iso: Any, what: str) -> None:
    _, b, apps = iso
    victim = app_root(apps, "victim")
    release = next(victim.joinpath("releases").iterdir())
    venv = next(victim.joinpath("venvs").iterdir())
    path = {"source": release / "app.py", "venv": venv / "pyvenv.cfg",
            "data": victim / "data", "releases-dir": victim / "releases"}[what]
    verb = "/list" if path.is_dir() else "/read"
    assert path.exists()                     # it is there: the refusal is not a typo
    result = attempt(b, verb, path=str(path))
    assert result == {"ok": False, "errno": "EACCES", "error": result["error"]}


@pytest.mark.parametrize("what", ["releases", "venv", "data"])
def test_writing_into_another_apps_dirs_is_refused(iso: Any, what: str) -> None:
    _, b, apps = iso
    victim = app_root(apps, "victim")
    target = {"releases": victim / "releases" / "planted.py",
              "venv": next(victim.joinpath("venvs").iterdir()) / "lib" / "evil.pth",
              "data": victim / "data" / "planted"}[what]
    result = attempt(b, "/write", path=str(target))
    assert not result["ok"] and result["errno"] == "EACCES", result
    assert not target.exists()


def test_platform_files_and_logs_are_unreadable(iso: Any) -> None:
    p, b, apps = iso
    data = p.data_dir
    runner_logs = sorted(data.glob("runner-*/logs/victim.log"))
    assert runner_logs, "the victim's runner log is missing: nothing would be tried"
    secrets = [data / "controller" / "state.db", data / "controller" / "admin.token",
               data / "controller" / "runner.token",
               data / "controller" / "logs" / "apps" / "victim.log", *runner_logs,
               data / "berth.yaml", data / "logs" / "controller.log", Path("/etc/shadow")]
    for path in secrets:
        assert path.exists(), path          # there: the refusal below is not a typo
        result = attempt(b, "/read", path=str(path))
        assert not result["ok"] and result["errno"] == "EACCES", (path, result)
    assert (data / "controller" / "state.db").exists()
    assert attempt(b, "/list", path=str(data / "controller"))["errno"] == "EACCES"
    assert attempt(b, "/list", path=str(data / "runner-1"))["errno"] == "EACCES"


def test_another_apps_environment_is_invisible(iso: Any) -> None:
    _, b, _ = iso
    pid = instances(b, "victim")[0]["pid"]
    result = attempt(b, "/read", path=f"/proc/{pid}/environ")
    assert not result["ok"] and result["errno"] in ("ENOENT", "EACCES"), result
    # and its own environment holds only what the platform gave it, no runner secrets
    keys = attempt(b, "/whoami")["env_keys"]
    assert not [k for k in keys if k.startswith("BERTH_RUNNER") or "TOKEN" in k], keys


def test_connecting_to_another_instance_and_to_the_platform_is_refused(iso: Any) -> None:
    p, b, _ = iso
    victim = instances(b, "victim")[0]
    ports = p.ports
    targets = {"victim instance": (victim["address"], victim["port"]),
               "control": ("127.0.0.1", ports.control), "logs": ("127.0.0.1", ports.logs),
               "stats": ("127.0.0.1", ports.stats), "api": ("127.0.0.1", ports.api),
               "routes": ("127.0.0.1", ports.routes)}
    # the static file server trusts the balancer's X-Berth-Static: apps cannot reach it
    static = next(h for h in b.json("hosts")["runners"].values() if h.get("static_port"))
    targets["static files"] = (static["address"], static["static_port"])
    for name, (host, port) in targets.items():
        result = attempt(b, "/connect", host=host, port=port)
        assert not result["ok"] and result["errno"] == "ECONNREFUSED", (name, result)
    # the same ports answer everyone else: the refusal is the firewall, not a dead port
    import socket
    for host, port in ((victim["address"], victim["port"]), targets["static files"]):
        with socket.create_connection((host, port), timeout=3):
            pass
    assert b.get("victim").status == 200


def test_memory_over_the_limit_is_killed_and_reported(iso: Any) -> None:
    _, b, _ = iso
    before = instances(b, "attacker")[0]
    r = b.get("attacker", "/alloc?mb=400", timeout=60)
    assert r.status >= 500            # the worker died mid-request: killed by the kernel

    def reported() -> bool:
        inst = [i for i in b.json("ps", "-a", "attacker")["instances"]
                if i["instance"] == before["instance"]][0]
        return inst.get("oom_kills", 0) >= 1
    b.wait_for(reported, timeout=30, what="oom kill in berth ps")
    assert "out of memory" in b("ps", "-a", "attacker").stdout
    logs = b("logs", "-a", "attacker", "-n", "200").stdout
    assert "out of memory" in logs and "160 MB" in logs, logs
    # gunicorn replaced its worker: the app still answers, with no tight restart loop
    b.wait_for(lambda: b.get("attacker", "/whoami").status == 200, what="app answers again")


def test_fork_bomb_stops_at_the_process_limit(iso: Any) -> None:
    _, b, _ = iso
    body = b.get("attacker", "/forkbomb?tries=300&seconds=10", timeout=60)
    data = json.loads(body.body)
    assert data["refused"] > 0 and data["forked"] < 48, data
    # the host and the other tenant are fine meanwhile and after
    assert b.get("victim").status == 200
    assert b("ps", "-a", "victim").returncode == 0


# ---- hostile slugs pushed straight to the API ------------------------------------
def chain_tarball(depth: int, decoy: str) -> bytes:
    """l1 -> ., l2 -> l1/.., l3 -> l2/..: each link reads as inside the app, but l<n>
    resolves n-1 directories above the release. Then a file written through the chain,
    a hard link through it to the decoy, and a directory entry that would chmod it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, data: bytes = b"", **kw: Any) -> None:
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
        add("requirements.txt", b"flask>=3\ngunicorn>=23\n")
        add("Procfile", b"web: gunicorn app:app\n")
        add("app.py", b"from flask import Flask\napp = Flask(__name__)\n")
        add("l1", type=tarfile.SYMTYPE, linkname=".")
        for n in range(2, depth + 1):
            add(f"l{n}", type=tarfile.SYMTYPE, linkname=f"l{n - 1}/..")
        top = f"l{depth}"
        add(f"{top}/{decoy}", b"pwned\n", mode=0o666)
        add("hard", type=tarfile.LNKTYPE, linkname=f"{top}/{decoy}")
        add(top, type=tarfile.DIRTYPE, mode=0o777)
    return buf.getvalue()


def post_slug(p: LocalPlatform, app: str, body: bytes) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", p.ports.api, timeout=30)
    try:
        conn.request("POST", f"/v1/apps/{app}/builds", body=body,
                     headers={"Authorization": f"Bearer {p.admin_token}",
                              "Content-Type": "application/gzip"})
        resp = conn.getresponse()
        return {"status": resp.status, **json.loads(resp.read())}
    finally:
        conn.close()


@pytest.mark.parametrize("depth", [2, 3, 4, 6])
def test_symlink_chain_slugs_change_nothing_outside(iso: Any, depth: int) -> None:
    p, b, apps = iso
    app = f"chain{depth}"
    b("apps", "create", app)
    decoys = []
    for name, _ in RUNNERS:             # a decoy where each chain depth would land
        for d in (apps / name, apps):
            decoy = d / "decoy.txt"
            if not decoy.exists():
                decoy.write_text("original\n")
                decoy.chmod(0o644)
            decoys.append(decoy)
    before = {d: (d.read_text(), d.stat().st_mode) for d in decoys}
    listing = {name: sorted(os.listdir(apps / name)) for name, _ in RUNNERS}
    posted = post_slug(p, app, chain_tarball(depth, "decoy.txt"))
    # each member reads as inside the app, so the controller's text check lets it
    # through: the runner's unpacking, which resolves against the real filesystem,
    # is what must refuse it
    assert posted["status"] == 201, posted

    def finished() -> dict[str, Any] | None:
        got = json.loads(_api_get(p, f"/v1/builds/{posted['build']}"))
        return got if got["status"] != "pending" else None
    build = b.wait_for(finished, timeout=120, what="the hostile build to end")
    assert build["status"] == "failed", build
    error = build["error"]
    assert error["code"] == "slug_unsafe", error
    assert f"l{depth}" in error["message"] and error["hint"], error
    for decoy, (text, mode) in before.items():
        assert decoy.read_text() == text and decoy.stat().st_mode == mode, decoy
    for name, _ in RUNNERS:
        now = sorted(os.listdir(apps / name))
        assert set(now) - set(listing[name]) <= {app}, now
        leftovers = list((apps / name).glob(f"{app}/releases/*"))
        assert leftovers == [], leftovers         # no partial release, no .unpack-* dir
    b("apps", "destroy", app, "--confirm", app)


def _api_get(p: LocalPlatform, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", p.ports.api, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {p.admin_token}"})
        return conn.getresponse().read()
    finally:
        conn.close()


def test_destroy_leaves_no_files_users_or_cgroups_on_any_host(iso: Any) -> None:
    p, b, apps = iso
    b("apps", "create", "doomed")
    b("push", str(EXAMPLE), "-a", "doomed")
    b("scale", "web=2", "-a", "doomed")
    b.wait_for(lambda: len(instances(b, "doomed")) == 2, what="two instances")
    hosts = {name for name, _ in RUNNERS if (apps / name / "doomed").exists()}
    assert hosts, "no runner has the app's files"
    users = {name: AppUsers(scope_for(apps / name)) for name, _ in RUNNERS}
    assert any(users[h].get("doomed") for h in hosts)
    slugs = set((p.data_dir / "controller" / "slugs").iterdir())
    b("apps", "destroy", "doomed", "--confirm", "doomed")

    def gone() -> bool:
        for name, _ in RUNNERS:
            scope = scope_for(apps / name)
            if (apps / name / "doomed").exists() or users[name].get("doomed") is not None:
                return False
            for ctl in ("memory", "pids"):
                if Path(f"/sys/fs/cgroup/{ctl}/berth/{scope}/doomed").exists():
                    return False
            if (p.data_dir / name / "logs" / "doomed.log").exists():
                return False
        return True
    b.wait_for(gone, timeout=60, what="every file, user and cgroup of the app gone")
    assert not (p.data_dir / "controller" / "logs" / "apps" / "doomed.log").exists()
    # its slug went too, unless another app pushed the very same bytes (victim did)
    left = set((p.data_dir / "controller" / "slugs").iterdir())
    assert left <= slugs
    assert b.get("victim").status == 200


def test_an_app_cannot_reuse_another_apps_venv(iso: Any) -> None:
    """Apps with identical requirements used to share one venv: now each has its own,
    owned by its user, so a .pth planted by one can never run in the other."""
    _, _, apps = iso
    victim = app_root(apps, "victim")
    attacker = app_root(apps, "attacker")
    v = {p.name for p in victim.joinpath("venvs").iterdir()}
    a = {p.name for p in attacker.joinpath("venvs").iterdir()}
    assert v == a                 # same requirements, same key ...
    for root in (victim, attacker):
        venv = next(root.joinpath("venvs").iterdir())
        assert venv.stat().st_uid == root.stat().st_uid != 0   # ... but two venvs
    assert victim.stat().st_mode & 0o777 == 0o700
