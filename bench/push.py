"""How long a push takes, against the peer: plain `python -m venv` + `pip install -r`
of the same requirements. Run by hand (as root, the runner isolates each app):

    .venv/bin/python bench/push.py [--rounds 3]

It starts its own platform (controller, runner on 127.0.0.2, balancer) on free ports
with an empty wheel cache and times `berth push` end to end (pack, upload, unpack as
the app's user, build, start, health check, route) for:
  - the first app, cold: the shared wheel cache is empty (wheels fetched from PyPI);
  - a second app with the same requirements: its own venv, from the warm wheel cache;
  - a redeploy of that app with unchanged requirements (its venv reused);
and for an unedited `django-admin startproject` (plus a Procfile and requirements),
each timed push-to-serving (the command, then until the balancer answers with the
new release's page):
  - its first push (Django's wheels not in the cache yet; collectstatic at build);
  - a warm redeploy (a changed view, venv reused, collectstatic again);
  - a rollback to the previous release (no build; new instances of the old code).
The peer for both is a fresh venv + pip install of the same requirements.
pip's own download cache is warmed first so the peer installs from a local cache too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.localplatform import LocalPlatform, Ports  # noqa: E402

EXAMPLE = ROOT / "examples" / "hello"
DJANGO_REQUIREMENTS = "Django>=4.2,<6\ngunicorn>=23\n"


def timed(args: list[str], **kw: object) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - start


def plain_pip(work: Path, n: int, requirements: Path = EXAMPLE / "requirements.txt") -> float:
    venv = work / f"plain-{requirements.parent.name}-{n}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "-r", str(requirements)],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def django_project(work: Path) -> Path:
    """`django-admin startproject mysite`, untouched, plus a Procfile and requirements."""
    lib = work / "django-lib"
    if not lib.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(lib),
                        "--disable-pip-version-check", "Django>=4.2,<6"], check=True,
                       capture_output=True)
    dest = work / "mysite"
    dest.mkdir()
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite", str(dest)],
                   check=True, env={**os.environ, "PYTHONPATH": str(lib)})
    (dest / "requirements.txt").write_text(DJANGO_REQUIREMENTS)
    (dest / "Procfile").write_text("web: gunicorn mysite.wsgi\n")
    return dest


def served(port: int, host: str, needle: str, timeout: float = 120.0) -> None:
    """Wait until the balancer answers `host` with a page containing `needle`."""
    import http.client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            if needle in resp.read().decode("utf-8", "replace"):
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise TimeoutError(f"{host} never served {needle!r}")


def set_view(project: Path, text: str) -> None:
    """The project's root URL answers `text` (a one-view urls.py)."""
    (project / "mysite" / "urls.py").write_text(
        "from django.contrib import admin\nfrom django.http import HttpResponse\n"
        "from django.urls import path\n\n"
        f"urlpatterns = [path('', lambda r: HttpResponse({text!r})),\n"
        "               path('admin/', admin.site.urls)]\n")


def django_rounds(work: Path, platform: LocalPlatform, berth: list[str],
                  env: dict[str, str], n: int, results: dict[str, list[float]]) -> None:
    name = f"dj{n}"
    host = f"{name}.localhost"
    subprocess.run([*berth, "apps", "create", name], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    project = django_project(work / f"dj-{n}")
    set_view(project, "release one")
    start = time.perf_counter()
    subprocess.run([*berth, "push", str(project), "-a", name], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    served(platform.ports.balancer, host, "release one")
    results["django: first push (cold cache)"].append(time.perf_counter() - start)
    set_view(project, "release two")
    start = time.perf_counter()
    subprocess.run([*berth, "push", str(project), "-a", name], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    served(platform.ports.balancer, host, "release two")
    results["django: warm redeploy"].append(time.perf_counter() - start)
    start = time.perf_counter()
    subprocess.run([*berth, "rollback", "-a", name], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    served(platform.ports.balancer, host, "release one")
    results["django: rollback"].append(time.perf_counter() - start)
    subprocess.run([*berth, "apps", "destroy", name, "--confirm", name],
                   env=env, check=True, capture_output=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    # not under /tmp: every app jail has a private /tmp; parents traversable by app users
    work = Path(tempfile.mkdtemp(prefix="berth-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    plain_pip(work, 0)                                   # warm pip's download cache
    django_reqs = work / "django-reqs" / "requirements.txt"
    django_reqs.parent.mkdir()
    django_reqs.write_text(DJANGO_REQUIREMENTS)
    plain_pip(work, 0, django_reqs)
    results: dict[str, list[float]] = {"plain venv + pip install": [],
                                       "berth push, first app (cold cache)": [],
                                       "berth push, new app (warm cache)": [],
                                       "berth push, unchanged requirements": [],
                                       "plain venv + pip install (Django)": [],
                                       "django: first push (cold cache)": [],
                                       "django: warm redeploy": [],
                                       "django: rollback": []}
    for n in range(rounds):
        results["plain venv + pip install"].append(plain_pip(work, n + 1))
        results["plain venv + pip install (Django)"].append(
            plain_pip(work, n + 1, django_reqs))
        platform = LocalPlatform(work / f"platform-{n}", Ports.free(),
                                 runners=[("runner-1", "127.0.0.2")],
                                 wheel_cache_dir=str(work / f"wheels-{n}"),
                                 apps_dir=str(work / f"apps-{n}"))
        platform.start()
        try:
            env = {**os.environ, "BERTH_CLI_API_URL": platform.api_url,
                   "BERTH_CLI_TOKEN": platform.admin_token,
                   "BERTH_CLI_CONFIG_DIR": str(work / "cli")}
            berth = [sys.executable, "-m", "cli.main"]
            for name in ("first", "second"):
                subprocess.run([*berth, "apps", "create", name], env=env, check=True,
                               capture_output=True, cwd=ROOT)
            app = work / f"app-{n}"
            shutil.copytree(EXAMPLE, app)
            results["berth push, first app (cold cache)"].append(
                timed([*berth, "push", str(app), "-a", "first"], env=env, cwd=ROOT))
            results["berth push, new app (warm cache)"].append(
                timed([*berth, "push", str(app), "-a", "second"], env=env, cwd=ROOT))
            (app / "app.py").write_text((app / "app.py").read_text() + "\n# changed\n")
            results["berth push, unchanged requirements"].append(
                timed([*berth, "push", str(app), "-a", "second"], env=env, cwd=ROOT))
            django_rounds(work, platform, berth, env, n, results)
            for name in ("first", "second"):     # their users and cgroups go too
                subprocess.run([*berth, "apps", "destroy", name, "--confirm", name],
                               env=env, check=True, capture_output=True, cwd=ROOT)
            deadline = time.monotonic() + 60
            while any((work / f"apps-{n}" / "runner-1").glob("*")) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            platform.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'what':40} {'median s':>9} {'min s':>7} {'vs plain pip':>13}")
    for what, times in results.items():
        peer = statistics.median(results["plain venv + pip install (Django)"
                                         if "django" in what.lower()
                                         else "plain venv + pip install"])
        med = statistics.median(times)
        print(f"{what:40} {med:9.2f} {min(times):7.2f} {med / peer:12.2f}x")
    print(f"({rounds} rounds; requirements: "
          f"{' '.join((EXAMPLE / 'requirements.txt').read_text().split())}; "
          f"{os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
