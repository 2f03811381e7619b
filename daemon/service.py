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
from daemon.config import EX_CONFIG, Config, ConfigError, StoreConfig
from daemon.db import StoreConfigError, is_transient
from daemon.db_liveness import Liveness
from daemon.fsinfo import filesystem_type, is_network_fs
from daemon.instance import Instance, resolve, safe_name, stale_after
from daemon.jobs import Job
from daemon.log import get_logger, setup_logging
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.patience import Stopped, patiently, unusable_database
from daemon.results import program_version
from daemon.snapshot import source_dir
from daemon.store import Store, StoreError
from daemon.store_fleet import WorkerNameTaken
from daemon.watcher import Scanner
from daemon.worker import EXIT_DEVICE_FAULT, EXIT_FAILURE, EXIT_OK, Worker
from engine.api import DeviceFault, EngineOptions, Renderer

__all__ = ["run_daemon", "RendererFactory", "open_store", "StoreUnusable"]

log = get_logger("infinitetalkd.daemon")

RendererFactory = Callable[[EngineOptions], Renderer]

_TRANSIENT = ("locked", "busy")


class StoreUnusable(Exception):
    """The job database cannot be opened: the message says which file and what to do."""


def open_store(path: Path, *, busy_timeout_ms: int = 10_000, stop: threading.Event | None = None,
               settings: StoreConfig | None = None) -> Store:
    """Open the job database (``settings``: ``cfg.store``; SQLite at ``path`` without a url), waiting
    while another process holds it locked or the server cannot be reached. Raises StoreUnusable
    (with a sentence naming the database and what to do) for a corrupt, unreadable or too-new one."""
    settings = (settings or StoreConfig()).model_copy(update={"busy_timeout_s": busy_timeout_ms / 1000})
    where = str(path) if settings.url is None else "at store.url"

    def attempt() -> Store:
        try:
            return Store.connect(settings, path)
        except OperationalError as exc:
            if settings.url is not None or any(w in str(exc.orig or exc).lower() for w in _TRANSIENT):
                raise  # patiently() waits and tries again (a server that is down or restarting)
            raise StoreUnusable(unusable_database(path, exc)) from None
        except DatabaseError as exc:
            if settings.url is not None and is_transient(exc):
                raise
            raise StoreUnusable(unusable_database(path, exc)) from None
        except (StoreError, StoreConfigError) as exc:
            raise StoreUnusable(f"the job database {where}: {exc}") from None
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


def _recover(config: Config, store: Store, name: str, tmp: Path, stop: threading.Event) -> None:
    """Requeue or fail the jobs this worker's previous (dead) incarnation left running; a sibling's
    jobs are never touched (their expired leases are the claim's and the sweeper's). Never raises
    for a full disk. Cleans only this worker's own work folders."""
    requeued, failed = patiently(lambda: store.recover_worker(name), "recovering jobs", stop=stop)
    for job in requeued:
        log.warning("job.recovered", job_id=job.id, stem=job.stem, attempts=job.attempts, action="requeued")
    move_to_failed(config, store, failed, stop, tmp=tmp)
    for job in requeued + failed:
        ob.remove_partial(config.paths.outbox, job.stem, job.id)
    try:
        removed = ob.clean_tmp(tmp) if tmp.is_dir() else []
    except OSError as exc:
        log.warning("outbox.tmp_clean_failed", error=str(exc))
        removed = []
    if removed:
        log.info("outbox.tmp_cleaned", removed=removed)


def move_to_failed(config: Config, store: Store, jobs: list[Job], stop: threading.Event, *,
                   tmp: Path | None = None) -> None:
    """Inputs of jobs the database already failed (recovery, the sweeper) go to failed/; a full
    disk leaves them in the inbox (where they become a job again)."""
    paths = config.paths
    for job in jobs:
        reason = job.error or "interrupted too often"
        snaps = sorted(tmp.glob(f"{job.id}-*/inputs")) if tmp is not None else []
        try:
            # (a redo's inputs are in its own folder, never the inbox: source_dir)
            dest = fl.to_failed(paths.failed, job.stem, job.id, source_dir(config, job), job.inputs, reason,
                                settled_in=paths.settled, snap=snaps[-1] if snaps else None)
        except OSError as exc:
            log.error("job.recovered", job_id=job.id, stem=job.stem, action="failed", reason=reason,
                      error=str(exc), hint="the inputs stay in the inbox")
            continue
        patiently(lambda j=job.id, d=str(dest): store.set_failed_dir(j, d), "recording", stop=stop)  # type: ignore[misc]
        log.error("job.recovered", job_id=job.id, stem=job.stem, attempts=job.attempts, action="failed",
                  reason=reason)


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
    return int(config.store.busy_timeout_s * 1000)


def _prepare(config: Config, inst: Instance, notifier: Notifier) -> int | None:
    """Folders and the local-disk check; an exit code when the daemon cannot start."""
    paths = config.paths
    try:
        # (the worker's own outbox/.tmp/<worker> is made per job: a full outbox must not stop the start)
        for d in (paths.inbox, paths.outbox, paths.failed, paths.archive, paths.state, inst.database.parent,
                  paths.tmp):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.error("config.directory_unusable", error=str(exc), config=str(config.source))
        notifier.status(f"cannot create {exc.filename}: {exc.strerror}")
        return EX_CONFIG
    local = [paths.state] + ([inst.database.parent] if config.store.url is None else [])
    for folder in local:
        state_fs = filesystem_type(folder)
        if is_network_fs(state_fs):
            log.error("config.state_on_network_fs", state=str(folder), fstype=state_fs,
                      hint="SQLite and the lock need a local disk: point paths.state at one "
                           "(a fleet of hosts shares PostgreSQL: store.url)")
            return EX_CONFIG
    return None


def _register(config: Config, store: Store, name: str, stop: threading.Event) -> str | None:
    """Take the worker name in the database; None (logged) when a live process holds it.

    A holder on this host is dead whatever its last heartbeat says: this process holds the
    name's lock file, which a live daemon of this name on this host would hold (a restart right
    after a kill -9 takes its name back at once)."""
    host = socket.gethostname()

    def register(stale_s: float) -> str:
        return store.register_worker(name, host=host, pid=os.getpid(), device=config.engine.device,
                                     gpu=config.engine.device, version=program_version(), stale_s=stale_s)

    try:
        try:
            return patiently(lambda: register(stale_after(config)), "registering the worker", stop=stop)
        except WorkerNameTaken:
            holder = next((w for w in store.list_workers() if w.name == name), None)
            if holder is None or holder.host != host or holder.pid == os.getpid():
                raise
            log.warning("worker.replaced", worker=name, old_pid=holder.pid,
                        reason="its previous process on this host is gone (the lock was free)")
            return patiently(lambda: register(-1.0), "registering the worker", stop=stop)
    except WorkerNameTaken as exc:
        log.error("worker.name_taken", error=str(exc), worker=name,
                  hint="give each daemon its own worker.name, --device or INFINITETALKD_WORKER")
        return None


def _join(config: Config, store: Store, inst: Instance, stop: threading.Event) -> Liveness:
    """Register the worker, start its liveness thread, recover its previous incarnation's jobs.
    Raises StoreUnusable when a live process already is this worker."""
    token = _register(config, store, inst.name, stop)
    if token is None:
        raise StoreUnusable(f"another live process is worker {inst.name}")
    live = Liveness(store, inst.name, token, lease_s=config.jobs.lease_s,
                    interval_s=min(config.worker.heartbeat_s, config.jobs.lease_s / 2),
                    ingest=config.worker.ingest == "auto")
    live.beat()  # the first round now: whether this process leads the ingest is known at once
    live.start()
    try:
        _recover(config, store, inst.name, inst.tmp, stop)
    except BaseException:
        live.stop()
        raise
    return live


def _start_scanner(config: Config, store: Store, live: Liveness, name: str, renderer: Renderer, identity: str, *,
                   files_lock: threading.Lock, wake: threading.Event, metrics: Metrics,
                   stop: threading.Event) -> Scanner:
    """Record what this worker renders, on which GPU (docs/daemon.md §4.9), then scan the inbox once
    (the truth before any event) and start the scanner, which works while this process leads the ingest."""
    token, gpu = live.token, renderer.device_name()
    patiently(lambda: store.set_worker_engine(name, token, recipe=identity, gpu=gpu), "recording the worker's engine",
              stop=stop)
    scanner = Scanner(config, store, identity, files_lock=files_lock, wake_worker=wake.set,
                      on_reject=metrics.failures.labels(kind="input").inc, stop_event=stop,
                      leading=lambda: live.leader and live.database_ok, name=name,
                      move_to_failed=lambda jobs: move_to_failed(config, store, jobs, stop))
    scanner.scan_once()
    scanner.start()
    return scanner


def run_daemon(config: Config, make_renderer: RendererFactory, *, notifier: Notifier | None = None,
               stop: threading.Event | None = None, install_signals: bool = True,
               configure_logging: bool = True, busy_timeout_ms: int | None = None,
               device: str | None = None) -> int:
    """Run until stopped; returns the exit code. ``make_renderer`` builds the resident engine
    (``engine.load_engine`` in production, a fake in tests); ``device``: ``run --device``."""
    if configure_logging:
        setup_logging(config.logging.level, config.logging.format)
    notifier = notifier or Notifier()
    stop = stop or threading.Event()
    wake = threading.Event()
    try:
        inst = resolve(config, device=device)
    except ConfigError as exc:
        log.error("config.invalid", error=str(exc))
        return EX_CONFIG
    config = inst.config
    code = _prepare(config, inst, notifier)
    if code is not None:
        return code
    # One daemon per worker name on this host (several may share one SQLite database).
    lock = _lock(config.paths.state / f"infinitetalkd-{safe_name(inst.name)}.lock")
    if lock is None:
        log.error("daemon.already_running", state=str(config.paths.state), worker=inst.name)
        return EX_CONFIG
    restore_signals = _install_signals(stop, wake, notifier) if install_signals else None
    metrics = Metrics()
    scanner: Scanner | None = None
    store: Store | None = None
    live: Liveness | None = None
    try:
        try:
            store = open_store(inst.database, stop=stop, settings=config.store,
                               busy_timeout_ms=busy_timeout_ms if busy_timeout_ms is not None
                               else _busy_timeout_ms(config))
            live = _join(config, store, inst, stop)
        except StoreUnusable as exc:
            log.error("store.unusable", error=str(exc), database=store.url if store else str(inst.database))
            notifier.status(str(exc))
            return EX_CONFIG
        loaded = _load(config, make_renderer, notifier)
        if isinstance(loaded, int):
            return loaded
        renderer, identity = loaded
        if stop.is_set():
            return EXIT_OK
        files_lock = threading.Lock()
        scanner = _start_scanner(config, store, live, inst.name, renderer, identity, files_lock=files_lock,
                                 wake=wake, metrics=metrics, stop=stop)
        if config.metrics.enabled:
            metrics.serve(config.metrics.host, config.metrics.port)
            log.info("metrics.serving", host=config.metrics.host, port=config.metrics.port)
        worker = Worker(config, store, renderer, identity, notifier=notifier, metrics=metrics, stop=stop,
                        wake=wake, files_lock=files_lock, scanner=scanner, name=inst.name, live=live,
                        tmp_root=inst.tmp)
        notifier.ready(f"ready; watching {config.paths.inbox} ({scanner.mode}) as worker {inst.name}")
        log.info("daemon.ready", inbox=str(config.paths.inbox), outbox=str(config.paths.outbox),
                 watch_mode=scanner.mode, worker_id=worker.worker_id, store=store.url)
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
        if live is not None:
            live.stop()
        metrics.close()
        if store is not None:
            store.close()
        if restore_signals is not None:
            restore_signals()
        notifier.close()
        lock.close()
