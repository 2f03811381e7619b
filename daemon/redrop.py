"""The re-drop decision: files in the inbox have the fingerprint of a job the database already has.

A pure function of the existing job's state, whether the files are that job's very files (same
names, sizes and mtimes as recorded) and ``jobs.redo_finished``; the scanner carries the decision
out (:mod:`daemon.watcher`). Written as a table so that every combination has one answer
(tests/daemon/test_redrop.py checks the table).
"""

from __future__ import annotations

import enum

from daemon.jobs import JobStatus

__all__ = ["Redrop", "decide"]


class Redrop(enum.Enum):
    WAIT = "wait"                  # that job is queued or running: these files wait on it
    RENDER_AGAIN = "render_again"  # finished, and jobs.redo_finished = render: queue it once more
    SKIP = "skip"                  # finished, and jobs.redo_finished = skip: archive/delete the files
    LEAVE = "leave"                # the very files a failed job left in the inbox: wait for `retry`
    REQUEUE = "requeue"            # failed or cancelled before, dropped again: queue it once more


def decide(status: JobStatus, *, same_files: bool, redo_finished: str) -> Redrop:
    """What to do with files whose fingerprint equals that of a job in state ``status``.

    ``same_files``: the inbox holds exactly the files recorded for the job (not a new copy), which
    for a failed job means it left them where they were and waits for ``infinitetalkd retry``.
    """
    if status in (JobStatus.QUEUED, JobStatus.RUNNING):
        return Redrop.WAIT
    if status is JobStatus.DONE:
        return Redrop.RENDER_AGAIN if redo_finished == "render" else Redrop.SKIP
    if same_files:
        return Redrop.LEAVE
    return Redrop.REQUEUE
