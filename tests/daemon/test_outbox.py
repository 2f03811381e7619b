"""Publishing rules: no silent overwrite, resumable publish, unique failed/archive folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import outbox as ob


def test_choose_base_never_takes_a_different_result(tmp_path: Path) -> None:
    assert ob.choose_base(tmp_path, "alice", 7) == "alice"
    (tmp_path / "alice.log").write_text("another job's log")
    assert ob.choose_base(tmp_path, "alice", 7) == "alice.7"
    (tmp_path / "alice.7.mp4").write_bytes(b"x")
    assert ob.choose_base(tmp_path, "alice", 7) == "alice.7.2"


def test_choose_base_resumes_its_own_interrupted_publish(tmp_path: Path) -> None:
    # log and json were renamed, then the process died before the mp4: the same names are reused
    (tmp_path / "alice.log").write_text("")
    (tmp_path / "alice.json").write_text(json.dumps({"job_id": 7}))
    assert ob.choose_base(tmp_path, "alice", 7) == "alice"
    assert ob.choose_base(tmp_path, "alice", 8) == "alice.8"


def test_find_published_matches_the_run(tmp_path: Path) -> None:
    (tmp_path / "alice.json").write_text(json.dumps({"job_id": 7, "run": "7:1.5", "outputs": {}}))
    assert ob.find_published(tmp_path, "alice", 7, "7:1.5") is None  # no mp4: not published
    (tmp_path / "alice.mp4").write_bytes(b"video")
    assert ob.find_published(tmp_path, "alice", 7, "7:1.5") is not None
    assert ob.find_published(tmp_path, "alice", 7, "7:2.5") is None  # a later re-render of job 7


def test_publish_moves_everything_from_tmp(tmp_path: Path) -> None:
    tmp = ob.fresh_tmp_dir(tmp_path / ".tmp", 3)
    files = {ext: tmp / f"a.{ext}" for ext in ("mp4", "json", "log")}
    for p in files.values():
        p.write_text(p.suffix)
    out = ob.publish(tmp, tmp_path, "a", files)
    assert sorted(Path(p).name for p in out.values()) == ["a.json", "a.log", "a.mp4"]
    assert list(tmp.iterdir()) == []
    assert ob.clean_tmp(tmp_path / ".tmp") == ["3"]


def test_unique_dir_and_move_files(tmp_path: Path) -> None:
    first = ob.unique_dir(tmp_path / "failed", "alice", 4)
    second = ob.unique_dir(tmp_path / "failed", "alice", 4)
    assert (first.name, second.name) == ("alice", "alice.4")
    src = tmp_path / "alice.wav"
    src.write_text("x")
    assert ob.move_files([src, tmp_path / "gone.wav"], first) == ["alice.wav"]
    src.write_text("y")
    with pytest.raises(FileExistsError):
        ob.move_files([src], first)
    assert (ob.write_error(first, "line one\nline two")).read_text() == "line one line two\n"
