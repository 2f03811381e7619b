"""The daemon process: directories, lock, database, crash recovery -> engine load + warm-up -> READY
-> the scanner thread (daemon/watcher.py) and the worker loop (daemon/worker.py) on the main thread.

Start-up faults end the process with a sentence, not a traceback: an unusable folder, a state
folder on a network filesystem, a second daemon, a corrupt or unreadable job database (exit 78,
EX_CONFIG); a database another process holds locked is waited for. Recovery never stops the start:
a job whose inputs cannot be moved to failed/ (a full disk) keeps them in the inbox.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

from sqlalchemy.exc import DatabaseError, OperationalError

from daemon import files as fl
from daemon import outbox as ob
from daemon.config import EX_CONFIG, Config
from daemon.fsinfo import filesystem_type, is_network_fs
from daemon.log import get_logger, setup_logging
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.patience import Stopped, patiently, unusable_database
from daemon.store import Store, StoreError
from daemon.watcher import Scanner
from daemon.worker import EXIT_DEVICE_FAULT, EXIT_FAILURE, EXIT_OK, Worker
from engine.api import DeviceFault, EngineOptions, Renderer

__all__ = ["run_daemon", "RendererFactory", "open_store", "StoreUnusable"]

log = get_logger("infinitetalkd.daemon")

RendererFactory = Callable[[EngineOptions], Renderer]

_TRANSIENT = ("locked", "busy")


class StoreUnusable(Exception):
    """The job database cannot be opened: the message says which file and what to do."""


def open_store(path: Path, *, busy_timeout_ms: int = 10_000, stop: threading.Event | None = None) -> Store:
    """Open the job database, waiting while another process holds it locked. Raises StoreUnusable
    (with a sentence naming the file and what to do) for a corrupt, unreadable or too-new file."""

    def attempt() -> Store:
        try:
            return Store.open(path, busy_timeout_ms=busy_timeout_ms)
        except OperationalError as exc:
            if any(w in str(exc.orig or exc).lower() for w in _TRANSIENT):
                raise  # patiently() waits and tries again
            raise StoreUnusable(unusable_database(path, exc)) from None
        except DatabaseError as exc:
            raise StoreUnusable(unusable_database(path, exc)) from None
        except StoreError as exc:
            raise StoreUnusable(f"the job database {path}: {exc}") from None
        except OSError as exc:
            raise StoreUnusable(f"the job database {path} cannot be opened ({exc.strerror}); "
                                "check the folder's permissions and free space (paths.state)") from None

    return patiently(attempt, "opening the job database", stop=stop)


def _lock(path: Path) -> IO[str] | None:
    """An exclusive lock on the state folder: one daemon per database. None if already held."""
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of the daemon
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError:
        pass  # the pid in the file is a courtesy; the flock is what counts
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


def _recover(config: Config, store: Store, stop: threading.Event) -> None:
    """Requeue or fail the jobs a dead process left running; never raises for a full disk."""
    requeued, failed = patiently(lambda: store.recover(socket.gethostname()), "recovering jobs", stop=stop)
    for job in requeued:
        log.warning("job.recovered", job_id=job.id, stem=job.stem, attempts=job.attempts, action="requeued")
    paths = config.paths
    for job in failed:
        reason = job.error or "interrupted too often"
        snap = paths.tmp / str(job.id) / "inputs"
        try:
            dest = fl.to_failed(paths.failed, job.stem, job.id, paths.inbox, job.inputs, reason,
                                snap=snap if snap.is_dir() else None)
        except OSError as exc:
            log.error("job.recovered", job_id=job.id, stem=job.stem, action="failed", reason=reason,
                      error=str(exc), hint="the inputs stay in the inbox")
            continue
        patiently(lambda j=job.id, d=str(dest): store.set_failed_dir(j, d), "recording", stop=stop)  # type: ignore[misc]
        log.error("job.recovered", job_id=job.id, stem=job.stem, attempts=job.attempts, action="failed",
                  reason=reason)
    for job in requeued + failed:
        ob.remove_partial(paths.outbox, job.stem, job.id)
    try:
        removed = ob.clean_tmp(paths.tmp)
    except OSError as exc:
        log.warning("outbox.tmp_clean_failed", error=str(exc))
        removed = []
    if removed:
        log.info("outbox.tmp_cleaned", removed=removed)


def _load(config: Config, make_renderer: RendererFactory, notifier: Notifier) -> tuple[Renderer, str] | int:
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
    return renderer, identity


def _busy_timeout_ms(config: Config) -> int:
    store_cfg = getattr(config, "store", None)  # cfg.store.busy_timeout_s once the schema has it
    return int(float(getattr(store_cfg, "busy_timeout_s", 10.0)) * 1000)


def run_daemon(config: Config, make_renderer: RendererFactory, *, notifier: Notifier | None = None,
               stop: threading.Event | None = None, install_signals: bool = True,
               configure_logging: bool = True, busy_timeout_ms: int | None = None) -> int:
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
            store = open_store(paths.database, stop=stop,
                               busy_timeout_ms=busy_timeout_ms if busy_timeout_ms is not None
                               else _busy_timeout_ms(config))
            _recover(config, store, stop)
        except StoreUnusable as exc:
            log.error("store.unusable", error=str(exc), database=str(paths.database))
            notifier.status(str(exc))
            return EX_CONFIG
        loaded = _load(config, make_renderer, notifier)
        if isinstance(loaded, int):
            return loaded
        renderer, identity = loaded
        if stop.is_set():
            return EXIT_OK
        files_lock = threading.Lock()
        scanner = Scanner(config, store, identity, files_lock=files_lock, wake_worker=wake.set,
                          on_reject=metrics.failures.labels(kind="input").inc, stop_event=stop)
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
    except Stopped:
        return EXIT_OK  # asked to stop while the database was still busy at start
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
