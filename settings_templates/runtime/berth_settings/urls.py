"""DATABASE_URL and REDIS_URL as Django and SQLAlchemy want them.

A tiny parser so that no package (dj-database-url) has to be added to the app's
virtualenv. Understood:
    postgres://user:pass@host:5432/name?sslmode=require    (postgresql, pgsql, postgis)
    mysql://user:pass@host/name                            (mysql2, mariadb)
    sqlite:////absolute/path.db   sqlite:///relative.db   sqlite://:memory:
    redis://[:pass@]host:6379/0   rediss://...             (caches)
A `+driver` suffix (postgresql+psycopg) is allowed and dropped for Django. Parts are
percent-decoded (a password with '@' or '/' must be written %40, %2F; a unix socket
directory as the host, %2Fvar%2Frun%2Fpostgresql). Query parameters become OPTIONS,
except conn_max_age (CONN_MAX_AGE) and conn_health_checks (CONN_HEALTH_CHECKS).
Errors never repeat the password.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

DJANGO_ENGINES = {
    "postgres": "django.db.backends.postgresql",
    "postgresql": "django.db.backends.postgresql",
    "pgsql": "django.db.backends.postgresql",
    "postgis": "django.contrib.gis.db.backends.postgis",
    "mysql": "django.db.backends.mysql",
    "mysql2": "django.db.backends.mysql",
    "mariadb": "django.db.backends.mysql",
    "sqlite": "django.db.backends.sqlite3",
    "oracle": "django.db.backends.oracle",
}
# SQLAlchemy 1.4 dropped the `postgres` dialect name that many URLs still carry
SQLALCHEMY_SCHEMES = {"postgres": "postgresql", "pgsql": "postgresql",
                      "mysql2": "mysql", "mariadb": "mysql"}
REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_CACHE = "django.core.cache.backends.redis.RedisCache"


class UrlError(ValueError):
    """A URL that cannot be used; the message names the variable, never the password."""


def masked(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[1]}").geturl()


def _split(url: str, var: str) -> tuple[SplitResult, str]:
    try:
        parts = urlsplit(url.strip())
        if parts.netloc != ":memory:":      # sqlite://:memory: has no port
            parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise UrlError(f"{var} is not a valid URL ({masked(url)}): {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise UrlError(f"{var} has no scheme: {masked(url)}")
    return parts, scheme


def _conn_value(name: str, value: str, var: str) -> Any:
    if name == "conn_max_age":
        if value.lower() in ("none", ""):
            return None
        try:
            return int(value)
        except ValueError:
            raise UrlError(f"{var}: conn_max_age must be a number of seconds or None, "
                           f"got {value!r}") from None
    return value.lower() in ("1", "true", "yes", "on")


def database(url: str, var: str = "DATABASE_URL") -> dict[str, Any]:
    """A Django DATABASES entry."""
    parts, scheme = _split(url, var)
    base = scheme.split("+", 1)[0]
    engine = DJANGO_ENGINES.get(base)
    if engine is None:
        raise UrlError(f"{var} has scheme {scheme!r}, which Django has no backend for "
                       f"here; known: {', '.join(sorted(DJANGO_ENGINES))}")
    entry: dict[str, Any] = {"ENGINE": engine}
    if base == "sqlite":
        # sqlite://:memory:, sqlite:////abs/path, sqlite:///relative/path
        if parts.netloc == ":memory:" or parts.path in ("", "/", "/:memory:"):
            entry["NAME"] = ":memory:"
        else:
            entry["NAME"] = unquote(parts.path[1:])
        return entry
    entry.update({
        "NAME": unquote(parts.path[1:]) if parts.path.startswith("/") else "",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": _host(parts),
        "PORT": str(parts.port) if parts.port else "",
    })
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ("conn_max_age", "conn_health_checks"):
            entry[name.upper()] = _conn_value(name, value, var)
        else:
            options[name] = value
    if options:
        entry["OPTIONS"] = options
    return entry


def _host(parts: SplitResult) -> str:
    """The host as written (case kept: a socket path may need it), percent-decoded."""
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")]
    return unquote(netloc.rsplit(":", 1)[0] if ":" in netloc else netloc)


def sqlalchemy(url: str, var: str = "DATABASE_URL") -> str:
    """The URL as SQLAlchemy (Flask-SQLAlchemy's SQLALCHEMY_DATABASE_URI) wants it."""
    _, scheme = _split(url, var)
    base, plus, driver = scheme.partition("+")
    fixed = SQLALCHEMY_SCHEMES.get(base)
    if fixed is None:
        return url.strip()
    return fixed + plus + driver + url.strip()[len(scheme):]


def cache(url: str, var: str = "REDIS_URL") -> dict[str, Any]:
    """A Django CACHES entry for a Redis URL (Django's own RedisCache backend)."""
    _, scheme = _split(url, var)
    if scheme not in REDIS_SCHEMES:
        raise UrlError(f"{var} has scheme {scheme!r}; a Redis URL starts with "
                       f"{', '.join(s + '://' for s in REDIS_SCHEMES)}")
    return {"BACKEND": REDIS_CACHE, "LOCATION": url.strip()}
