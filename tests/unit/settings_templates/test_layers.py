"""The settings layers: platform base -> per-host file -> the app's own config vars,
on a Django project's settings and on a Flask app's config."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from berth_settings import django_base, layers

from settings_templates import DJANGO_SETTINGS_MODULE, FLASK_PTH_LINE, RUNTIME_DIR


def startproject() -> dict[str, Any]:
    """What `django-admin startproject` writes, as far as the layers care."""
    return {"SECRET_KEY": "django-insecure-x", "DEBUG": True, "ALLOWED_HOSTS": [],
            "MIDDLEWARE": ["django.middleware.security.SecurityMiddleware",
                           "django.middleware.common.CommonMiddleware"],
            "DATABASES": {"default": {"ENGINE": "django.db.backends.sqlite3",
                                      "NAME": "/srv/release/db.sqlite3"}},
            "STATIC_URL": "static/", "TIME_ZONE": "UTC"}


ENV = {"BERTH_HOSTNAMES": "shop.localhost,www.shop.example", "SECRET_KEY": "k" * 50,
       "BERTH_STATIC_ROOT": "/srv/release/.berth/static"}


def test_django_base_owns_hosts_secret_debug_static_and_logs() -> None:
    s = startproject()
    layers.apply(s, "django", ENV)
    assert s["ALLOWED_HOSTS"] == ["shop.localhost", "www.shop.example"]
    assert s["SECRET_KEY"] == "k" * 50 and s["DEBUG"] is False
    assert s["STATIC_ROOT"] == "/srv/release/.berth/static"
    assert s["STATIC_URL"] == "static/"            # the project's own prefix is kept
    assert s["MIDDLEWARE"][0] == django_base.STATIC_MIDDLEWARE
    assert s["MIDDLEWARE"][1:] == startproject()["MIDDLEWARE"]
    assert s["LOGGING"]["handlers"]["stdout"]["stream"] == "ext://sys.stdout"
    assert s["SECURE_PROXY_SSL_HEADER"] == ("HTTP_X_FORWARDED_PROTO", "https")
    # no DATABASE_URL and no data dir: the project's database is left alone
    assert s["DATABASES"] == startproject()["DATABASES"]


def test_django_base_takes_database_and_cache_urls() -> None:
    s = startproject()
    s["DATABASES"]["default"]["ATOMIC_REQUESTS"] = True
    layers.apply(s, "django", {**ENV, "DATABASE_URL": "postgres://u:p@db:5432/shop",
                               "REDIS_URL": "redis://cache:6379/1"})
    db = s["DATABASES"]["default"]
    assert db["ENGINE"] == "django.db.backends.postgresql" and db["NAME"] == "shop"
    assert db["ATOMIC_REQUESTS"] is True          # the project's other keys stay
    assert s["CACHES"]["default"]["LOCATION"] == "redis://cache:6379/1"


def test_a_sqlite_file_in_the_read_only_release_moves_to_the_data_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = tmp_path / "release"
    release.mkdir()
    monkeypatch.chdir(release)
    s = startproject()
    s["DATABASES"]["default"]["NAME"] = str(release / "db.sqlite3")
    layers.apply(s, "django", {**ENV, "BERTH_DATA_DIR": "/data"})
    assert s["DATABASES"]["default"]["NAME"] == "/data/db.sqlite3"


def test_project_logging_and_hosts_are_kept_beside_the_platform_ones() -> None:
    s = {**startproject(), "LOGGING": {"version": 1}, "ALLOWED_HOSTS": [".internal"]}
    layers.apply(s, "django", ENV)
    assert s["LOGGING"] == {"version": 1}
    assert s["ALLOWED_HOSTS"] == ["shop.localhost", "www.shop.example", ".internal"]


def test_manifest_static_url_and_dirs() -> None:
    s = startproject()
    layers.apply(s, "django", {**ENV, "BERTH_STATIC_URL": "/assets/",
                               "BERTH_STATIC_DIRS": os.pathsep.join(["/r/a", "/r/b"])})
    assert s["STATIC_URL"] == "/assets/" and s["STATICFILES_DIRS"] == ["/r/a", "/r/b"]


def test_per_host_file_then_the_apps_own_config_vars(tmp_path: Path) -> None:
    (tmp_path / "django.py").write_text(
        "TIME_ZONE = 'Europe/Paris'\n"
        "EMAIL_HOST = 'smtp.' + env['BERTH_HOSTNAMES'].split(',')[0]\n"
        "ALLOWED_HOSTS = ALLOWED_HOSTS + ['health.internal']\n"
        "helper = 1\n")
    s = startproject()
    layers.apply(s, "django", {**ENV, "BERTH_SETTINGS_HOST_DIR": str(tmp_path),
                               "DJANGO_TIME_ZONE": "Asia/Tokyo", "DJANGO_DEBUG": "on",
                               "DJANGO_CONN_MAX_AGE": "60",
                               "DJANGO_ADMINS": '[["Ops", "ops@example.com"]]',
                               "DJANGO_SETTINGS_MODULE": DJANGO_SETTINGS_MODULE})
    assert s["EMAIL_HOST"] == "smtp.shop.localhost" and "helper" not in s
    assert s["ALLOWED_HOSTS"][-1] == "health.internal"
    # the app's own layer comes last: its config vars win, typed
    assert s["TIME_ZONE"] == "Asia/Tokyo" and s["DEBUG"] is True
    assert s["CONN_MAX_AGE"] == 60 and s["ADMINS"] == [["Ops", "ops@example.com"]]
    assert "SETTINGS_MODULE" not in s


@pytest.mark.parametrize("word, debug", [("true", True), ("1", True), ("False", False),
                                         ("off", False), ("0", False)])
def test_debug_is_off_unless_the_app_says_so(word: str, debug: bool) -> None:
    s = startproject()
    layers.apply(s, "django", {**ENV, "DJANGO_DEBUG": word})
    assert s["DEBUG"] is debug


def test_a_failing_per_host_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "django.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(layers.SettingsLayerError, match="django.py failed"):
        layers.apply(startproject(), "django", {"BERTH_SETTINGS_HOST_DIR": str(tmp_path)})


def test_flask_base_then_host_then_prefixed_env(tmp_path: Path) -> None:
    (tmp_path / "flask.py").write_text("SESSION_COOKIE_SECURE = True\nMAX_CONTENT_LENGTH = 1\n")
    config: dict[str, Any] = {"SECRET_KEY": None, "DEBUG": False}
    layers.apply(config, "flask", {"SECRET_KEY": "s3", "DATABASE_URL": "postgres://u@h/d",
                                   "REDIS_URL": "redis://r:6379/0",
                                   "BERTH_HOSTNAMES": "f.localhost,f.example",
                                   "BERTH_SETTINGS_HOST_DIR": str(tmp_path),
                                   "FLASK_MAX_CONTENT_LENGTH": "1024"})
    assert config["SECRET_KEY"] == "s3"
    assert config["SQLALCHEMY_DATABASE_URI"] == "postgresql://u@h/d"
    assert config["DATABASE_URL"] == "postgres://u@h/d"
    assert config["CACHE_REDIS_URL"] == "redis://r:6379/0"
    assert config["TRUSTED_HOSTS"] == ["f.localhost", "f.example"]
    assert config["SESSION_COOKIE_SECURE"] is True and config["MAX_CONTENT_LENGTH"] == 1024


def test_django_settings_module_loads_the_projects_own_then_the_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "proj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "settings.py").write_text(
        "SECRET_KEY = 'insecure'\nDEBUG = True\nALLOWED_HOSTS = []\n_private = 1\n"
        "INSTALLED_APPS = ['django.contrib.admin']\nMIDDLEWARE = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for key, value in {**ENV, "BERTH_DJANGO_SETTINGS": "proj.settings"}.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop(DJANGO_SETTINGS_MODULE, None)
    module = importlib.import_module(DJANGO_SETTINGS_MODULE)
    try:
        assert module.INSTALLED_APPS == ["django.contrib.admin"]
        assert module.DEBUG is False and module.SECRET_KEY == "k" * 50
        assert module.ALLOWED_HOSTS == ["shop.localhost", "www.shop.example"]
        assert not hasattr(module, "_private")
    finally:
        sys.modules.pop(DJANGO_SETTINGS_MODULE, None)
        sys.modules.pop("proj.settings", None)
        sys.modules.pop("proj", None)


def test_flask_hook_from_the_pth_line_only_when_the_runner_says_flask(tmp_path: Path) -> None:
    """A real Flask (the test venv has it): the .pth line, processed as site does,
    wraps make_config; the app's factory still has the last word."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "berth_settings.pth").write_text(FLASK_PTH_LINE)
    code = ("import site, sys; site.addsitedir(sys.argv[1]); import flask\n"
            "app = flask.Flask('demo'); print(app.config['SECRET_KEY'])\n"
            "app.config.from_mapping(SECRET_KEY='mine'); print(app.config['SECRET_KEY'])\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(RUNTIME_DIR), "SECRET_KEY": "s3"}
    on = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True,
                        text=True, env={**env, "BERTH_FRAMEWORK": "flask"}, check=True)
    assert on.stdout.split() == ["s3", "mine"], on.stderr
    off = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True,
                         text=True, env=env, check=True)
    assert off.stdout.split() == ["None", "mine"], off.stderr
