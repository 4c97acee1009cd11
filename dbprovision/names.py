"""Server-side names for an addon, derived from its id.

An addon id comes from the controller and may hold any printable characters; the
database, role and Redis user names made from it hold only [a-z0-9_], start with a
letter, stay under PostgreSQL's 63-byte limit, and carry 8 hex digits of the id's
hash, so that ids differing only in characters the slug drops ("my-db", "my_db")
never share a database. The names are still composed through psycopg2.sql wherever
they reach SQL: being safe by construction is the second wall, not the first.
"""
from __future__ import annotations

import hashlib
import re

from .errors import InvalidAddon

PREFIX = "addon_"
SLUG_MAX = 32
ID_MAX = 200
NAME_RE = re.compile(rf"^addon_[a-z0-9_]{{1,{SLUG_MAX}}}_[0-9a-f]{{8}}$")


def check_addon_id(addon_id: str) -> str:
    if not isinstance(addon_id, str) or not addon_id or len(addon_id) > ID_MAX \
            or not addon_id.isprintable():
        raise InvalidAddon(f"addon id {addon_id!r} is not usable",
                           f"an addon id is 1-{ID_MAX} printable characters")
    return addon_id


def addon_name(addon_id: str) -> str:
    """The database, role and Redis user name (and Redis key prefix) of an addon."""
    check_addon_id(addon_id)
    slug = re.sub(r"[^a-z0-9]+", "_", addon_id.lower()).strip("_")[:SLUG_MAX].strip("_")
    digest = hashlib.sha256(addon_id.encode()).hexdigest()[:8]
    return f"{PREFIX}{slug or 'x'}_{digest}"


def parked_role(name: str) -> str:
    """The NOLOGIN role that owns a tenant's tables while its writes are revoked."""
    return f"{name}_parked"


def is_addon_name(name: str) -> bool:
    return bool(NAME_RE.match(name))
