from __future__ import annotations

import os

import pytest

from backup import manifest
from backup.errors import ManifestMismatch, ManifestMissing


@pytest.fixture
def copy(tmp_path):
    c = tmp_path / "vol@20261130T221500Z"
    (c / "sub").mkdir(parents=True)
    (c / "a.txt").write_text("hello")
    (c / "sub" / "big.bin").write_bytes(os.urandom(3 * manifest.CHUNK + 17))
    (c / "link").symlink_to("a.txt")
    return c


def test_written_last_then_verified_then_complete(copy):
    assert not manifest.is_complete(copy)
    with pytest.raises(ManifestMissing):
        manifest.verify(copy)
    written = manifest.write(copy)
    assert written.files == 2 and written.bytes == 5 + 3 * manifest.CHUNK + 17
    assert not manifest.is_complete(copy)       # written is not verified
    assert manifest.verify(copy) == 2
    assert manifest.is_complete(copy)


@pytest.mark.parametrize("damage", ["content", "missing", "extra", "mode", "link"])
def test_any_difference_is_a_mismatch_and_not_complete(copy, damage):
    manifest.write(copy)
    manifest.verify(copy)
    if damage == "content":
        with open(copy / "sub" / "big.bin", "r+b") as f:
            f.seek(manifest.CHUNK + 5)
            f.write(b"X")
    elif damage == "missing":
        (copy / "a.txt").unlink()
    elif damage == "extra":
        (copy / "new").write_text("x")
    elif damage == "mode":
        (copy / "a.txt").chmod(0o600 if (copy / "a.txt").stat().st_mode & 0o044 else 0o644)
    else:
        (copy / "link").unlink()
        (copy / "link").symlink_to("elsewhere")
    with pytest.raises(ManifestMismatch) as err:
        manifest.verify(copy)
    assert err.value.hint
    assert not manifest.is_complete(copy)


def test_a_rewritten_manifest_needs_a_new_verify(copy):
    manifest.write(copy)
    manifest.verify(copy)
    manifest.write(copy)
    assert not manifest.is_complete(copy)
