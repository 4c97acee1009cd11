import os
import tarfile

import pytest

from cli import pack
from messaging.errors import BerthError


def app_dir(tmp_path):
    d = tmp_path / "app"
    (d / "static").mkdir(parents=True)
    (d / "requirements.txt").write_text("flask\n")
    (d / "Procfile").write_text("web: gunicorn app:app\n")
    (d / "app.py").write_text("x = 1\n")
    (d / "static" / "site.css").write_text("body{}\n")
    return d


def test_gitignore_is_honoured(tmp_path):
    d = app_dir(tmp_path)
    (d / ".gitignore").write_text("*.log\nmedia/\n!keep.log\n")
    (d / "debug.log").write_text("x")
    (d / "keep.log").write_text("x")
    (d / "media").mkdir()
    (d / "media" / "big.bin").write_text("x")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")
    names = {p.as_posix() for p in pack.files_to_pack(d)}
    assert names == {".gitignore", "Procfile", "requirements.txt", "app.py", "static/site.css",
                     "keep.log"}


def test_pack_makes_a_tarball_that_lists_the_files(tmp_path):
    path, count = pack.pack(app_dir(tmp_path))
    try:
        with tarfile.open(path) as tar:
            assert sorted(tar.getnames()) == sorted(
                ["Procfile", "app.py", "requirements.txt", "static/site.css"])
        assert count == 4
    finally:
        path.unlink()


def test_link_outside_the_app_is_refused(tmp_path):
    d = app_dir(tmp_path)
    os.symlink("/etc/passwd", d / "passwd")
    with pytest.raises(BerthError, match="outside the app"):
        pack.files_to_pack(d)


def test_link_inside_the_app_is_kept_as_a_link(tmp_path):
    d = app_dir(tmp_path)
    os.symlink("app.py", d / "alias.py")
    assert "alias.py" in {p.as_posix() for p in pack.files_to_pack(d)}


@pytest.mark.parametrize("missing", ["requirements.txt", "Procfile"])
def test_missing_files_are_named_before_upload(tmp_path, missing):
    d = app_dir(tmp_path)
    (d / missing).unlink()
    with pytest.raises(BerthError, match=missing):
        pack.pack(d)
