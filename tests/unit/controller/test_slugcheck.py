import io
import tarfile

import pytest

from controller import slugcheck
from controller.errors import Invalid, TooLarge

GOOD = {"requirements.txt": b"flask\ngunicorn\n", "Procfile": b"web: gunicorn app:app\n",
        "app.py": b"app = None\n"}


def make_tar(path, files=GOOD, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def check(path, **kw):
    return slugcheck.check(path, "x", max_unpacked=kw.get("max_unpacked", 10 << 20),
                           max_files=kw.get("max_files", 100))


def test_good_app_passes(tmp_path):
    result = check(make_tar(tmp_path / "a.tgz"))
    assert result.procfile == {"web": "gunicorn app:app"} and result.files == 3


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("../evil.py"),
    tarfile.TarInfo("/etc/cron.d/evil"),
    tarfile.TarInfo("a/../../evil"),
    _link("passwd", "/etc/passwd"),
    _link("up", "../../outside"),
    _link("hard", "/etc/shadow", tarfile.LNKTYPE),
])
def test_hostile_members_are_refused_by_name(tmp_path, member):
    path = make_tar(tmp_path / "bad.tgz", extra=[member])
    with pytest.raises(Invalid) as err:
        check(path)
    assert member.name in err.value.message and err.value.hint


def test_inside_symlink_is_fine(tmp_path):
    check(make_tar(tmp_path / "ok.tgz", extra=[_link("alias.py", "app.py")]))


@pytest.mark.parametrize("missing,needle", [("requirements.txt", "requirements.txt"),
                                            ("Procfile", "Procfile")])
def test_missing_files_are_named(tmp_path, missing, needle):
    files = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(Invalid, match=needle):
        check(make_tar(tmp_path / "m.tgz", files))


def test_procfile_without_web_is_named(tmp_path):
    files = {**GOOD, "Procfile": b"worker: python w.py\n"}
    with pytest.raises(Invalid, match="no `web` process"):
        check(make_tar(tmp_path / "w.tgz", files))


def test_bad_procfile_line_is_named(tmp_path):
    with pytest.raises(Invalid, match="line 2"):
        slugcheck.parse_procfile("web: gunicorn a:b\nthis is not a process\n")


def test_size_and_count_limits(tmp_path):
    big = {**GOOD, "data.bin": b"\0" * (2 << 20)}
    with pytest.raises(TooLarge, match="unpacks to more than"):
        check(make_tar(tmp_path / "big.tgz", big), max_unpacked=1 << 20)
    many = {**GOOD, **{f"f{i}": b"" for i in range(10)}}
    with pytest.raises(TooLarge, match="more than 5 files"):
        check(make_tar(tmp_path / "many.tgz", many), max_files=5)


def test_not_a_tarball(tmp_path):
    p = tmp_path / "junk.tgz"
    p.write_bytes(b"this is not gzip")
    with pytest.raises(Invalid, match="not a readable gzip tarball"):
        check(p)


def test_receive_refuses_oversized_before_reading(tmp_path):
    with pytest.raises(TooLarge):
        slugcheck.receive(io.BytesIO(b""), 10 << 20, tmp_path, 1 << 20)
    assert list(tmp_path.iterdir()) == []


def test_receive_truncated_upload_leaves_nothing(tmp_path):
    with pytest.raises(Invalid, match="ended after 3 of 10 bytes"):
        slugcheck.receive(io.BytesIO(b"abc"), 10, tmp_path / "up", 1 << 20)
    assert list((tmp_path / "up").iterdir()) == []


def test_gunicorn_in_the_procfile_but_not_in_requirements_is_refused_with_a_hint(tmp_path):
    files = {**GOOD, "requirements.txt": b"flask\n# gunicorn later\n",
             "Procfile": b"web: APP_CONFIG=x gunicorn app:app\n"}
    with pytest.raises(Invalid) as info:
        check(make_tar(tmp_path / "g.tgz", files))
    assert "does not list it" in info.value.message and "gunicorn" in info.value.hint
    # another server, or requirements that include other files, are not second-guessed
    for other in ({"Procfile": b"web: python serve.py\n", "requirements.txt": b"flask\n"},
                  {"requirements.txt": b"-r base.txt\n"}):
        check(make_tar(tmp_path / "o.tgz", {**GOOD, **other}))
