"""The worker: claim one job at a time, render it from a snapshot of its inputs, publish, record.

    Worker.loop: cancel requests -> pauses (inbox missing, disk full or low) -> claim -> run_job
    Worker.run_job: snapshot + the single per-job try/except (in _attempt), then _finalize moves
      files (daemon/files.py) and writes the outcome to the database.

Faults: DeviceFault (sticky CUDA error) requeues the job with its attempt used and the process
exits with EXIT_DEVICE_FAULT so systemd starts a clean one; OutOfMemory fails the job and the loop
goes on. A full or failing disk (a render, a log, the archive or failed/) requeues the job with its
attempt refunded and its inputs where they are, and the worker pauses claiming until the outbox
has space again; a missing inbox requeues the same way and pauses until the inbox is back. A busy
or locked database is waited out (daemon/patience.py), never fatal.

Stopping: SIGTERM/SIGINT set a flag that ``should_stop`` reports to the renderer, which stops at
the next step; the job is requeued with its attempt refunded and the process exits 0.

The systemd watchdog is fed only by progress: a render step, or an idle loop pass while the
scanner thread is alive and cycling.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import structlog

from daemon import files as fl
from daemon import inbox as ib
from daemon import outbox as ob
from daemon import resume, statefiles
from daemon.config import Config
from daemon.db_liveness import Liveness
from daemon.jobs import Job, JobStatus
from daemon.log import get_logger, job_log
from daemon.metrics import Metrics
from daemon.monitor import Monitor
from daemon.notify import Notifier
from daemon.patience import Stopped, patiently
from daemon.pause import DiskPause
from daemon.results import result_doc, run_key
from daemon.snapshot import InboxGone, InputsChanged, InputsGone, reprepare, source_dir
from daemon.store import StaleJob, Store
from engine.api import (
    DeviceFault,
    InputError,
    OutOfMemory,
    Renderer,
    RenderError,
    RenderResult,
    RenderStopped,
)

__all__ = ["Worker", "EXIT_OK", "EXIT_FAILURE", "EXIT_DEVICE_FAULT", "job_log_path", "DiskPause"]

log = get_logger("infinitetalkd.worker")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_DEVICE_FAULT = 75  # EX_TEMPFAIL: the device context is poisoned; systemd restarts the service

OutcomeKind = Literal["done", "failed", "disk_full", "cancelled", "superseded", "stopped", "device_fault", "lost",
                      "inbox_gone"]
T = TypeVar("T")


class ScannerView(Protocol):
    """What the worker needs of the scanner (daemon/watcher.py), without importing it."""

    @property
    def inbox_missing(self) -> bool: ...

    def alive(self) -> bool: ...


def job_log_path(config: Config, job_id: int) -> Path:
    """A job's log, appended to by every attempt; published as outbox/<stem>.log or copied to failed/."""
    return config.paths.state / "joblogs" / f"{job_id}.log"


@dataclass
class _Outcome:
    kind: OutcomeKind
    reason: str = ""
    failure: str = ""  # metrics label: input, render, oom, device, disk, internal
    doc: dict[str, Any] | None = None
    base: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    already_published: bool = False
    chunks_rendered: int | None = None


class Worker:
    def __init__(self, config: Config, store: Store, renderer: Renderer, identity: str, *, notifier: Notifier,
                 metrics: Metrics, stop: threading.Event, wake: threading.Event, files_lock: threading.Lock,
                 scanner: ScannerView | None = None, name: str | None = None, live: Liveness | None = None,
                 tmp_root: Path | None = None) -> None:
        """``name``: the worker name in the database (default ``<host>:<pid>``); ``live``: the side
        thread keeping the worker, its job's lease and the ingest lease alive (None: heartbeats
        from the render thread, one daemon alone); ``tmp_root``: this worker's work folders."""
        self.config = config
        self.store = store
        self.renderer = renderer
        self.identity = identity
        self.notifier = notifier
        self.metrics = metrics
        self.stop = stop
        self.wake = wake
        self.files_lock = files_lock
        self.scanner = scanner
        self.worker_id = name or f"{socket.gethostname()}:{os.getpid()}"
        self.live = live
        self.tmp_root = tmp_root or config.paths.tmp
        self.queued = 0
        self._low_disk = False
        self.disk = DiskPause()
        self.paused = ""
        self._paused_db = ""  # what the worker's database row says
        self._swept = 0.0  # time.monotonic() of the last sweep of kept checkpoints
        self._unmoved: dict[int, Job] = {}  # cancelled here; inputs not yet in failed/ (a full disk)
        self.limits = ib.Limits(
            max_input_bytes=config.jobs.max_input_mb * 2**20,
            max_sidecar_bytes=config.jobs.max_sidecar_kb * 1024,
            max_image_pixels=config.jobs.max_image_pixels,
        )

    def _db(self, call: Callable[[], T], what: str) -> T:
        return patiently(call, what, stop=self.stop)

    def db_note(self) -> str:
        """A clause for STATUS= while the database cannot be reached."""
        live = self.live
        if live is None or live.database_ok:
            return ""
        return f"; the job database is unreachable ({live.database_error})"

    def _leading(self) -> bool:
        return self.live is None or (self.live.leader and self.live.database_ok)

    # -- the loop -----------------------------------------------------------------------------

    def loop(self) -> int:
        """Claim and render until stopped. Returns the process exit code."""
        try:
            while not self.stop.is_set():
                kind = self._once()
                if kind == "device_fault":
                    self.notifier.status("device fault: exiting so that systemd starts a clean process")
                    return EXIT_DEVICE_FAULT
                if kind == "stopped":
                    break
        except Stopped:
            pass  # asked to stop while the database was busy
        return EXIT_OK

    def _once(self) -> OutcomeKind | None:
        poll = self.config.watch.poll_interval_s
        live = self.live
        if live is not None and live.name_lost:
            log.error("worker.name_lost", worker=self.worker_id,
                      reason="another process registered this worker name; stopping")
            return "stopped"
        if live is not None and not live.database_ok:
            # Nothing new is claimed or ingested while the database is down; the side thread
            # keeps trying and says when it is back.
            self._set_paused(f"the job database is unreachable: {live.database_error}")
            self._idle(f"paused: the job database is unreachable ({live.database_error}); retrying", poll)
            return None
        if self._leading():
            self._cancel_requested_jobs()
            self._sweep_checkpoints()
        counts = self._db(self.store.counts, "counting jobs")
        self.queued = counts[JobStatus.QUEUED.value]
        self.metrics.set_counts(counts)
        pause = self._pause_reason()
        self._set_paused(pause)
        if pause:
            self._idle(f"paused: {pause}; queued {self.queued}", poll)
            return None
        # Only jobs of this worker's recipe: another engine would compute another fingerprint (docs/daemon.md §4.9).
        job = self._db(lambda: self.store.claim(self.worker_id, self.config.jobs.lease_s, identities={self.identity}),
                       "claiming a job")
        if job is None:
            self._idle(f"idle; queued {self.queued}" + (", none of them of this worker's recipe (infinitetalkd doctor)"
                                                       if self.queued else ""), poll)
            return None
        if live is not None:
            live.track(job)
        try:
            return self.run_job(job)
        finally:
            if live is not None:
                live.track(None)

    def _pause_reason(self) -> str:
        inbox = self.config.paths.inbox
        if (self.scanner is not None and self.scanner.inbox_missing) or not inbox.is_dir():
            return f"the inbox {inbox} is missing (not mounted?); jobs wait until it is back"
        return self._disk_pause()

    def _set_paused(self, reason: str) -> None:
        """Why the worker does not claim, for `infinitetalkd status`: in its row of the job database (seen
        from any host) and in state/worker.json."""
        live = self.live
        if live is not None and live.database_ok and reason != self._paused_db:
            try:
                self.store.set_worker_paused(live.name, live.token, reason)
                self._paused_db = reason
            except Exception as exc:  # noqa: BLE001 - only a status line: tried again at the next pass
                log.warning("worker.paused_not_recorded", error=str(exc))
        if reason == self.paused:
            return
        self.paused = reason
        if reason:
            log.warning("worker.paused", reason=reason)
        else:
            log.info("worker.resumed")
        statefiles.write(self.config.paths.state, statefiles.WORKER, {"paused": reason, "since": time.time()})

    def _idle(self, status: str, timeout: float) -> None:
        if self.scanner is None or self.scanner.alive():
            self.notifier.watchdog()  # the loop and the scanner both made progress
        self.notifier.status(status)
        self.wake.wait(timeout)
        self.wake.clear()

    def _free(self) -> int:
        try:
            return shutil.disk_usage(self.config.paths.outbox).free
        except OSError:
            return 0

    def _disk_pause(self) -> str:
        """Why the outbox's disk keeps the worker from claiming, or "" when it does not."""
        need = self.config.jobs.min_free_mb * 2**20
        free = self._free()
        reason = ""
        if free < need:
            reason = (f"less than jobs.min_free_mb = {self.config.jobs.min_free_mb} MiB free in "
                      f"{self.config.paths.outbox}; jobs wait until space is freed")
        elif self.disk.blocks(free):
            reason = (f"a job hit a full or failing disk ({self.disk.reason}); jobs wait for free space in "
                      f"{self.config.paths.outbox}")
        low = bool(reason)
        if low and not self._low_disk:
            log.warning("disk.low", free_mib=free // 2**20, min_free_mb=self.config.jobs.min_free_mb,
                        path=str(self.config.paths.outbox), hint="jobs stay queued until space is freed")
        elif not low and self._low_disk:
            log.info("disk.ok", free_mib=free // 2**20)
        self._low_disk = low
        return reason

    def _sweep_checkpoints(self) -> None:
        """The ingest leader removes checkpoints nobody holds any more (daemon/resume.py), once a minute."""
        if time.monotonic() - self._swept < 60.0 and self._swept:
            return
        self._swept = time.monotonic()
        try:
            removed = resume.sweep(self.config, self.store)
        except Exception as exc:  # noqa: BLE001 - a database hiccup: the next sweep
            log.warning("checkpoints.sweep_failed", error=str(exc))
            return
        if removed:
            log.info("checkpoints.swept", job_ids=removed)

    def _cancel_requested_jobs(self) -> None:
        # Database first (docs/daemon.md §4.6): only the process whose row update wins moves the
        # files, so a cut-off former ingest leader holding a stale list moves nothing.
        reason = "cancelled by user (infinitetalkd cancel) before it started"
        for job in self._db(self.store.cancel_requests, "reading cancel requests"):
            with self.files_lock:
                if self._db(lambda j=job: self.store.cancel_queued(j, error=reason, failed_dir=None),  # type: ignore[misc]
                            "cancelling a queued job") is not None:
                    self._unmoved[job.id] = job
        for job in list(self._unmoved.values()):
            with structlog.contextvars.bound_contextvars(job_id=job.id, stem=job.stem), self.files_lock:
                try:
                    dest = fl.to_failed(self.config.paths.failed, job.stem, job.id, source_dir(self.config, job),
                                        job.inputs, reason, settled_in=self.config.paths.settled)
                except OSError as exc:
                    log.error("job.cancel_move_failed", error=str(exc), hint="tried again at the next pass")
                    continue
                del self._unmoved[job.id]
                self._db(lambda j=job.id, d=str(dest): self.store.set_failed_dir(j, d),  # type: ignore[misc]
                         "recording a cancelled job")
                log.info("job.cancelled", reason=reason, failed_dir=str(dest))
                self._ended(job)  # an earlier, requeued attempt may have left checkpoints

    # -- one job ------------------------------------------------------------------------------

    def run_job(self, job: Job) -> OutcomeKind:
        log_path = job_log_path(self.config, job.id)
        with structlog.contextvars.bound_contextvars(job_id=job.id, stem=job.stem):
            # One folder per attempt: a takeover by another worker never shares a folder.
            tmp = self.tmp_root / f"{job.id}-{job.attempts}"
            try:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = ob.fresh_tmp_dir(self.tmp_root, f"{job.id}-{job.attempts}")
            except OSError as exc:
                outcome = _Outcome("disk_full", failure="disk",
                                   reason=f"disk full or failing: cannot prepare the job's work folder: {exc}")
            else:
                with job_log(log_path, job.id, engine_lines=True):
                    try:
                        outcome = self._attempt(job, tmp)
                    finally:
                        self.metrics.set_running(0.0, None)
            try:
                self._finalize(job, log_path, tmp, outcome)
            except StaleJob as exc:
                log.error("job.stale", error=str(exc))
            except Stopped:
                raise  # shutting down while the database is busy: recovery at the next start requeues it
            except Exception as exc:  # a bug while finishing must not stop the daemon or strand the job
                log.exception("job.finalize_failed")
                with contextlib.suppress(Exception):
                    self.store.requeue(job, self.worker_id, refund=False,
                                       error=f"internal error while finishing: {type(exc).__name__}: {exc}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.tmp_root.rmdir()  # only when empty: leave no trace in outbox/.tmp when idle
        return outcome.kind

    def _attempt(self, job: Job, tmp: Path) -> _Outcome:
        """Everything that can fail for one job, behind the one catch-all of the worker."""
        started = time.time()
        log.info("job.started", attempt=job.attempts, max_attempts=job.max_attempts,
                 waited_s=round(started - job.created_at, 3))
        monitor = Monitor(self, job)

        def failed(kind: OutcomeKind, reason: str, failure: str) -> _Outcome:
            log.warning("job.finished", outcome=kind, reason=reason, failure=failure,
                        seconds=round(time.time() - started, 3))
            return _Outcome(kind, reason=reason, failure=failure)

        try:
            # An earlier attempt published this run and died before recording it: finish it off.
            if (found := self._found_published(job)) is not None:
                return found
            prepared = reprepare(self.config, job, tmp / "inputs", identity=self.identity, limits=self.limits,
                                 fingerprint=self._source_fingerprint(job))
            mp4 = tmp / ob.fit_name(job.stem, ".mp4")
            try:  # resumable: checkpoints on the outbox's filesystem (docs/daemon.md §4.8)
                result = self.renderer.render(prepared.request, mp4, monitor.progress, monitor.should_stop,
                                              **resume.render_options(self.config, job))
            finally:
                monitor.chunks.close()
            monitor.chunks.settle(result.chunks_rendered, result.resumed_from_chunk)
            if not mp4.is_file() or mp4.stat().st_size == 0:
                raise RenderError("the renderer returned without writing the video")
            if not all(fl.same_file(tmp / "inputs" / str(i["name"]), i) for i in prepared.inputs):
                raise InputsChanged("an input file was changed in place during the render; "
                                     "the current files are scanned as a new job")
            return self._publishable(job, prepared, result, monitor, tmp, mp4, time.time() - started)
        except RenderStopped:
            if self.stop.is_set():
                log.info("job.interrupted", reason="shutdown requested; the job goes back to the queue")
                return _Outcome("stopped")
            if monitor.lost:
                log.error("job.lost", reason="the job was taken from this worker (lease lost)")
                return _Outcome("lost")
            if monitor.cancel:
                return failed("cancelled", "cancelled by user (infinitetalkd cancel)", "cancelled")
            return failed("failed", "the renderer stopped without being asked to", "render")
        except DeviceFault as exc:
            log.error("job.device_fault", error=ib.one_line(str(exc)))
            return _Outcome("device_fault", reason=f"device fault: {ib.one_line(str(exc))}", failure="device")
        except OutOfMemory as exc:
            gc.collect()  # the engine freed its caches; drop our references too
            return failed("failed", f"out of memory: {ib.one_line(str(exc))}", "oom")
        except InputError as exc:
            return failed("failed", ib.one_line(str(exc)), "input")
        except InboxGone as exc:
            return failed("inbox_gone", f"{exc}; the job waits until it is back", "")
        except InputsGone as exc:
            return failed("failed", str(exc), "input")
        except InputsChanged as exc:
            return failed("superseded", str(exc), "superseded")
        except Exception as exc:  # the one catch-all: any other failure ends this job, not the daemon
            if fl.is_storage_fault(exc):
                return failed("disk_full", f"disk full or failing: {ib.one_line(str(exc))}", "disk")
            if isinstance(exc, RenderError):
                return failed("failed", f"render failed: {ib.one_line(str(exc))}", "render")
            log.exception("job.internal_error")
            return failed("failed", f"internal error: {type(exc).__name__}: {ib.one_line(str(exc))}", "internal")

    def _found_published(self, job: Job) -> _Outcome | None:
        """This run's complete result set already in the outbox (published by an earlier attempt or a
        former holder), as the outcome to record; None when there is none."""
        published = ob.find_published(self.config.paths.outbox, job.stem, job.id, run_key(job))
        if published is None:
            return None
        log.info("job.already_published", outputs=published.get("outputs"))
        return _Outcome("done", doc=published, already_published=True)

    def _publishable(self, job: Job, prepared: ib.Prepared, result: RenderResult, monitor: Monitor, tmp: Path,
                     mp4: Path, render_s: float) -> _Outcome:
        """A finished render, unless the job is no longer this worker's: its output name reserved and
        its result JSON written, ready to publish."""
        if monitor.lost:
            log.error("job.lost", reason="the job was taken from this worker (lease lost); result discarded")
            return _Outcome("lost")
        # A former holder stopped past its lease after its last ownership check may have
        # published meanwhile: its complete set stands, nothing is published twice.
        if (found := self._found_published(job)) is not None:
            return found
        base = self._reserve_base(job)
        if base is None:
            log.error("job.lost", reason="the job was taken from this worker (lease lost); result discarded")
            return _Outcome("lost")
        doc = result_doc(job, prepared, result, base, render_s, self.identity, chunks_rendered=monitor.chunks.total,
                         resumed_from_chunk=monitor.chunks.resumed_from)
        json_path = tmp / ob.fit_name(job.stem, ".json")
        ob.write_json(json_path, doc)
        # The canonical line of a job: everything needed to grep for outcomes and speed.
        log.info("job.finished", outcome="done", render_s=round(render_s, 3), frames=result.frames,
                 duration_s=result.duration_s, width=result.width, height=result.height,
                 chunks=result.chunks, seed=result.seed, output=f"{base}.mp4",
                 chunks_rendered=monitor.chunks.total, resumed_from_chunk=monitor.chunks.resumed_from)
        return _Outcome("done", doc=doc, base=base, files={"mp4": mp4, "json": json_path},
                        chunks_rendered=monitor.chunks.total)

    def _reserve_base(self, job: Job) -> str | None:
        """A free output base name, reserved for this job in the database (unique across the
        fleet's workers publishing to one outbox). None if the job is no longer ours."""
        refused: set[str] = set()
        while True:
            base = ob.choose_base(self.config.paths.outbox, job.stem, job.id, exclude=refused)
            if self._db(lambda b=base: self.store.reserve_output(b, job, self.worker_id),  # type: ignore[misc]
                        "reserving an output name"):
                return base
            if not self._db(lambda: self.store.holds(job, self.worker_id), "checking the claim"):
                return None
            refused.add(base)

    def _finish(self, job: Job, status: JobStatus, what: str, **fields: Any) -> None:
        """Record the outcome; a retried completion whose first try committed (the reply was lost
        in an outage) is recognised, any other StaleJob propagates."""
        try:
            self._db(lambda: self.store.finish(job, self.worker_id, status, **fields), what)
        except StaleJob:
            if self._db(lambda: self.store.completed(job, self.worker_id), "checking a completion") is None:
                raise

    # -- recording the outcome ----------------------------------------------------------------

    def _finalize(self, job: Job, log_path: Path, tmp: Path, out: _Outcome) -> None:
        """Move files and record the outcome. Runs after the job's log file was closed."""
        if out.kind == "done":
            self._finish_done(job, log_path, tmp, out)
        elif out.kind in ("failed", "cancelled") or (out.kind == "device_fault" and job.attempts >= job.max_attempts):
            self._finish_failed(job, log_path, tmp, out)
        elif out.kind == "device_fault":
            self._db(lambda: self.store.requeue(job, self.worker_id, refund=False, error=out.reason), "requeueing")
            log.error("job.requeued", reason=out.reason, attempt=job.attempts, max_attempts=job.max_attempts)
            self.metrics.failures.labels(kind="device").inc()
        elif out.kind == "disk_full":
            self._requeue_for_space(job, out.reason)
        elif out.kind == "inbox_gone":
            self._db(lambda: self.store.requeue(job, self.worker_id, refund=True, error=out.reason), "requeueing")
            log.warning("job.requeued", reason=out.reason, attempt_refunded=True)
        elif out.kind == "superseded":
            self._finish(job, JobStatus.CANCELLED, "recording a superseded job", error=out.reason)
            log.info("job.superseded", reason=out.reason)
            self._ended(job)
        elif out.kind == "stopped":
            with contextlib.suppress(Stopped):  # if the database stays busy, recovery at start requeues it
                self._db(lambda: self.store.requeue(job, self.worker_id, refund=True), "requeueing")
            log.info("job.requeued", reason="shutdown", attempt_refunded=True)
        if out.kind in ("failed", "cancelled", "superseded", "disk_full"):
            # (not after a lost lease: the worker that holds the job now may be publishing it)
            ob.remove_partial(self.config.paths.outbox, job.stem, job.id)

    def _finish_done(self, job: Job, log_path: Path, tmp: Path, out: _Outcome) -> None:
        cfg = self.config
        doc = out.doc
        assert doc is not None
        with self.files_lock:
            try:
                # Publish, move the inputs away, then record: "done" in the database means finished.
                # Ownership confirmed right before the renames (or the move of the inputs of a result
                # found published): a worker that lost its lease (paused, cut off) discards its
                # result and moves nothing; the new holder publishes.
                if not self._db(lambda: self.store.holds(job, self.worker_id), "checking the claim"):
                    log.error("job.lost", reason="the job was taken from this worker before publishing; "
                              "result discarded")
                    return
                if not out.already_published:
                    files = dict(out.files)
                    if log_path.exists():
                        files["log"] = tmp / ob.fit_name(job.stem, ".log")
                        shutil.copyfile(log_path, files["log"])
                    ob.publish(tmp, cfg.paths.outbox, out.base, files)
            except OSError as exc:  # any: a fault of the outbox's storage, not of this job
                ob.remove_partial(cfg.paths.outbox, job.stem, job.id)
                self._requeue_for_space(job, f"disk full or failing while publishing: {ib.one_line(str(exc))}")
                return
            try:
                if job.inputs_dir:  # a redo's own copy: the originals stay in the archive
                    where = "the redo's copy removed; the originals stay in the archive"
                else:
                    # A result found published is an earlier attempt's: the inputs it archived are gone
                    # from the inbox, and this attempt's snapshot of them must not be archived again.
                    snap = None if out.already_published else tmp / "inputs"
                    where = fl.dispose_after_success(cfg.paths.inbox, job.inputs, snap,
                                                     after_success=cfg.jobs.after_success,
                                                     archive_root=cfg.paths.archive, stem=job.stem, job_id=job.id,
                                                     settled_in=cfg.paths.settled)
            except OSError as exc:
                # Published: the job is done. The inputs stay in the inbox, where the scanner sees
                # the files of a finished job and archives them once it can.
                where = f"left in the inbox ({ib.one_line(str(exc))}); archived later"
                log.warning("job.archive_failed", error=str(exc))
            self._finish(job, JobStatus.DONE, "recording a finished job", outputs=dict(doc["outputs"]),
                         timings=dict(doc["timings"]), chunks_rendered=out.chunks_rendered)
        _unlink_quietly(log_path)
        self._ended(job, published=True)
        self.disk.succeeded()
        log.info("job.done", outputs=doc["outputs"], inputs=where)
        self.metrics.render_seconds.observe(float(doc["timings"].get("render_s", 0.0)))
        self.metrics.last_success.set(time.time())

    def _finish_failed(self, job: Job, log_path: Path, tmp: Path, out: _Outcome) -> None:
        cfg = self.config
        reason = out.reason
        if out.kind == "device_fault":
            reason += f" (attempt {job.attempts} of {job.max_attempts}; giving up)"
        status = JobStatus.CANCELLED if out.kind == "cancelled" else JobStatus.FAILED
        with self.files_lock:
            if not self._db(lambda: self.store.holds(job, self.worker_id), "checking the claim"):
                # (as before publishing: the holder now may be rendering from these very inputs)
                log.error("job.lost", reason=f"the job was taken from this worker; its failure ({reason}) "
                          "is not recorded and its inputs stay")
                return
            try:
                dest = fl.to_failed(cfg.paths.failed, job.stem, job.id, source_dir(cfg, job), job.inputs, reason,
                                    settled_in=cfg.paths.settled, snap=tmp / "inputs", log_file=log_path)
            except OSError as exc:
                # failed/ cannot be written: keep everything where it is and try the job again later.
                self._requeue_for_space(job, f"{reason} (and failed/ cannot be written: {ib.one_line(str(exc))})")
                return
            self._finish(job, status, "recording a failed job", error=reason, failed_dir=str(dest))
        _unlink_quietly(log_path)
        self._ended(job)
        log.warning(f"job.{status.value}", reason=reason, failed_dir=str(dest))
        if status is JobStatus.FAILED:
            self.metrics.failures.labels(kind=out.failure).inc()

    def _requeue_for_space(self, job: Job, reason: str) -> None:
        """The disk is full or failing: the job goes back to the queue with its attempt refunded,
        its inputs where they are, and the worker pauses claiming (DiskPause)."""
        self.disk.hit(self._free(), reason)
        self._db(lambda: self.store.requeue(job, self.worker_id, refund=True, error=reason), "requeueing")
        log.error("job.requeued", reason=reason, attempt_refunded=True,
                  hint="the worker waits for free space in the outbox, then renders it again")
        self.metrics.failures.labels(kind="disk").inc()


    def _source_fingerprint(self, job: Job) -> str:
        """What the job's inputs must hash to: its own fingerprint, or for a redo its original's."""
        if job.redo_of is None:
            return job.fingerprint
        original = self._db(lambda: self.store.get(job.redo_of or 0), "reading the redo's original")
        if original is None:
            raise InputError(f"job #{job.redo_of}, which this job re-renders, is no longer in the job database")
        return original.fingerprint

    def _ended(self, job: Job, *, published: bool = False) -> None:
        """The job ended here (this worker recorded it): its checkpoints go, unless it was published and
        jobs.keep_checkpoints_h keeps them (docs/daemon.md §4.8); a redo's inputs folder goes too (after
        a failure only once empty: its files moved to failed/)."""
        if not (published and resume.keep_after(self.config, "done")):
            resume.remove(self.config, job.id)
        if job.inputs_dir:
            with contextlib.suppress(OSError):
                if published:
                    shutil.rmtree(job.inputs_dir)
                else:
                    Path(job.inputs_dir).rmdir()


def _unlink_quietly(path: Path) -> None:
    """Remove a job log that was published or copied (an error leaves a stray file, nothing worse)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
