"""The daemon's main thread: load the engine once, claim one job at a time, render, publish.

    run_daemon: directories, lock, database, crash recovery -> engine load + warm-up -> READY
      -> loop: cancel requests -> free-space gate -> claim -> Worker.run_job -> ...
    Worker.run_job: the single per-job try/except (in _attempt), then _finalize moves files and
      writes the outcome to the database.

Faults (issue item 6): DeviceFault (sticky CUDA error) requeues the job with its attempt used and
the process exits with EXIT_DEVICE_FAULT so systemd starts a clean one; OutOfMemory fails the job
and the loop goes on; a full disk fails the job and leaves its inputs in the inbox.

Stopping: SIGTERM/SIGINT set a flag that ``should_stop`` reports to the renderer, which stops at
the next step; the job is requeued with its attempt refunded and the process exits 0. A second
signal exits at once (the job is then requeued at the next start by crash recovery).

The systemd watchdog is fed only by progress: a render step, or an idle loop pass while the
scanner thread is alive and cycling.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import platform
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import structlog

from daemon import inbox as ib
from daemon import outbox as ob
from daemon.config import EX_CONFIG, Config
from daemon.jobs import Job, JobStatus
from daemon.log import get_logger, job_log, setup_logging
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.progress import Eta, describe_progress
from daemon.store import StaleJob, Store, StoreError
from daemon.watcher import Scanner, dispose_inputs, filesystem_type, is_network_fs
from engine.api import (
    DeviceFault,
    EngineOptions,
    InputError,
    OutOfMemory,
    Progress,
    Renderer,
    RenderError,
    RenderResult,
    RenderStopped,
)

__all__ = ["run_daemon", "Worker", "RendererFactory", "EXIT_OK", "EXIT_FAILURE", "EXIT_DEVICE_FAULT",
           "move_to_failed"]

log = get_logger("infinitetalkd.worker")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_DEVICE_FAULT = 75  # EX_TEMPFAIL: the device context is poisoned; systemd restarts the service

RendererFactory = Callable[[EngineOptions], Renderer]
OutcomeKind = Literal["done", "failed", "disk_full", "cancelled", "superseded", "stopped", "device_fault", "lost"]


def _version() -> str:
    try:
        return metadata.version("infinitetalkd")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _is_enospc(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # follow "raise ... from" chains a little way
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _run_key(job: Job) -> str:
    """Names one queueing of a job (a re-render after redo_finished: render is a new run)."""
    return f"{job.id}:{job.created_at!r}"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def move_to_failed(config: Config, job: Job, reason: str, log_file: Path | None = None) -> Path:
    """failed/<stem>/: the job's inputs still in the inbox, error.txt (one line) and the job log."""
    dest = ob.unique_dir(config.paths.failed, job.stem, job.id)
    ob.move_files([config.paths.inbox / str(i["name"]) for i in job.inputs], dest)
    ob.write_error(dest, reason)
    if log_file is not None and log_file.exists():
        shutil.move(str(log_file), str(dest / f"{job.stem}.log"))
    return dest


class _InputsGone(Exception):
    pass


class _InputsChanged(Exception):
    pass


@dataclass
class _Outcome:
    kind: OutcomeKind
    reason: str = ""
    failure: str = ""  # metrics label: input, render, oom, device, disk, internal
    doc: dict[str, Any] | None = None
    base: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    already_published: bool = False


class _Monitor:
    """The two callables handed to the renderer for one job: progress and should_stop.

    Progress pings the watchdog and updates STATUS; at most once a second both callables extend
    the lease, store the progress and read the cancel flag (``infinitetalkd cancel``).
    """

    def __init__(self, worker: Worker, job: Job) -> None:
        self.w = worker
        self.job = job
        self.cancel = job.cancel_requested
        self.lost = False
        self.latest: Progress | None = None
        self.eta = Eta()
        self.eta_s: float | None = None  # seconds left, once the rate of progress is known
        self._last_db = 0.0
        self._last_status = 0.0

    def progress(self, p: Progress) -> None:
        self.latest = p
        self.eta_s = self.eta.update(p)
        self.w.metrics.set_running(p.fraction, self.eta_s)
        self.w.notifier.watchdog()
        now = time.monotonic()
        if now - self._last_status >= 0.5:
            self._last_status = now
            self.w.notifier.status(f"job {self.job.id} {self.job.stem}: {describe_progress(p, self.eta_s)}; "
                                   f"queued {self.w.queued}")
        self._sync(now)

    def should_stop(self) -> bool:
        if self.w.stop.is_set():
            return True
        self._sync(time.monotonic())
        return self.cancel or self.lost

    def _sync(self, now: float) -> None:
        if now - self._last_db < 1.0:
            return
        self._last_db = now
        p = self.latest
        state = self.w.store.heartbeat(self.job, self.w.worker_id, self.w.config.jobs.lease_s,
                                       p.fraction if p else 0.0,
                                       describe_progress(p, self.eta_s) if p else "starting")
        if state is None:
            return  # database busy: try again at the next callback
        owned, cancel = state
        self.lost = not owned
        self.cancel = self.cancel or cancel


class Worker:
    def __init__(self, config: Config, store: Store, renderer: Renderer, identity: str, *, notifier: Notifier,
                 metrics: Metrics, stop: threading.Event, wake: threading.Event, files_lock: threading.Lock,
                 scanner: Scanner | None = None) -> None:
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
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.queued = 0
        self._low_disk = False
        self.limits = ib.Limits(
            max_input_bytes=config.jobs.max_input_mb * 2**20,
            max_sidecar_bytes=config.jobs.max_sidecar_kb * 1024,
            max_image_pixels=config.jobs.max_image_pixels,
        )

    # -- the loop -----------------------------------------------------------------------------

    def loop(self) -> int:
        """Claim and render until stopped. Returns the process exit code."""
        poll = self.config.watch.poll_interval_s
        while not self.stop.is_set():
            self._cancel_requested_jobs()
            counts = self.store.counts()
            self.queued = counts[JobStatus.QUEUED.value]
            self.metrics.set_counts(counts)
            if not self._enough_disk():
                self._idle(f"waiting: less than jobs.min_free_mb = {self.config.jobs.min_free_mb} MiB free "
                           f"in {self.config.paths.outbox}", poll)
                continue
            job = self.store.claim(self.worker_id, self.config.jobs.lease_s)
            if job is None:
                self._idle(f"idle; queued {self.queued}", poll)
                continue
            kind = self.run_job(job)
            if kind == "device_fault":
                self.notifier.status("device fault: exiting so that systemd starts a clean process")
                return EXIT_DEVICE_FAULT
            if kind == "stopped":
                break
        return EXIT_OK

    def _idle(self, status: str, timeout: float) -> None:
        if self.scanner is None or self.scanner.alive():
            self.notifier.watchdog()  # the loop and the scanner both made progress
        self.notifier.status(status)
        self.wake.wait(timeout)
        self.wake.clear()

    def _enough_disk(self) -> bool:
        need = self.config.jobs.min_free_mb * 2**20
        free = shutil.disk_usage(self.config.paths.outbox).free
        low = free < need
        if low and not self._low_disk:
            log.warning("disk.low", free_mib=free // 2**20, min_free_mb=self.config.jobs.min_free_mb,
                        path=str(self.config.paths.outbox), hint="jobs stay queued until space is freed")
        elif not low and self._low_disk:
            log.info("disk.ok", free_mib=free // 2**20)
        self._low_disk = low
        return not low

    def _cancel_requested_jobs(self) -> None:
        for job in self.store.cancel_requests():
            reason = "cancelled by user (infinitetalkd cancel) before it started"
            with structlog.contextvars.bound_contextvars(job_id=job.id, stem=job.stem), self.files_lock:
                dest = move_to_failed(self.config, job, reason)
                if self.store.cancel_queued(job, error=reason, failed_dir=str(dest)) is not None:
                    log.info("job.cancelled", reason=reason, failed_dir=str(dest))

    # -- one job ------------------------------------------------------------------------------

    def run_job(self, job: Job) -> OutcomeKind:
        tmp = ob.fresh_tmp_dir(self.config.paths.tmp, job.id)
        log_path = tmp / f"{job.stem}.log"
        with structlog.contextvars.bound_contextvars(job_id=job.id, stem=job.stem):
            with job_log(log_path, job.id):
                try:
                    outcome = self._attempt(job, tmp, log_path)
                finally:
                    self.metrics.set_running(0.0, None)
            try:
                self._finalize(job, log_path, outcome)
            except StaleJob as exc:
                log.error("job.stale", error=str(exc))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return outcome.kind

    def _reprepare(self, job: Job) -> ib.Prepared:
        """Validate and hash the inputs again: they sat in the inbox since the scan."""
        inbox = self.config.paths.inbox
        gone = [str(i["name"]) for i in job.inputs if not os.path.lexists(inbox / str(i["name"]))]
        if gone:
            raise _InputsGone(f"input files disappeared from the inbox before the render: {', '.join(gone)}")
        roles = {str(i["role"]): str(i["name"]) for i in job.inputs}
        parts = ib.Parts(image=roles.get("image"), video=roles.get("video"), audio=roles.get("audio"),
                         sidecar=roles.get("sidecar"), marker=roles.get("marker"), problem=None, missing=())
        prepared = ib.prepare(inbox, job.stem, parts, defaults=self.config.render, identity=self.identity,
                              limits=self.limits)
        if prepared.fingerprint != job.fingerprint:
            raise _InputsChanged("the inputs or the engine changed after the job was queued; "
                                 "the current files are scanned as a new job")
        return prepared

    def _attempt(self, job: Job, tmp: Path, log_path: Path) -> _Outcome:
        """Everything that can fail for one job, behind the one catch-all of the worker."""
        started = time.time()
        log.info("job.started", attempt=job.attempts, max_attempts=job.max_attempts,
                 waited_s=round(started - job.created_at, 3))
        monitor = _Monitor(self, job)

        def failed(kind: OutcomeKind, reason: str, failure: str) -> _Outcome:
            log.warning("job.finished", outcome=kind, reason=reason, failure=failure,
                        seconds=round(time.time() - started, 3))
            return _Outcome(kind, reason=reason, failure=failure)

        try:
            # An earlier attempt published this run and died before recording it: finish it off.
            published = ob.find_published(self.config.paths.outbox, job.stem, job.id, _run_key(job))
            if published is not None:
                log.info("job.already_published", outputs=published.get("outputs"))
                return _Outcome("done", doc=published, already_published=True)
            prepared = self._reprepare(job)
            mp4 = tmp / f"{job.stem}.mp4"
            result = self.renderer.render(prepared.request, mp4, monitor.progress, monitor.should_stop)
            if not mp4.is_file() or mp4.stat().st_size == 0:
                raise RenderError("the renderer returned without writing the video")
            render_s = time.time() - started
            base = ob.choose_base(self.config.paths.outbox, job.stem, job.id)
            doc = self._result_doc(job, prepared, result, base, render_s)
            json_path = tmp / f"{job.stem}.json"
            ob.write_json(json_path, doc)
            # The canonical line of a job: everything needed to grep for outcomes and speed.
            log.info("job.finished", outcome="done", render_s=round(render_s, 3), frames=result.frames,
                     duration_s=result.duration_s, width=result.width, height=result.height,
                     chunks=result.chunks, seed=result.seed, output=f"{base}.mp4")
            return _Outcome("done", doc=doc, base=base, files={"mp4": mp4, "json": json_path, "log": log_path})
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
        except _InputsGone as exc:
            return failed("failed", str(exc), "input")
        except _InputsChanged as exc:
            return failed("superseded", str(exc), "superseded")
        except Exception as exc:  # the one catch-all: any other failure ends this job, not the daemon
            if _is_enospc(exc):
                return failed("disk_full", f"disk full: {ib.one_line(str(exc))}", "disk")
            if isinstance(exc, RenderError):
                return failed("failed", f"render failed: {ib.one_line(str(exc))}", "render")
            log.exception("job.internal_error")
            return failed("failed", f"internal error: {type(exc).__name__}: {ib.one_line(str(exc))}", "internal")

    def _result_doc(self, job: Job, prepared: ib.Prepared, result: RenderResult, base: str,
                    render_s: float) -> dict[str, Any]:
        now = time.time()
        return {
            "job_id": job.id,
            "stem": job.stem,
            "fingerprint": job.fingerprint,
            "run": _run_key(job),
            "attempt": job.attempts,
            "outputs": {ext: f"{base}.{ext}" for ext in ob.RESULT_EXTS},
            "params": prepared.params,
            "seed": result.seed,
            "video": {"frames": result.frames, "fps": result.fps, "width": result.width, "height": result.height,
                      "duration_s": result.duration_s, "chunks": result.chunks,
                      "dit_calls": result.dit_calls, "blocks_skipped": result.blocks_skipped},
            "timings": {"queued_s": round((job.started_at or now) - job.created_at, 3),
                        "render_s": round(render_s, 3), **result.timings},
            "inputs": prepared.inputs,
            "models": {"engine": self.identity, "files": dict(result.model_files)},
            "versions": {"infinitetalkd": _version(), "python": platform.python_version(),
                         "platform": platform.platform()},
            "created_at": _iso(job.created_at),
            "finished_at": _iso(now),
        }

    def _input_paths(self, job: Job) -> list[Path]:
        return [self.config.paths.inbox / str(i["name"]) for i in job.inputs]

    def _finalize(self, job: Job, log_path: Path, out: _Outcome) -> None:
        """Move files and record the outcome. Runs after the job's log file was closed."""
        cfg = self.config
        if out.kind == "done":
            assert out.doc is not None
            try:
                # Publish, move the inputs away, then record: "done" in the database means finished.
                with self.files_lock:
                    if not out.already_published:
                        ob.publish(log_path.parent, cfg.paths.outbox, out.base, out.files)
                    where = dispose_inputs(cfg, job.stem, job.id, self._input_paths(job))
                    self.store.finish(job, self.worker_id, JobStatus.DONE, outputs=dict(out.doc["outputs"]),
                                      timings=dict(out.doc["timings"]))
            except OSError as exc:
                if not _is_enospc(exc):
                    raise
                reason = f"disk full while publishing: {ib.one_line(str(exc))}"
                self._fail_keep_inputs(job, reason)
                return
            log.info("job.done", outputs=out.doc["outputs"], inputs=where)
            self.metrics.render_seconds.observe(float(out.doc["timings"].get("render_s", 0.0)))
            self.metrics.last_success.set(time.time())
        elif out.kind in ("failed", "cancelled") or (out.kind == "device_fault" and job.attempts >= job.max_attempts):
            reason = out.reason
            if out.kind == "device_fault":
                reason += f" (attempt {job.attempts} of {job.max_attempts}; giving up)"
            status = JobStatus.CANCELLED if out.kind == "cancelled" else JobStatus.FAILED
            with self.files_lock:
                dest = move_to_failed(cfg, job, reason, log_path)
                self.store.finish(job, self.worker_id, status, error=reason, failed_dir=str(dest))
            log.warning(f"job.{status.value}", reason=reason, failed_dir=str(dest))
            if status is JobStatus.FAILED:
                self.metrics.failures.labels(kind=out.failure).inc()
        elif out.kind == "device_fault":
            self.store.requeue(job, self.worker_id, refund=False, error=out.reason)
            log.error("job.requeued", reason=out.reason, attempt=job.attempts, max_attempts=job.max_attempts)
            self.metrics.failures.labels(kind="device").inc()
        elif out.kind == "disk_full":
            self._fail_keep_inputs(job, out.reason)
        elif out.kind == "superseded":
            self.store.finish(job, self.worker_id, JobStatus.CANCELLED, error=out.reason)
            log.info("job.superseded", reason=out.reason)
        elif out.kind == "stopped":
            self.store.requeue(job, self.worker_id, refund=True)
            log.info("job.requeued", reason="shutdown", attempt_refunded=True)

    def _fail_keep_inputs(self, job: Job, reason: str) -> None:
        reason += f"; the inputs stay in the inbox: free space, then run 'infinitetalkd retry {job.id}'"
        self.store.finish(job, self.worker_id, JobStatus.FAILED, error=reason)
        log.error("job.failed", reason=reason)
        self.metrics.failures.labels(kind="disk").inc()


# --------------------------------------------------------------------------------------------
# Process set-up
# --------------------------------------------------------------------------------------------


def _lock(path: Path) -> IO[str] | None:
    """An exclusive lock on the state folder: one daemon per database. None if already held."""
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of the daemon
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _install_signals(stop: threading.Event, wake: threading.Event, notifier: Notifier) -> Callable[[], None]:
    count = 0

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        if count > 1:
            os._exit(EXIT_FAILURE)  # second signal: stop now; crash recovery requeues the job at start
        stop.set()
        wake.set()
        notifier.stopping(f"{signal.Signals(signum).name}: stopping at the next step")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


def run_daemon(config: Config, make_renderer: RendererFactory, *, notifier: Notifier | None = None,
               stop: threading.Event | None = None, install_signals: bool = True,
               configure_logging: bool = True) -> int:
    """Run until stopped; returns the exit code. ``make_renderer`` builds the resident engine
    (``engine.load_engine`` in production, a fake in tests)."""
    if configure_logging:
        setup_logging(config.logging.level, config.logging.format)
    notifier = notifier or Notifier()
    stop = stop or threading.Event()
    wake = threading.Event()
    paths = config.paths
    try:
        for d in (paths.inbox, paths.outbox, paths.failed, paths.archive, paths.state, paths.tmp):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.error("config.directory_unusable", error=str(exc), config=str(config.source))
        notifier.status(f"cannot create {exc.filename}: {exc.strerror}")
        return EX_CONFIG
    state_fs = filesystem_type(paths.state)
    if is_network_fs(state_fs):
        log.error("config.state_on_network_fs", state=str(paths.state), fstype=state_fs,
                  hint="SQLite needs a local disk: point paths.state at one")
        return EX_CONFIG
    lock = _lock(paths.state / "infinitetalkd.lock")
    if lock is None:
        log.error("daemon.already_running", state=str(paths.state))
        return EX_CONFIG
    restore_signals = _install_signals(stop, wake, notifier) if install_signals else None
    metrics = Metrics()
    scanner: Scanner | None = None
    store: Store | None = None
    try:
        try:
            store = Store.open(paths.database)
        except StoreError as exc:
            log.error("store.unusable", error=str(exc), database=str(paths.database))
            return EX_CONFIG
        host = socket.gethostname()
        requeued, failed = store.recover(host)
        for job in requeued:
            log.warning("job.recovered", job_id=job.id, stem=job.stem, attempts=job.attempts, action="requeued")
        for job in failed:
            dest = move_to_failed(config, job, job.error or "interrupted too often")
            store.set_failed_dir(job.id, str(dest))
            log.error("job.recovered", job_id=job.id, stem=job.stem, attempts=job.attempts, action="failed",
                      reason=job.error)
        removed = ob.clean_tmp(paths.tmp)
        if removed:
            log.info("outbox.tmp_cleaned", removed=removed)

        notifier.status("loading the engine")
        t0 = time.monotonic()
        try:
            renderer = make_renderer(config.engine.options())
            t_warm = time.monotonic()
            renderer.warmup()  # on a GPU with engine.fast this compiles the DiT blocks for the warm bucket
            warmup_s = time.monotonic() - t_warm
            identity = renderer.identity()
        except DeviceFault:
            log.exception("engine.load_failed")
            return EXIT_DEVICE_FAULT
        except Exception:  # missing/corrupt model files, driver trouble: say so and let systemd decide
            log.exception("engine.load_failed")
            notifier.status("the engine failed to load; see the log")
            return EXIT_FAILURE
        log.info("engine.ready", identity=identity, load_s=round(time.monotonic() - t0 - warmup_s, 3),
                 warmup_s=round(warmup_s, 3))
        if stop.is_set():
            return EXIT_OK

        files_lock = threading.Lock()
        scanner = Scanner(config, store, identity, files_lock=files_lock, wake_worker=wake.set,
                          on_reject=metrics.failures.labels(kind="input").inc)
        scanner.scan_once()  # the start-up scan: the truth before any event
        scanner.start()
        if config.metrics.enabled:
            metrics.serve(config.metrics.host, config.metrics.port)
            log.info("metrics.serving", host=config.metrics.host, port=config.metrics.port)
        worker = Worker(config, store, renderer, identity, notifier=notifier, metrics=metrics, stop=stop,
                        wake=wake, files_lock=files_lock, scanner=scanner)
        notifier.ready(f"ready; watching {paths.inbox} ({scanner.mode})")
        log.info("daemon.ready", inbox=str(paths.inbox), outbox=str(paths.outbox), watch_mode=scanner.mode,
                 worker_id=worker.worker_id)
        code = worker.loop()
        log.info("daemon.stopped", exit_code=code)
        return code
    finally:
        if stop.is_set():
            notifier.stopping("stopped")
        if scanner is not None:
            scanner.stop()
        metrics.close()
        if store is not None:
            store.close()
        if restore_signals is not None:
            restore_signals()
        notifier.close()
        lock.close()
