"""A worker's liveness in the job database, kept by a side thread (never the render thread).

Every ``interval_s`` the thread of :class:`Liveness`:
- marks the worker row alive (:meth:`daemon.store.Store.worker_heartbeat`);
- extends the lease of the job the render thread is working on and stores its latest progress
  (:meth:`daemon.store.Store.heartbeat`); the render thread only hands over numbers (:meth:`Liveness.progress`),
  so a slow, locked or absent database never stalls a render;
- with ``ingest=True``, takes or renews the ingest lease (:data:`daemon.store_fleet.INGEST_LEASE`): the one
  process of the fleet that scans the inbox, rejects, cancels queued jobs and sweeps is its holder.

What it learns is read by the worker loop from plain attributes: ``cancel_requested``, ``job_lost`` (the
lease went to another worker: discard the result), ``name_lost`` (another process took this worker's
name: stop), ``leader`` (this process holds the ingest lease now), ``database_ok`` / ``database_error``.
Database errors are recorded, never raised: an outage is a state, not a crash (docs/daemon.md §4).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from daemon.db import is_transient
from daemon.jobs import Job
from daemon.store_fleet import INGEST_LEASE, Lease

if TYPE_CHECKING:
    from daemon.store import Store

__all__ = ["Liveness"]

log = logging.getLogger("infinitetalkd.liveness")


class Liveness:
    def __init__(self, store: Store, name: str, token: str, *, lease_s: float, interval_s: float,
                 ingest: bool = False) -> None:
        if interval_s * 2 > lease_s:
            raise ValueError(f"a lease of {lease_s:g} s needs heartbeats at least twice as often "
                             f"(interval {interval_s:g} s)")
        self.store, self.name, self.token = store, name, token
        self.lease_s, self.interval_s, self.ingest = lease_s, interval_s, ingest
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._progress: tuple[float, str] = (0.0, "")
        self._lease: Lease | None = None
        self._lease_deadline = 0.0  # time.monotonic() by which the lease runs out unless renewed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"liveness {name}", daemon=True)
        self.cancel_requested = False
        self.job_lost = False
        self.name_lost = False
        self.database_ok = True
        self.database_error: str | None = None
        self.down_since: float | None = None  # time.monotonic() of the first failure of an outage
        self.beats = 0  # completed rounds (tests and the watchdog read it)

    # -- called by the worker ------------------------------------------------------------------

    def start(self) -> Liveness:
        self._thread.start()
        return self

    def track(self, job: Job | None) -> None:
        """The job the render thread now holds (None: idle). Resets the per-job flags."""
        with self._lock:
            self._job = job
            self._progress = (0.0, "")
            self.cancel_requested = False
            self.job_lost = False

    def progress(self, value: float, text: str) -> None:
        """Latest progress of the tracked job; stored at the next heartbeat."""
        with self._lock:
            self._progress = (value, text)

    @property
    def leader(self) -> bool:
        """Holds the ingest lease now: taken or renewed less than ``lease_s`` ago (measured on this
        process's monotonic clock from before the database call, so never longer than the database's)."""
        return self._lease is not None and time.monotonic() < self._lease_deadline

    @property
    def lease(self) -> Lease | None:
        return self._lease

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, give the ingest lease up and mark the worker stopped (best effort: the
        database may be gone; the lease and the name then expire by themselves)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            if self._lease is not None:
                self.store.release_lease(INGEST_LEASE, self.name)
                self._lease = None
            self.store.stop_worker(self.name, self.token)
        except Exception as exc:  # noqa: BLE001 - shutting down: report, never raise
            log.warning("liveness: could not sign off: %s", exc)

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval_s)

    def beat(self) -> None:
        """One round (the thread calls it; public for tests and for a last beat before exiting)."""
        try:
            if not self.store.worker_heartbeat(self.name, self.token, self._job.id if self._job else None):
                self.name_lost = True
            self._beat_job()
            if self.ingest:
                self._beat_lease()
        except Exception as exc:  # noqa: BLE001 - an outage is a state to report, not a crash
            self._failed(exc)
        else:
            if not self.database_ok:
                log.warning("liveness: database reachable again after %.0f s",
                            time.monotonic() - (self.down_since or time.monotonic()))
            self.database_ok, self.database_error, self.down_since = True, None, None
        self.beats += 1

    def _beat_job(self) -> None:
        with self._lock:
            job, (value, text) = self._job, self._progress
        if job is None or self.job_lost:
            return
        state = self.store.heartbeat(job, self.name, self.lease_s, value, text)
        if state is None:
            raise TimeoutError("the job heartbeat could not reach the database in time")
        ours, cancel = state
        with self._lock:
            if self._job is job:  # the render thread may have moved on meanwhile
                self.job_lost = not ours
                self.cancel_requested = self.cancel_requested or cancel

    def _beat_lease(self) -> None:
        t0 = time.monotonic()
        lease = self._lease
        if lease is not None:
            lease = self.store.renew_lease(lease, self.lease_s)
            if lease is None:
                log.warning("liveness: lost the ingest lease")
        if lease is None:
            lease = self.store.acquire_lease(INGEST_LEASE, self.name, self.lease_s)
            if lease is not None:
                log.info("liveness: now the ingest leader (epoch %d)", lease.epoch)
        self._lease, self._lease_deadline = lease, t0 + self.lease_s

    def _failed(self, exc: BaseException) -> None:
        if self.database_ok:
            self.down_since = time.monotonic()
            log.warning("liveness: database unreachable (%s): %s",
                        "transient" if is_transient(exc) else "unexpected", exc)
        self.database_ok = False
        self.database_error = f"{type(exc).__name__}: {str(getattr(exc, 'orig', None) or exc).strip()[:200]}"
        # A leader that cannot renew must assume its lease runs out: stop leading now, so that a
        # cut-off former leader moves nothing on the share (a sibling may take over after the ttl).
        self._lease = None
