"""Framework detection, the settings layers' environment, the Flask hook, Django's
collectstatic at prepare, and the interpreters an app may ask for."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from messaging.manifest import Manifest
from runner.errors import BuildError
from runner.frameworks import STATIC, Detected, Frameworks, app_env, detect, with_found_static
from runner.interpreters import Interpreters, short_version
from runner.venv import Venv, unwrapped
from settings_templates import DJANGO_SETTINGS_MODULE, FLASK_PTH_LINE, RUNTIME_DIR

MANAGE = """import os, sys
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.settings')
if sys.argv[1:] == ['collectstatic', '--noinput']:
    root = os.environ['BERTH_STATIC_ROOT']
    if os.environ.get('BREAK'):
        print('ImproperlyConfigured: broken on purpose'); sys.exit(1)
    open(os.path.join(root, 'base.css'), 'w').write('body {}')
    print('1 static file copied to ' + repr(root) + '.')
"""


def make_venv(path: Path, packages: dict[str, str]) -> Venv:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next(path.glob("lib/python3.*/site-packages"))
    for name, source in packages.items():
        (site / name).mkdir()
        (site / name / "__init__.py").write_text("")
        if source:
            (site / name / "conf.py").write_text(source)
    return Venv("k" * 64, path, False, 0.0)


def django_release(path: Path) -> Path:
    (path / "mysite").mkdir(parents=True)
    (path / "manage.py").write_text(MANAGE)
    (path / "mysite" / "__init__.py").write_text("")
    (path / "mysite" / "settings.py").write_text("DEBUG = True\n")
    (path / "mysite" / "wsgi.py").write_text(
        "os.environ.setdefault(\"DJANGO_SETTINGS_MODULE\", \"mysite.settings\")\n")
    return path


FAKE_DJANGO = "class settings:\n    STATIC_URL = '/static/'\n"


def test_detects_a_django_project_by_manage_py_and_its_settings(tmp_path: Path) -> None:
    release = django_release(tmp_path / "r")
    venv = make_venv(tmp_path / "v", {"django": FAKE_DJANGO})
    assert detect(release, venv.path, {}, Manifest()) == Detected("django", "mysite.settings",
                                                                  True)
    # the app's own DJANGO_SETTINGS_MODULE wins (but never Berth's own)
    (release / "mysite" / "prod.py").write_text("")
    assert detect(release, venv.path, {"DJANGO_SETTINGS_MODULE": "mysite.prod"},
                  Manifest()).settings_module == "mysite.prod"
    assert detect(release, venv.path, {"DJANGO_SETTINGS_MODULE": DJANGO_SETTINGS_MODULE},
                  Manifest()).settings_module == "mysite.settings"
    # a manage.py naming a module that is not there is no Django project to inject into
    (release / "mysite" / "settings.py").unlink()
    (release / "mysite" / "wsgi.py").unlink()
    assert detect(release, venv.path, {}, Manifest()).framework is None


def test_detects_flask_by_what_is_installed_and_honours_the_switches(tmp_path: Path) -> None:
    release = tmp_path / "r"
    release.mkdir()
    venv = make_venv(tmp_path / "v", {"flask": ""})
    assert detect(release, venv.path, {}, Manifest()) == Detected("flask", None, True)
    off = detect(release, venv.path, {"BERTH_SETTINGS_INJECTION": "OFF"}, Manifest())
    assert off == Detected("flask", None, False)
    assert not detect(release, venv.path, {}, Manifest(settings_injection=False)).injected
    assert detect(release, make_venv(tmp_path / "v2", {}).path, {}, Manifest()) == Detected()


def test_app_env_for_django_and_flask() -> None:
    release = Path("/apps/shop/releases/abc")
    m = Manifest(static_url="/assets/", static_dirs=("web/static",))
    env = app_env(Detected("django", "mysite.settings", True), release, m,
                  {"PYTHONPATH": "/app/lib"}, "/etc/berth/settings")
    assert env == {"BERTH_FRAMEWORK": "django",
                   "PYTHONPATH": f"{RUNTIME_DIR}{os.pathsep}/app/lib",
                   "BERTH_SETTINGS_HOST_DIR": "/etc/berth/settings",
                   "DJANGO_SETTINGS_MODULE": DJANGO_SETTINGS_MODULE,
                   "BERTH_DJANGO_SETTINGS": "mysite.settings",
                   "BERTH_STATIC_ROOT": f"{release}/{STATIC}",
                   "BERTH_STATIC_URL": "/assets/",
                   "BERTH_STATIC_DIRS": f"{release}/web/static"}
    # applied again (a re-prepare), PYTHONPATH does not grow
    again = app_env(Detected("django", "mysite.settings", True), release, m, env)
    assert again["PYTHONPATH"] == env["PYTHONPATH"]
    assert app_env(Detected("flask", None, True), release, Manifest(), {}) == {
        "BERTH_FRAMEWORK": "flask", "PYTHONPATH": str(RUNTIME_DIR)}
    assert app_env(Detected("flask", None, False), release, Manifest(), {}) == {}


def test_prepare_hooks_flask_once(tmp_path: Path) -> None:
    release = tmp_path / "r"
    release.mkdir()
    venv = make_venv(tmp_path / "v", {"flask": ""})
    lines: list[str] = []
    fw = Frameworks(tmp_path / "locks")
    detected, env = fw.prepare(release, venv, {}, Manifest(), unwrapped, None, tmp_path,
                               lines.append)
    pth = next(venv.path.glob("lib/python3.*/site-packages/berth_settings.pth"))
    assert pth.read_text() == FLASK_PTH_LINE and env["BERTH_FRAMEWORK"] == "flask"
    assert "Flask app: Berth's settings layers are on" in lines[0]


def test_prepare_collects_django_static_once_per_release(tmp_path: Path) -> None:
    release = django_release(tmp_path / "r")
    venv = make_venv(tmp_path / "v", {"django": FAKE_DJANGO})
    lines: list[str] = []
    fw = Frameworks(tmp_path / "locks")
    detected, env = fw.prepare(release, venv, {"A": "1"}, Manifest(), unwrapped, None,
                               tmp_path, lines.append)
    assert detected.static_dir == release / STATIC and detected.static_url == "/static/"
    assert (release / STATIC / "base.css").read_text() == "body {}"
    assert env["DJANGO_SETTINGS_MODULE"] == DJANGO_SETTINGS_MODULE
    assert any("1 static file copied" in line for line in lines)
    assert detected.to_wire()["static"] == {"dir": str(release / STATIC), "url": "/static/"}
    lines.clear()
    again, _ = fw.prepare(release, venv, {}, Manifest(), unwrapped, None, tmp_path,
                          lines.append)
    assert again == detected and "already collected" in lines[-1]


def test_a_failing_collectstatic_fails_the_build_with_its_output(tmp_path: Path) -> None:
    release = django_release(tmp_path / "r")
    venv = make_venv(tmp_path / "v", {"django": FAKE_DJANGO})
    with pytest.raises(BuildError) as err:
        Frameworks(tmp_path / "locks").prepare(release, venv, {"BREAK": "1"}, Manifest(),
                                               unwrapped, None, tmp_path, lambda _l: None)
    assert "collectstatic failed (exit 1)" in err.value.message
    assert "broken on purpose" in err.value.message
    assert "collectstatic --noinput" in err.value.hint and "=off" in err.value.hint
    assert not (release / ".berth" / "static.json").exists()


def test_interpreters_pick_by_version_and_list_what_exists(tmp_path: Path) -> None:
    mine = short_version(f"cpython-{sys.version_info[0]}.{sys.version_info[1]}.0")
    found = Interpreters(sys.executable, [str(tmp_path / "missing")], search=())
    assert found.pick(None) == sys.executable
    assert found.pick(mine) == sys.executable
    with pytest.raises(BuildError) as err:
        found.pick("3.99")
    assert "asks for python 3.99" in err.value.message
    assert f"it has: python{mine}" in err.value.message
    assert "berth.yaml" in err.value.hint


def test_static_dir_of_an_app_without_collectstatic_is_declared_or_found(tmp_path: Path):
    rel = tmp_path / "release"
    rel.mkdir()
    flask = Detected("flask", None, True)
    assert with_found_static(flask, rel, Manifest()).static_dir is None   # nothing there
    (rel / "static").mkdir()
    found = with_found_static(flask, rel, Manifest())
    assert (found.static_dir, found.static_url) == (rel / "static", "/static/")
    (rel / "assets").mkdir()
    declared = with_found_static(flask, rel, Manifest(static_url="/a/", static_dirs=("assets",)))
    assert (declared.static_dir, declared.static_url) == (rel / "assets", "/a/")
    # a link, or a path out of the release, is never a static root
    (rel / "out").symlink_to("/etc")
    for bad in ("out", "../", "/etc"):
        got = with_found_static(flask, rel, Manifest(static_dirs=(bad,)))
        assert got.static_dir is None, bad


def test_a_django_project_without_staticfiles_builds_with_nothing_to_collect(tmp_path: Path):
    release = django_release(tmp_path / "r")
    no_static = FAKE_DJANGO + "    INSTALLED_APPS = ['django.contrib.admin']\n"
    venv = make_venv(tmp_path / "v", {"django": no_static})
    lines: list[str] = []
    fw = Frameworks(tmp_path / "locks")
    detected, _ = fw.prepare(release, venv, {"BREAK": "1"}, Manifest(), unwrapped, None,
                             tmp_path, lines.append)      # collectstatic would fail: not run
    assert detected.static_dir is None and detected.framework == "django"
    assert any("staticfiles is not installed" in line for line in lines)
    again, _ = fw.prepare(release, venv, {"BREAK": "1"}, Manifest(), unwrapped, None,
                          tmp_path, lines.append)
    assert again.static_dir is None
