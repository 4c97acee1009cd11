"""Slug fetching (sha256 verified, token sent) and safe, atomic unpacking."""
from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.errors import SlugError
from runner.slug import SlugStore, fetch
from runner.slug import unpack as unpack_limited

TOKEN = "secret"


def tarball(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tuple):
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
            else:
                tar.addfile(member)
    return path


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, bytes]]]:
    blobs: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = blobs.get(self.path.rsplit("/", 1)[-1])
            status = 200 if body is not None else 404
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, body = 401, b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/slugs", blobs
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_verifies_and_keeps_the_slug(server: Any, tmp_path: Path) -> None:
    url, blobs = server
    data = b"slug bytes"
    sha = hashlib.sha256(data).hexdigest()
    blobs[sha] = data
    path = fetch(f"{url}/{sha}", sha, TOKEN, tmp_path)
    assert path == tmp_path / f"{sha}.tar.gz" and path.read_bytes() == data
    del blobs[sha]
    assert fetch(f"{url}/{sha}", sha, TOKEN, tmp_path) == path   # reused, not fetched


def test_fetch_rejects_a_bad_sha(server: Any, tmp_path: Path) -> None:
    url, blobs = server
    claimed = "a" * 64
    blobs[claimed] = b"something else"
    with pytest.raises(SlugError) as err:
        fetch(f"{url}/{claimed}", claimed, TOKEN, tmp_path)
    assert err.value.code == "slug_failed" and "expected aaaaaaaaaaaa" in err.value.message
    assert list(tmp_path.iterdir()) == []         # neither the slug nor a .part file


def test_fetch_names_the_token_on_401(server: Any, tmp_path: Path) -> None:
    url, blobs = server
    blobs["b" * 64] = b"x"
    with pytest.raises(SlugError) as err:
        fetch(f"{url}/{'b' * 64}", "b" * 64, "wrong", tmp_path)
    assert "HTTP 401" in err.value.message and "runner_token" in err.value.hint


def unpack(archive: Path, dest: Path) -> Path:
    """The real unpacker (a `python -m runner.unpack` subprocess), unjailed."""
    return unpack_limited(archive, dest, max_bytes=10 << 20, max_members=1000)


def test_unpack_is_atomic_and_reused(tmp_path: Path) -> None:
    archive = tarball(tmp_path / "s.tar.gz", [("app.py", b"x = 1\n"),
                                              ("pkg/mod.py", b""),
                                              link("pkg/alias.py", "mod.py"),
                                              link("top", "pkg/../app.py")])
    dest = unpack(archive, tmp_path / "apps" / "demo" / "sha1")
    assert (dest / "app.py").read_text() == "x = 1\n"
    assert (dest / "pkg" / "alias.py").is_symlink()
    (dest / "marker").write_text("kept")
    assert unpack(archive, dest) == dest and (dest / "marker").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["sha1"]   # no temp dir left


@pytest.mark.parametrize("member", [
    ("../evil.py", b"x"),
    ("pkg/../../evil.py", b"x"),
    ("/tmp/evil.py", b"x"),
    link("escape", "../../etc/passwd"),
    link("pkg/escape", "../../outside"),
    link("abs", "/etc/passwd"),
    link("hard", "../outside", tarfile.LNKTYPE),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "nested-symlink-out",
        "symlink-absolute", "hardlink-out"])
def test_unpack_rejects_paths_outside_the_app(tmp_path: Path,
                                              member: tarfile.TarInfo | tuple[str, bytes]) -> None:
    archive = tarball(tmp_path / "bad.tar.gz", [("app.py", b""), member])
    dest = tmp_path / "apps" / "demo" / "sha"
    with pytest.raises(SlugError) as err:
        unpack(archive, dest)
    assert err.value.code == "slug_unsafe", err.value.message
    assert member_name(member) in err.value.message
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []      # the temp dir was removed
    assert not (tmp_path / "evil.py").exists()


def member_name(member: tarfile.TarInfo | tuple[str, bytes]) -> str:
    return member[0] if isinstance(member, tuple) else member.name


def test_unpack_rejects_a_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(b"not a tarball")
    with pytest.raises(SlugError) as err:
        unpack(archive, tmp_path / "apps" / "a" / "s")
    assert err.value.code == "slug_failed"


def test_store_refuses_names_that_are_paths(tmp_path: Path) -> None:
    store = SlugStore(tmp_path, TOKEN, 1 << 20, 100)
    with pytest.raises(SlugError):
        store.ensure("../other", "a" * 64, "http://127.0.0.1:1/", tmp_path / "rel")
    with pytest.raises(SlugError):
        store.ensure("demo", "../../x", "http://127.0.0.1:1/", tmp_path / "rel")


def test_a_prune_between_fetch_and_unpack_leaves_the_archive(
        server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another prepare's prune runs while this one's slug is fetched but not unpacked
    yet (its release dir does not exist): the archive stays (a push once failed with
    FileNotFoundError here)."""
    import runner.slug as slug_module
    url, blobs = server
    data = tarball(tmp_path / "src.tar.gz", [("app.py", b"print(1)\n")]).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    blobs[sha] = data
    store = SlugStore(tmp_path / "runner", TOKEN, 1 << 20, 100)
    real_unpack = slug_module.unpack

    def racing_unpack(archive: Path, *args: Any, **kwargs: Any) -> Path:
        assert store.prune(set()) == []           # nothing kept... but this one is busy
        return real_unpack(archive, *args, **kwargs)
    monkeypatch.setattr(slug_module, "unpack", racing_unpack)
    dest, had = store.ensure("app", sha, f"{url}/{sha}", tmp_path / "releases")
    assert not had and (dest / "app.py").read_text() == "print(1)\n"
    assert store.prune(set()) == [f"{sha}.tar.gz"]   # idle again: prunable
