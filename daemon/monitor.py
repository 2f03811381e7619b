"""What the worker hands the renderer for one job: the ``progress`` and ``should_stop`` callables."""

from __future__ import annotations

import threading
import time
from typing import Protocol

from daemon import resume
from daemon.config import Config
from daemon.db_liveness import Liveness
from daemon.jobs import Job
from daemon.log import get_logger
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.progress import Eta, describe_progress
from daemon.store import Store
from engine.api import Progress

__all__ = ["Monitor", "MonitorHost"]

log = get_logger("infinitetalkd.worker")


class MonitorHost(Protocol):
    """What a monitor reads of its worker (daemon/worker.py), without importing it."""

    config: Config
    store: Store
    worker_id: str
    live: Liveness | None
    metrics: Metrics
    notifier: Notifier
    stop: threading.Event
    queued: int

    def db_note(self) -> str: ...


class Monitor:
    """The two callables handed to the renderer for one job: progress and should_stop.

    Progress pings the watchdog and updates STATUS; at most once a second both callables extend
    the lease, store the progress and read the cancel flag (``infinitetalkd cancel``). A busy
    database only skips that second's update (the heartbeat returns None).
    """

    def __init__(self, worker: MonitorHost, job: Job) -> None:
        self.w = worker
        self.job = job
        self.cancel = job.cancel_requested
        self.lost = False
        self.latest: Progress | None = None
        self.eta = Eta()
        self.eta_s: float | None = None  # seconds left, once the rate of progress is known
        self.chunks = resume.ChunkTracker(worker.store, job, worker.worker_id)
        self._last_db = 0.0
        self._last_status = 0.0

    def progress(self, p: Progress) -> None:
        self.latest = p
        self.chunks.progress(p)
        live = self.w.live
        self.eta_s = self.eta.update(p)
        self.w.metrics.set_running(p.fraction, self.eta_s)
        self.w.notifier.watchdog()
        now = time.monotonic()
        if now - self._last_status >= 0.5:
            self._last_status = now
            self.w.notifier.status(f"job {self.job.id} {self.job.stem}: {describe_progress(p, self.eta_s)}; "
                                   f"queued {self.w.queued}{self.w.db_note()}")
        if live is not None:  # the side thread stores it; this thread never waits for the database
            live.progress(p.fraction, describe_progress(p, self.eta_s))
            return
        self._sync(now)

    def should_stop(self) -> bool:
        if self.w.stop.is_set():
            return True
        live = self.w.live
        if live is not None:
            self.cancel = self.cancel or live.cancel_requested
            self.lost = live.job_lost or live.name_lost
        else:
            self._sync(time.monotonic())
        return self.cancel or self.lost

    def _sync(self, now: float) -> None:
        if now - self._last_db < 1.0:
            return
        self._last_db = now
        p = self.latest
        try:
            state = self.w.store.heartbeat(self.job, self.w.worker_id, self.w.config.jobs.lease_s,
                                           p.fraction if p else 0.0,
                                           describe_progress(p, self.eta_s) if p else "starting")
        except Exception:  # noqa: BLE001 - a heartbeat is best effort; the next one tries again
            log.warning("job.heartbeat_failed", exc_info=True)
            return
        if state is None:
            return  # database busy: try again at the next callback
        owned, cancel = state
        self.lost = not owned
        self.cancel = self.cancel or cancel
