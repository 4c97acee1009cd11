"""The platform's base layer for a Django project.

What the platform must own to run the project behind its balancer: the host names
it answers to, a secret key of its own, DEBUG off, the database and cache the
platform attached, where static files are collected and served from, and logs on
stdout (which the runner sends to `berth logs`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from berth_settings import urls

STATIC_MIDDLEWARE = "berth_settings.static.StaticFilesMiddleware"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"berth": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                            "formatter": "berth"}},
    "root": {"handlers": ["stdout"], "level": "INFO"},
    # django.request logs every 5xx with its traceback: with DEBUG off Django's own
    # default would only mail it to ADMINS
    "loggers": {"django": {"handlers": ["stdout"], "level": "INFO", "propagate": False}},
}


def apply(settings: MutableMapping[str, Any], env: Mapping[str, str]) -> None:
    hosts = [h.strip() for h in env.get("BERTH_HOSTNAMES", "").split(",") if h.strip()]
    if hosts:
        own = [h for h in settings.get("ALLOWED_HOSTS") or [] if h not in hosts]
        settings["ALLOWED_HOSTS"] = [*hosts, *own]
    if env.get("SECRET_KEY"):
        settings["SECRET_KEY"] = env["SECRET_KEY"]
    settings["DEBUG"] = False
    # the balancer replaces any X-Forwarded-Proto a client sends
    settings.setdefault("SECURE_PROXY_SSL_HEADER", ("HTTP_X_FORWARDED_PROTO", "https"))
    _databases(settings, env)
    if env.get("REDIS_URL"):
        caches = dict(settings.get("CACHES") or {})
        caches["default"] = urls.cache(env["REDIS_URL"])
        settings["CACHES"] = caches
    _static(settings, env)
    if not settings.get("LOGGING"):
        settings["LOGGING"] = LOGGING


def _databases(settings: MutableMapping[str, Any], env: Mapping[str, str]) -> None:
    databases = dict(settings.get("DATABASES") or {})
    if env.get("DATABASE_URL"):
        databases["default"] = {**databases.get("default", {}),
                                **urls.database(env["DATABASE_URL"])}
    else:
        # the release is read-only: a SQLite file inside it moves to the app's data dir
        default = databases.get("default") or {}
        name, data = str(default.get("NAME") or ""), env.get("BERTH_DATA_DIR")
        if data and str(default.get("ENGINE", "")).endswith("sqlite3") and name \
                and name != ":memory:" and _inside(name, os.getcwd()):
            databases["default"] = {**default, "NAME": os.path.join(data, os.path.basename(name))}
    if databases:
        settings["DATABASES"] = databases


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _static(settings: MutableMapping[str, Any], env: Mapping[str, str]) -> None:
    if env.get("BERTH_STATIC_URL"):
        settings["STATIC_URL"] = env["BERTH_STATIC_URL"]
    elif not settings.get("STATIC_URL"):
        settings["STATIC_URL"] = "/static/"
    extra = [d for d in env.get("BERTH_STATIC_DIRS", "").split(os.pathsep) if d]
    if extra:
        settings["STATICFILES_DIRS"] = [*(settings.get("STATICFILES_DIRS") or []), *extra]
    root = env.get("BERTH_STATIC_ROOT")
    if not root:
        return
    settings["STATIC_ROOT"] = root
    # the platform's static file server answers these; the app does when it cannot
    # (berth_settings.static)
    middleware = [m for m in settings.get("MIDDLEWARE") or [] if m != STATIC_MIDDLEWARE]
    settings["MIDDLEWARE"] = [STATIC_MIDDLEWARE, *middleware]
