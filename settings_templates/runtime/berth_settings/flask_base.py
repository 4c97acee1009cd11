"""The platform's base layer for a Flask app, applied to the config of every
`Flask(...)` as it is made (berth_settings.flask_hook): the app's factory runs after
and may change any of it.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from berth_settings import urls


def apply(config: MutableMapping[str, Any], env: Mapping[str, str]) -> None:
    if env.get("SECRET_KEY"):
        config["SECRET_KEY"] = env["SECRET_KEY"]
    hosts = [h.strip() for h in env.get("BERTH_HOSTNAMES", "").split(",") if h.strip()]
    if hosts:
        config["TRUSTED_HOSTS"] = hosts         # Flask >= 3.1 checks Host against it
    if env.get("DATABASE_URL"):
        config["DATABASE_URL"] = env["DATABASE_URL"]
        config["SQLALCHEMY_DATABASE_URI"] = urls.sqlalchemy(env["DATABASE_URL"])
    if env.get("REDIS_URL"):
        config["REDIS_URL"] = env["REDIS_URL"]
        config["CACHE_TYPE"] = "RedisCache"     # Flask-Caching
        config["CACHE_REDIS_URL"] = env["REDIS_URL"]
