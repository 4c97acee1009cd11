import io
import os
import stat
import tarfile

import pytest

from messaging import slugfile


def archive(tmp_path, members):
    path = tmp_path / "s.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_info(name, data=b"x", mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def test_extract_strips_owner_and_dangerous_bits(tmp_path):
    info, data = file_info("tool", mode=0o4777)
    info.uid, info.gid = 4242, 4242
    path = archive(tmp_path, [(info, data), file_info("plain.txt", mode=0o666)])
    dest = tmp_path / "out"
    with tarfile.open(path) as tar:
        slugfile.extract(tar, dest)
    tool = os.stat(dest / "tool")
    assert stat.S_IMODE(tool.st_mode) == 0o755 and tool.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(dest / "plain.txt").st_mode) == 0o644


def test_extract_without_the_stdlib_filter_applies_the_same_rules(tmp_path, monkeypatch):
    """Debian 12's Python 3.11.2 has no tarfile.data_filter: the hand path must hold."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    info, data = file_info("suid", mode=0o6755)
    info.uid = 4242
    path = archive(tmp_path, [(info, data)])
    dest = tmp_path / "out"
    with tarfile.open(path) as tar:
        slugfile.extract(tar, dest)
    st = os.stat(dest / "suid")
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == os.getuid()
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    with tarfile.open(archive(tmp_path, [(link, None)])) as tar, \
            pytest.raises(ValueError, match="outside the app"):
        slugfile.extract(tar, tmp_path / "out2")
    assert not (tmp_path / "out2" / "evil").exists()


@pytest.mark.parametrize("name,kind,target", [
    ("../x", tarfile.REGTYPE, ""), ("/abs", tarfile.REGTYPE, ""),
    ("a/../../x", tarfile.REGTYPE, ""), ("l", tarfile.SYMTYPE, "/etc"),
    ("d/l", tarfile.SYMTYPE, "../../up"), ("h", tarfile.LNKTYPE, "../outside"),
    ("fifo", tarfile.FIFOTYPE, ""), ("dev", tarfile.CHRTYPE, ""),
])
def test_member_problems(name, kind, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    assert slugfile.member_problem(info)


@pytest.mark.parametrize("name,kind,target", [
    ("app.py", tarfile.REGTYPE, ""), ("d/l", tarfile.SYMTYPE, "../app.py"),
    ("static", tarfile.DIRTYPE, ""), ("h", tarfile.LNKTYPE, "app.py"),
])
def test_fine_members(name, kind, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    assert slugfile.member_problem(info) is None
