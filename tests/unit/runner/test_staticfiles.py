"""The static file server's rules (runner/staticfiles.py): which paths name a file,
that the walk never leaves the root nor follows a link an app's user planted, and
what the answer's head says (ETag, 304, Range, types, caching)."""
from __future__ import annotations

import os
import time

import pytest

from runner import staticfiles as sf

APP_UID = 54321     # plays the app's user: owns everything under the root


@pytest.fixture
def tree(tmp_path):
    """<tmp>/root (the static root, the app's) with css/site.css and a few traps; a
    secret outside it, owned by root."""
    root = tmp_path / "root"
    (root / "css").mkdir(parents=True)
    (root / "css" / "site.css").write_text("body{}\n")
    (root / "css" / "site.0123456789ab.css").write_text("body{}\n")
    (tmp_path / "secret").write_text("root's\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.css").write_text("not the app's\n")
    os.symlink(tmp_path / "secret", root / "link.css")              # file link out
    os.symlink("site.css", root / "css" / "inner.css")              # link inside: refused too
    os.symlink(tmp_path / "outside", root / "out")                  # dir link out
    os.mkfifo(root / "fifo.css")
    (root / "theirs.css").write_text("someone else's\n")
    for path in [root, *root.rglob("*")]:
        os.chown(path, APP_UID, APP_UID, follow_symlinks=False)
    os.chown(root / "theirs.css", 0, 0)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    yield fd, root
    os.close(fd)


def read(fd_info):
    fd, _ = fd_info
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_segments_are_plain_relative_names():
    assert sf.segments("/static/css/site.css", "/static/") == ["css", "site.css"]
    assert sf.segments("/static/a%20b.css?v=1#x", "/static/") == ["a b.css"]
    assert sf.segments("/static/caf%C3%A9.css", "/static/") == ["café.css"]
    for bad in ("/static/", "/static/css/", "/static/../x", "/static/css/../../x",
                "/static/%2e%2e/x", "/static/./x", "/static//x", "/static/a%2Fb",
                "/static/a%5Cb", "/static/a\\b", "/static/a%00b", "/static/%ff",
                "/other/x.css", "/staticx.css", "/static/" + "a/" * 40 + "x"):
        with pytest.raises(sf.NotFound):
            sf.segments(bad, "/static/")


def test_open_file_serves_the_apps_regular_files(tree):
    fd, _ = tree
    assert read(sf.open_file(fd, ["css", "site.css"], APP_UID)) == b"body{}\n"
    assert read(sf.open_file(fd, ["css", "site.css"], None)) == b"body{}\n"


@pytest.mark.parametrize("names", [
    ["link.css"],               # a symlink to a file outside
    ["css", "inner.css"],       # a symlink even to a file inside
    ["out", "x.css"],           # through a symlinked directory
    ["css"],                    # a directory is never listed nor served
    ["fifo.css"],               # a FIFO: refused without hanging on open
    ["theirs.css"],             # not the root owner's
    ["missing.css"], ["css", "missing", "x.css"], [],
])
def test_open_file_refuses(tree, names):
    fd, _ = tree
    started = time.monotonic()
    with pytest.raises(sf.NotFound):
        sf.open_file(fd, names, APP_UID)
    assert time.monotonic() - started < 1


def test_open_dirs_walks_without_following_links(tree, tmp_path):
    top = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = sf.open_dirs(top, ["root", "css"])
        assert sorted(os.listdir(fd)) == ["inner.css", "site.0123456789ab.css", "site.css"]
        os.close(fd)
        for names in (["root", "out"], ["root", "link.css"], ["root", ".."], ["nope"]):
            with pytest.raises(sf.NotFound):
                sf.open_dirs(top, names)
        with pytest.raises(sf.NotFound):        # owned by root, not the app
            sf.open_dirs(top, ["outside"], uid=APP_UID)
    finally:
        os.close(top)


def test_hashed_names_are_immutable_others_short():
    assert sf.cache_control("base.5af66c1b1797.css") == sf.IMMUTABLE
    assert sf.cache_control("jquery.min.0123456789ab.js") == sf.IMMUTABLE
    assert sf.cache_control("app.css.0123456789ab.map") == sf.IMMUTABLE
    for name in ("base.css", "base.5af66c1b179.css", "base.5AF66C1B1797.css",
                 "5af66c1b1797.css", "base.5af66c1b1797"):
        assert sf.cache_control(name) == sf.SHORT, name
    assert "immutable" in sf.IMMUTABLE and "max-age=31536000" in sf.IMMUTABLE


def test_content_types():
    assert sf.content_type("a.css") == "text/css; charset=utf-8"
    assert sf.content_type("a.JS") == "text/javascript; charset=utf-8"
    assert sf.content_type("a.woff2") == "font/woff2"
    assert sf.content_type("a.svg") == "image/svg+xml; charset=utf-8"
    assert sf.content_type("a.png") == "image/png"
    assert sf.content_type("LICENSE") == "application/octet-stream"


def test_header_names_app_prefix_and_versions():
    assert sf.parse_header("shop /static/ 5,4") == sf.Target("shop", "/static/", (5, 4))
    for bad in (None, "", "shop /static/", "shop static/ 5", "shop /static/ x",
                "shop /static/ 0", "shop /s/ 5 extra"):
        assert sf.parse_header(bad) is None, bad


MTIME = 1_700_000_000.7
ETAG = '"abc123"'


def answer(headers=None, method="GET", size=100, name="site.css"):
    ans = sf.decide(method, headers or {}, name, size, MTIME, ETAG)
    return ans.status, ans.offset, ans.length, dict(ans.headers)


def test_a_plain_get_and_head():
    status, offset, length, h = answer()
    assert (status, offset, length) == (200, 0, 100)
    assert h["ETag"] == ETAG and h["Content-Length"] == "100"
    assert h["Last-Modified"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert h["Content-Type"] == "text/css; charset=utf-8" and h["Accept-Ranges"] == "bytes"
    assert h["Cache-Control"] == sf.SHORT
    status, _, length, h = answer(method="HEAD")
    assert (status, length, h["Content-Length"]) == (200, 0, "100")
    assert answer(name="a.0123456789ab.css")[3]["Cache-Control"] == sf.IMMUTABLE


def test_conditional_get():
    for inm in (ETAG, 'W/"abc123"', '"x", "abc123"', "*"):
        status, _, length, h = answer({"if-none-match": inm})
        assert (status, length) == (304, 0) and h["ETag"] == ETAG
        assert "Content-Length" not in h
    lm = "Tue, 14 Nov 2023 22:13:20 GMT"
    assert answer({"if-modified-since": lm})[0] == 304
    assert answer({"if-modified-since": "Tue, 14 Nov 2023 22:13:19 GMT"})[0] == 200
    assert answer({"if-modified-since": "garbage"})[0] == 200
    # If-None-Match wins over If-Modified-Since
    assert answer({"if-none-match": '"other"', "if-modified-since": lm})[0] == 200


def test_ranges():
    def rng(value, **kw):
        status, offset, length, h = answer({"range": value, **kw})
        return status, offset, length, h.get("Content-Range")
    assert rng("bytes=0-9") == (206, 0, 10, "bytes 0-9/100")
    assert rng("bytes=90-") == (206, 90, 10, "bytes 90-99/100")
    assert rng("bytes=-5") == (206, 95, 5, "bytes 95-99/100")
    assert rng("bytes=95-500") == (206, 95, 5, "bytes 95-99/100")
    assert rng("bytes=-500") == (206, 0, 100, "bytes 0-99/100")
    assert rng("bytes=100-") == (416, 0, 0, "bytes */100")
    assert rng("bytes=-0")[0] == 416
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=5-1", "bytes=x-", "bytes=-"):
        assert rng(ignored)[:3] == (200, 0, 100), ignored
    assert rng("bytes=0-9", **{"if-range": ETAG})[0] == 206
    assert rng("bytes=0-9", **{"if-range": '"stale"'})[0] == 200
    assert rng("bytes=0-9", **{"if-range": "Tue, 14 Nov 2023 22:13:20 GMT"})[0] == 206
    assert rng("bytes=0-9", **{"if-range": "Tue, 14 Nov 2023 22:00:00 GMT"})[0] == 200
    assert answer({"range": "bytes=0-9"}, method="HEAD")[0] == 200


def test_heads_and_errors():
    out = sf.head(200, [("ETag", ETAG)], keep_alive=False, now=0)
    assert out.startswith(b"HTTP/1.1 200 OK\r\nServer: berth-static\r\n")
    assert b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n" in out
    assert out.endswith(b"ETag: \"abc123\"\r\nConnection: close\r\n\r\n")
    page = sf.error(405, "only GET and HEAD")
    assert b"Allow: GET, HEAD\r\n" in page and page.endswith(b"\r\n\r\nonly GET and HEAD\n")
    assert sf.error(404, "not found", head_only=True).endswith(b"\r\n\r\n")
