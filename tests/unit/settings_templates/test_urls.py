"""DATABASE_URL / REDIS_URL parsing without dj-database-url."""
from __future__ import annotations

import pytest
from berth_settings import urls


def test_postgres_url_becomes_a_django_entry() -> None:
    entry = urls.database("postgres://alice:s%40cret%2F1@db.internal:6543/shop"
                          "?sslmode=require&conn_max_age=60&conn_health_checks=true")
    assert entry == {"ENGINE": "django.db.backends.postgresql", "NAME": "shop",
                     "USER": "alice", "PASSWORD": "s@cret/1", "HOST": "db.internal",
                     "PORT": "6543", "CONN_MAX_AGE": 60, "CONN_HEALTH_CHECKS": True,
                     "OPTIONS": {"sslmode": "require"}}


@pytest.mark.parametrize("url, engine", [
    ("postgresql://u@h/d", "django.db.backends.postgresql"),
    ("postgresql+psycopg://u@h/d", "django.db.backends.postgresql"),
    ("pgsql://u@h/d", "django.db.backends.postgresql"),
    ("postgis://u@h/d", "django.contrib.gis.db.backends.postgis"),
    ("mysql://u@h/d", "django.db.backends.mysql"),
    ("mariadb://u@h/d", "django.db.backends.mysql"),
])
def test_schemes_map_to_engines(url: str, engine: str) -> None:
    assert urls.database(url)["ENGINE"] == engine


def test_defaults_are_empty_strings_and_sockets_and_ipv6_hosts_work() -> None:
    entry = urls.database("postgres://%2Fvar%2Frun%2Fpostgresql/app")
    assert entry["HOST"] == "/var/run/postgresql" and entry["PORT"] == ""
    assert entry["USER"] == "" and entry["PASSWORD"] == "" and entry["NAME"] == "app"
    assert "OPTIONS" not in entry
    assert urls.database("postgres://u:p@[::1]:5432/app")["HOST"] == "::1"


@pytest.mark.parametrize("url, name", [
    ("sqlite:////var/lib/app/db.sqlite3", "/var/lib/app/db.sqlite3"),
    ("sqlite:///db.sqlite3", "db.sqlite3"),
    ("sqlite://:memory:", ":memory:"),
    ("sqlite://", ":memory:"),
])
def test_sqlite_paths(url: str, name: str) -> None:
    assert urls.database(url) == {"ENGINE": "django.db.backends.sqlite3", "NAME": name}


@pytest.mark.parametrize("url, problem", [
    ("db.internal/shop", "has no scheme"),
    ("mongodb://u@h/d", "no backend"),
    ("postgres://u@h:port/d", "not a valid URL"),
    ("postgres://u@h/d?conn_max_age=soon", "conn_max_age"),
])
def test_bad_urls_say_why_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(urls.UrlError) as err:
        urls.database(url.replace("u@", "u:hunter2@"))
    assert problem in str(err.value) and "hunter2" not in str(err.value)
    assert "DATABASE_URL" in str(err.value)


def test_sqlalchemy_url_fixes_the_old_postgres_name_only() -> None:
    assert urls.sqlalchemy("postgres://u:p@h/d") == "postgresql://u:p@h/d"
    assert urls.sqlalchemy("postgres+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert urls.sqlalchemy("postgresql://u@h/d") == "postgresql://u@h/d"
    assert urls.sqlalchemy("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_redis_cache() -> None:
    assert urls.cache("redis://:pw@127.0.0.1:6379/2") == {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://:pw@127.0.0.1:6379/2"}
    assert urls.cache("rediss://h:6380/0")["LOCATION"] == "rediss://h:6380/0"
    with pytest.raises(urls.UrlError, match="REDIS_URL has scheme 'http'"):
        urls.cache("http://h/")


def test_masked_hides_only_the_password() -> None:
    assert urls.masked("postgres://u:secret@h:5/d") == "postgres://u:***@h:5/d"
    assert urls.masked("postgres://u@h/d") == "postgres://u@h/d"
