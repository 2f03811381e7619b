"""Moving a job's files (daemon/files.py): all or nothing, and the snapshot's bytes when the inbox changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import files as fl


def test_moving_a_jobs_files_is_all_or_nothing(tmp_path: Path) -> None:
    inbox, failed = tmp_path / "inbox", tmp_path / "failed"
    inbox.mkdir()
    inputs = []
    for name in ("a.png", "a.wav", "a.yaml"):
        (inbox / name).write_text(name)
        st = (inbox / name).stat()
        inputs.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    (failed / "a").mkdir(parents=True)
    (failed / "a.9").mkdir()
    (failed / "a.9" / "a.yaml").write_text("in the way")  # the third move fails
    with pytest.raises(OSError):
        fl.settle(inbox, inputs, None, failed / "a.9")
    assert sorted(p.name for p in inbox.iterdir()) == ["a.png", "a.wav", "a.yaml"]
    assert sorted(p.name for p in (failed / "a.9").iterdir()) == ["a.yaml"]
    dest = fl.to_failed(failed, "a", 10, inbox, inputs, "why", settled_in=[failed])
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "a.wav", "a.yaml", "error.txt"]


def test_a_changed_inbox_file_stays_and_the_snapshot_is_archived(tmp_path: Path) -> None:
    inbox, snap, dest = tmp_path / "inbox", tmp_path / "snap", tmp_path / "archive"
    inbox.mkdir()
    dest.mkdir()
    inputs = []
    for name in ("a.png", "a.wav"):
        (inbox / name).write_text("old " + name)
        st = (inbox / name).stat()
        inputs.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    fl.snapshot(inbox, ["a.png", "a.wav"], snap)
    (inbox / "a.wav.new").write_text("a new recording")
    (inbox / "a.wav.new").replace(inbox / "a.wav")
    assert fl.settle(inbox, inputs, snap, dest) == ["a.png", "a.wav"]
    assert (dest / "a.wav").read_text() == "old a.wav"
    assert sorted(p.name for p in inbox.iterdir()) == ["a.png", "a.wav"]  # both stay: a new job
    assert (inbox / "a.wav").read_text() == "a new recording"


def test_a_refused_drop_settled_by_another_process_is_not_settled_again(tmp_path: Path) -> None:
    """Refused drops are recorded without a hash: a second mover (a former leader waking up after the
    new one moved the files) recognises failed/a/ by size and mtime, which a move keeps, and makes no
    second folder."""
    inbox, failed, archive = tmp_path / "inbox", tmp_path / "failed", tmp_path / "archive"
    inbox.mkdir()
    inputs = []
    for name in ("a.png", "a.wav"):
        (inbox / name).write_text("refused " + name)
        st = (inbox / name).stat()
        inputs.append({"role": "input", "name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    first = fl.to_failed(failed, "a", 10, inbox, inputs, "why", settled_in=[archive, failed])
    again = fl.to_failed(failed, "a", 10, inbox, inputs, "why", settled_in=[archive, failed])
    assert again == first == failed / "a"
    assert [p.name for p in failed.iterdir()] == ["a"]
    assert sorted(p.name for p in first.iterdir()) == ["a.png", "a.wav", "error.txt"]
