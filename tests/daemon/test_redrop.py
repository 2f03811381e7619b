"""The re-drop decision (daemon/redrop.py) as a table: every state x same files x redo_finished."""

from __future__ import annotations

import pytest

from daemon.jobs import JobStatus
from daemon.redrop import Redrop, decide


@pytest.mark.parametrize(("status", "same", "redo", "expected"), [
    (JobStatus.QUEUED, False, "skip", Redrop.WAIT),
    (JobStatus.RUNNING, True, "render", Redrop.WAIT),
    (JobStatus.DONE, False, "skip", Redrop.SKIP),
    (JobStatus.DONE, True, "skip", Redrop.SKIP),
    (JobStatus.DONE, False, "render", Redrop.RENDER_AGAIN),
    (JobStatus.FAILED, True, "skip", Redrop.LEAVE),
    (JobStatus.FAILED, False, "skip", Redrop.REQUEUE),
    (JobStatus.CANCELLED, False, "render", Redrop.REQUEUE),
    (JobStatus.CANCELLED, True, "render", Redrop.LEAVE),
])
def test_the_redrop_decision_table(status: JobStatus, same: bool, redo: str, expected: Redrop) -> None:
    assert decide(status, same_files=same, redo_finished=redo) is expected
