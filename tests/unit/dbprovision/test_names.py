"""Addon ids become safe server-side names: [a-z0-9_], under 63 bytes, distinct."""
from __future__ import annotations

import pytest

from dbprovision.errors import InvalidAddon
from dbprovision.names import addon_name, is_addon_name, parked_role


@pytest.mark.parametrize("addon_id", [
    "postgres-1a2b3c", "My DB", 'x"; DROP DATABASE postgres; --', "é" * 50, "a" * 200,
    "Robert'); DROP TABLE Students;--", "with space", "UPPER", "-", "__",
])
def test_names_are_safe_identifiers(addon_id: str):
    name = addon_name(addon_id)
    assert is_addon_name(name), name
    assert len(name.encode()) <= 63 and len(parked_role(name).encode()) <= 63
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")
    assert name == addon_name(addon_id)


def test_ids_differing_only_in_dropped_characters_get_different_names():
    assert addon_name("my-db") != addon_name("my_db") != addon_name("My-DB")


def test_parked_role_is_never_an_addon_name():
    assert not is_addon_name(parked_role(addon_name("x")))


@pytest.mark.parametrize("bad", ["", "a" * 201, "line\nbreak", "nul\x00"])
def test_unusable_ids_are_refused(bad: str):
    with pytest.raises(InvalidAddon):
        addon_name(bad)
