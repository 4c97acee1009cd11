"""runner/unpack.py: hostile slugs are refused and never change anything outside the
release directory; limits are enforced on what is written; a real app unpacks exactly.

Every archive is built here with tarfile. Each attack runs in a world with a decoy
file and a decoy dir beside the release dir, and checks that nothing outside changed
(content, mode, owner, link count, no new entries) and that the release dir is empty.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import random
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import runner.unpack
from messaging.slugfile import member_problem
from runner.errors import SlugError
from runner.unpack import UnpackStats, unpack

ROOT = Path(__file__).resolve().parents[3]
MB = 1 << 20
Entry = tuple[tarfile.TarInfo, bytes | None]


# -- building archives -------------------------------------------------------------

def file(name: str, data: bytes = b"data", mode: int = 0o644, uid: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.uname = len(data), mode, uid, "someone"
    return info, data


def directory(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def symlink(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def hardlink(name: str, target: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def special(name: str, kind: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def archive(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# -- the world around the release dir ----------------------------------------------

@dataclass
class World:
    root: Path          # tmp_path
    rel: Path           # the (empty) release dir unpack writes into
    outside: Path       # beside it: a decoy file and a decoy dir

    @property
    def decoy(self) -> Path:
        return self.outside / "decoy"

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        """Every entry under root except rel: type, mode, owner, links, content."""
        seen: dict[str, tuple[object, ...]] = {}
        for top, dirs, files in os.walk(self.root):
            if Path(top) == self.root:
                dirs.remove("rel")
            for name in dirs + files:
                path = os.path.join(top, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    body: object = os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    body = Path(path).read_bytes()
                else:
                    body = None
                seen[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, body)
        return seen


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path, tmp_path / "rel", tmp_path / "outside")
    w.rel.mkdir()
    w.outside.mkdir()
    w.decoy.write_bytes(b"host secret")
    w.decoy.chmod(0o600)
    (w.outside / "decoydir").mkdir(mode=0o700)
    (w.outside / "decoydir" / "keep").write_bytes(b"keep")
    return w


def run(world: World, data: bytes, max_bytes: int = 10 * MB,
        max_members: int = 1000) -> UnpackStats:
    return unpack(io.BytesIO(data), world.rel, max_bytes=max_bytes, max_members=max_members)


def refused(world: World, data: bytes, code: str = "slug_unsafe", **limits: int) -> SlugError:
    """Unpacking fails with `code`, leaves the release dir empty and the rest as it was."""
    before = world.snapshot()
    with pytest.raises(SlugError) as caught:
        run(world, data, **limits)
    assert caught.value.code == code, caught.value.message
    assert caught.value.hint
    assert os.listdir(world.rel) == []
    assert world.snapshot() == before
    return caught.value


def tree(rel: Path) -> dict[str, tuple[object, ...]]:
    """The unpacked tree as {path: (kind, mode, content or target)}."""
    out: dict[str, tuple[object, ...]] = {}
    for top, dirs, files in os.walk(rel):
        for name in dirs + files:
            path = Path(top, name)
            key = str(path.relative_to(rel))
            st = path.lstat()
            if path.is_symlink():
                out[key] = ("link", os.readlink(path))
            elif path.is_dir():
                out[key] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[key] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


# -- symlink chains that look inside but resolve outside ----------------------------

DEPTHS = [1, 2, 3, 5]


def chain(world: World, depth: int) -> tuple[list[Entry], str]:
    """l0 -> ., l1 -> l0/.., ..., l<depth> -> l<depth-1>/..: every link is inside the app
    when read as text, but l<depth> is rel's depth-th ancestor once they all exist.
    Returns the links and the member path that reaches `outside` through them."""
    links = [symlink("l0", ".")] + [symlink(f"l{k}", f"l{k - 1}/..")
                                    for k in range(1, depth + 1)]
    ancestor = os.path.normpath(os.path.join(world.rel, *[".."] * depth))
    return links, f"l{depth}/{os.path.relpath(world.outside, ancestor)}"


@pytest.mark.parametrize("depth", DEPTHS)
def test_the_chains_really_escape_and_pass_the_lexical_check(world: World, depth: int):
    """Guards the attack tests below: built naively, each chain does reach outside/."""
    links, through = chain(world, depth)
    scratch = world.root / "scratch"
    scratch.mkdir()
    for info, _ in links:
        assert member_problem(info) is None
        os.symlink(info.linkname, scratch / info.name)
    assert member_problem(file(f"{through}/decoy")[0]) is None
    assert member_problem(hardlink("h", f"{through}/decoy")[0]) is None
    assert os.path.realpath(scratch / through) == str(world.outside)


@pytest.mark.parametrize("depth", DEPTHS)
def test_chain_then_files_through_it(world: World, depth: int):
    links, through = chain(world, depth)
    refused(world, archive(*links, file(f"{through}/decoy", b"pwned", 0o777),
                           file(f"{through}/planted", b"pwned"),
                           file(f"{through}/decoydir/keep", b"pwned")))


@pytest.mark.parametrize("depth", DEPTHS)
def test_files_through_the_chain_before_its_links(world: World, depth: int):
    links, through = chain(world, depth)
    refused(world, archive(links[0], file(f"{through}/planted", b"pwned"), *links[1:],
                           file(f"{through}/decoy", b"pwned")))


@pytest.mark.parametrize("depth", DEPTHS)
def test_hard_link_through_the_chain_to_the_decoy(world: World, depth: int):
    """The published attack: hard link to a host file, then a member of the same name
    whose data and mode would land on it."""
    links, through = chain(world, depth)
    err = refused(world, archive(*links, hardlink("h", f"{through}/decoy"),
                                 file("h", b"pwned", 0o4777)))
    assert "'h'" in err.message and "hard link" in err.message


@pytest.mark.parametrize("depth", DEPTHS)
def test_the_chain_alone_is_refused(world: World, depth: int):
    links, _ = chain(world, depth)
    err = refused(world, archive(*links))
    assert "'l1'" in err.message and "resolves outside" in err.message    # the first out


@pytest.mark.parametrize("depth", DEPTHS)
def test_dangling_link_through_the_chain_is_refused(world: World, depth: int):
    links, through = chain(world, depth)
    refused(world, archive(*links, symlink("x", f"{through}/not-there-yet")))


# -- direct escapes, with and without the lexical check ---------------------------

def direct_escapes(world: World) -> dict[str, bytes]:
    return {
        "symlink to /etc/passwd": archive(symlink("passwd", "/etc/passwd")),
        "symlink to ../../outside": archive(symlink("up", "../../outside"),
                                            file("up/planted")),
        "symlink to ../outside from a subdir": archive(symlink("sub/up", "../../outside"),
                                                       file("sub/up/planted")),
        "dir symlink then a file under it": archive(symlink("out", "../outside"),
                                                    file("out/planted", b"pwned"),
                                                    file("out/decoy", b"pwned")),
        "hard link to an absolute path": archive(hardlink("h", str(world.decoy)),
                                                 file("h", b"pwned", 0o777)),
        "hard link with ..": archive(hardlink("h", "../outside/decoy")),
        "hard link to a name never written": archive(hardlink("h", "nothing")),
        "file with ..": archive(file("../outside/planted")),
        "file with an absolute path": archive(file(str(world.outside / "planted"))),
    }


ESCAPES = list(direct_escapes(World(Path("/w"), Path("/w/rel"), Path("/w/outside"))))


@pytest.mark.parametrize("case", ESCAPES)
def test_direct_escapes_are_refused(world: World, case: str):
    refused(world, direct_escapes(world)[case])


@pytest.mark.parametrize("case", ESCAPES)
def test_direct_escapes_are_refused_even_without_the_lexical_check(
        world: World, case: str, monkeypatch: pytest.MonkeyPatch):
    """The filesystem rules hold on their own if member_problem ever misses a case."""
    monkeypatch.setattr(runner.unpack, "member_problem", lambda member: None)
    refused(world, direct_escapes(world)[case])


def test_dir_symlink_inside_then_a_file_under_it_is_not_written_through(world: World):
    err = refused(world, archive(directory("assets"), file("assets/app.css"),
                                 symlink("static", "assets"), file("static/evil.js")))
    assert "'static'" in err.message


def test_a_symlink_under_another_symlink_is_refused(world: World):
    err = refused(world, archive(directory("assets"), symlink("static", "assets"),
                                 symlink("static/x", "app.css")))
    assert "'static/x'" in err.message and "not a directory" in err.message


# -- limits ------------------------------------------------------------------------

def test_gzip_bomb_fails_while_unpacking(world: World):
    bomb = archive(file("zeros.bin", bytes(5 * MB)))
    assert len(bomb) < 64 << 10
    err = refused(world, bomb, "slug_too_large", max_bytes=MB)
    assert "'zeros.bin'" in err.message and "1 MB" in err.hint


def test_bytes_are_counted_across_files(world: World):
    data = archive(*[file(f"{n}.bin", bytes(400 << 10)) for n in "abc"])
    err = refused(world, data, "slug_too_large", max_bytes=MB)
    assert "'c.bin'" in err.message


def test_reading_stops_at_the_limit(world: World):
    noise = random.Random(7).randbytes(5 * MB)
    stream = io.BytesIO(archive(file("noise.bin", noise)))
    with pytest.raises(SlugError) as caught:
        unpack(stream, world.rel, max_bytes=MB, max_members=10)
    assert caught.value.code == "slug_too_large"
    assert stream.tell() < 2 * MB
    assert os.listdir(world.rel) == []


def test_exactly_the_limits_is_fine(world: World):
    stats = run(world, archive(*[file(f"{n}.bin", bytes(MB // 4)) for n in "abcd"]),
                max_bytes=MB, max_members=4)
    assert stats == UnpackStats(members=4, files=4, bytes=MB, links=0)


def test_too_many_members(world: World):
    err = refused(world, archive(*[file(f"f{n}") for n in range(11)]), "slug_too_large",
                  max_members=10)
    assert "10" in err.message


def test_huge_long_name_header_is_refused_before_it_is_read(world: World):
    data = archive(file("a" * (2 * MB)), fmt=tarfile.GNU_FORMAT)
    err = refused(world, data, "slug_too_large", max_bytes=100 * MB)
    assert "header" in err.message


def test_endless_headers_are_bounded(world: World):
    header = tarfile.TarInfo._create_pax_generic_header(   # type: ignore[attr-defined]
        {"comment": "x" * 900}, tarfile.XGLTYPE, "utf-8")
    tar = header * 400 + tarfile.TarInfo("f").tobuf() + bytes(1024)
    err = refused(world, gzip.compress(tar), "slug_too_large", max_bytes=1000, max_members=5)
    assert "decompressed" in err.message


# -- modes and owners --------------------------------------------------------------

@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.mark.usefixtures("strict_umask")
@pytest.mark.parametrize(("entry", "mode"), [
    (file("f", mode=0o4777), 0o755),
    (file("f", mode=0o2755), 0o755),
    (file("f", mode=0o6711), 0o755),
    (file("f", mode=0o1777), 0o755),
    (file("f", mode=0o666), 0o644),
    (file("f", mode=0o600), 0o644),
    (file("f", mode=0o010), 0o755),
    (directory("f", mode=0o777), 0o755),
    (directory("f", mode=0o3777), 0o755),
    (directory("f", mode=0o500), 0o755),
])
def test_modes_are_masked(world: World, entry: Entry, mode: int):
    run(world, archive(entry))
    assert stat.S_IMODE((world.rel / "f").lstat().st_mode) == mode


def test_owners_from_the_archive_are_ignored(world: World):
    run(world, archive(file("f", uid=4242)))
    st = (world.rel / "f").lstat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


# -- a real app --------------------------------------------------------------------

@pytest.mark.usefixtures("strict_umask")
def test_a_real_app_unpacks_exactly(world: World):
    stats = run(world, archive(
        directory("./"),
        directory("./app"),
        file("./app/main.py", b"print('hi')\n"),
        file("./bin/run", b"#!/bin/sh\nexec app\n", 0o775),      # before its dir entry
        directory("./bin"),
        directory("./assets", 0o775),
        file("./assets/site.css", b"body {}\n", 0o664),
        symlink("./static", "assets"),
        symlink("./app/style.css", "../assets/site.css"),
        symlink("./app/here", "."),
        hardlink("./app/copy.py", "app/main.py"),
        file("Procfile", b"web: bin/run\n"),
    ))
    assert tree(world.rel) == {
        "app": ("dir", 0o755),
        "app/main.py": ("file", 0o644, b"print('hi')\n"),
        "app/copy.py": ("file", 0o644, b"print('hi')\n"),
        "app/style.css": ("link", "../assets/site.css"),
        "app/here": ("link", "."),
        "bin": ("dir", 0o755),
        "bin/run": ("file", 0o755, b"#!/bin/sh\nexec app\n"),
        "assets": ("dir", 0o755),
        "assets/site.css": ("file", 0o644, b"body {}\n"),
        "static": ("link", "assets"),
        "Procfile": ("file", 0o644, b"web: bin/run\n"),
    }
    assert (world.rel / "app/copy.py").stat().st_ino == (world.rel / "app/main.py").stat().st_ino
    assert (world.rel / "static/site.css").read_bytes() == b"body {}\n"
    written = [b"print('hi')\n", b"#!/bin/sh\nexec app\n", b"body {}\n", b"web: bin/run\n"]
    assert stats == UnpackStats(members=12, files=4, bytes=sum(map(len, written)), links=4)


# -- members that are refused outright ---------------------------------------------

@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_fifos_and_devices_are_refused(world: World, kind: bytes):
    err = refused(world, archive(file("ok"), special("dev", kind)))
    assert "'dev'" in err.message


@pytest.mark.parametrize("entries", [
    [file("a", b"one"), file("a", b"two")],
    [file("a"), directory("a")],
    [directory("a"), file("a")],
    [file("d/a"), file("./d//a")],
    [file("a"), hardlink("b", "a"), file("b")],
    [file("a"), symlink("a", "b")],
    [directory("a"), symlink("a", "b")],
    [symlink("a", "b"), symlink("a", "c")],
], ids=["file-file", "file-dir", "dir-file", "same-path-spelled-twice", "link-file",
        "file-symlink", "dir-symlink", "symlink-symlink"])
def test_duplicate_names_are_refused(world: World, entries: list[Entry]):
    refused(world, archive(*entries))


def test_a_path_too_long_to_check_is_refused(world: World):
    deep = "/".join(["d" * 200] * 21)
    err = refused(world, archive(file(f"{deep}/f")))
    assert "too long" in err.message


def test_a_link_named_after_the_app_dir_is_refused(world: World):
    refused(world, archive(symlink("./", "..")))


@pytest.mark.parametrize("data", [
    b"",
    b"not a gzip at all",
    gzip.compress(b"not a tar " * 100),
    archive(file("big", random.Random(1).randbytes(200 << 10)))[:50 << 10],
], ids=["empty", "not-gzip", "gzip-not-tar", "truncated"])
def test_corrupt_archives_fail(world: World, data: bytes):
    refused(world, data, "slug_failed")


def test_a_plain_tar_is_refused(world: World):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info, data = file("a")
        tar.addfile(info, io.BytesIO(data))
    refused(world, buf.getvalue(), "slug_failed")


def test_dest_must_be_empty(world: World):
    (world.rel / "mine").write_bytes(b"keep")
    with pytest.raises(SlugError, match="not empty"):
        run(world, archive(file("a")))
    assert os.listdir(world.rel) == ["mine"]


# -- the CLI -----------------------------------------------------------------------

def cli(dest: Path, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "runner.unpack", str(dest), *args],
                          input=data, capture_output=True, cwd=ROOT, timeout=60)


def test_cli_success(world: World):
    out = cli(world.rel, archive(file("a", b"hello"), symlink("b", "a")),
              "--max-bytes", "100", "--max-members", "10")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ok": True, "members": 2, "files": 1, "bytes": 5,
                                      "links": 1}
    assert (world.rel / "b").read_bytes() == b"hello"


def test_cli_failure(world: World):
    before = world.snapshot()
    links, through = chain(world, 3)
    out = cli(world.rel, archive(*links, file(f"{through}/decoy", b"pwned")),
              "--max-bytes", "100", "--max-members", "10")
    assert out.returncode == 3, out.stderr
    reply = json.loads(out.stdout)
    assert reply["ok"] is False and reply["code"] == "slug_unsafe"
    assert reply["message"] and reply["hint"]
    assert os.listdir(world.rel) == [] and world.snapshot() == before


def test_cli_limit_failure(world: World):
    out = cli(world.rel, archive(file("zeros", bytes(MB))), "--max-bytes", "1000",
              "--max-members", "10")
    assert out.returncode == 3
    assert json.loads(out.stdout)["code"] == "slug_too_large"


def imported_by_the_cli() -> set[str]:
    out = subprocess.run([sys.executable, "-c", "import sys, runner.unpack; "
                          "print(' '.join(sys.modules))"],
                         capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
    return set(out.stdout.split())


def test_cli_does_not_import_the_daemon():
    assert not {"runner.daemon", "runner.process", "eventlet"} & imported_by_the_cli()


def test_cli_does_not_import_zmq():
    assert "zmq" not in imported_by_the_cli()
