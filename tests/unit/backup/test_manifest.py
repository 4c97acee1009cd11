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


def test_a_trusted_copy_spares_rereading_only_what_is_the_same_inode(tmp_path, caplog):
    """verify(copy, trusted=previous): a hard link to the verified previous copy's file
    (listed alike in both manifests) is not read again; a file that is not shared is,
    and a mismatch there is caught; an untrusted (unverified) previous spares nothing."""
    import logging
    one, two = tmp_path / "v@20261130T200000Z", tmp_path / "v@20261130T210000Z"
    one.mkdir()
    (one / "same.bin").write_bytes(os.urandom(1000))
    (one / "changed.txt").write_text("old")
    manifest.write(one)
    manifest.verify(one)
    two.mkdir()
    os.link(one / "same.bin", two / "same.bin")
    (two / "changed.txt").write_text("new")
    manifest.write(two)
    with caplog.at_level(logging.INFO, logger="backup.manifest"):
        assert manifest.verify(two, trusted=one) == 2
    assert [r.shared_with_trusted for r in caplog.records    # type: ignore[attr-defined]
            if r.getMessage() == "copy verified"][-1] == 1
    (two / "changed.txt").write_text("rot")                  # not shared: it is read
    with pytest.raises(ManifestMismatch):
        manifest.verify(two, trusted=one)
    (two / "changed.txt").write_text("new")
    (one / "changed.txt").write_text("x")     # the previous copy no longer verified...
    manifest.stamp_path(one).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="backup.manifest"):
        manifest.verify(two, trusted=one)     # ... so nothing is taken from it
    assert [r.shared_with_trusted for r in caplog.records    # type: ignore[attr-defined]
            if r.getMessage() == "copy verified"][-1] == 0
