"""replace_dir: a directory appears whole, or not at all."""

from __future__ import annotations

import pytest

from tensorized_attention._fs import replace_dir


def test_filled_directory_replaces_an_incomplete_one(tmp_path):
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    (out / "stale").write_text("left by a run that died")
    with replace_dir(out, "done") as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "data").write_text("x")
        (tmp / "done").write_text("")
    assert sorted(p.name for p in out.iterdir()) == ["data", "done"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary left


def test_a_complete_directory_written_meanwhile_is_kept(tmp_path):
    out = tmp_path / "out"
    with replace_dir(out, "done") as tmp:
        (tmp / "mine").write_text("")
        (tmp / "done").write_text("")
        out.mkdir()  # another process finished first
        (out / "done").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["done"] and (out / "done").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_error_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with replace_dir(out, "done") as tmp:
            (tmp / "half").write_text("")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
