"""lzn.atomic: a write lands whole or not at all, with the mode a plain open() gives."""
import os
import stat

import pytest

from lzn.atomic import remove_stale_temporaries, write_atomically


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_written_file_has_the_mode_open_gives_under_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomically(tmp_path / "metrics.json", lambda f: f.write(b"{}\n"))
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    write_atomically(path, lambda f: f.write(b"old"))

    def half(f):
        f.write(b"ne")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_atomically(path, half)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]


def test_stale_temporaries_are_the_dot_tmp_files_only(tmp_path):
    (tmp_path / ".ckpt.pt.ab12cd34.tmp").write_bytes(b"half")
    (tmp_path / "ckpt.pt").write_bytes(b"whole")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".ckpt.pt.ab12cd34.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
