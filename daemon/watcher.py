"""Watching the inbox: watchdog events are hints, full scans are the truth (docs/daemon.md §3).

The :class:`Scanner` runs on its own thread. It lists the inbox at start, whenever a watchdog event
wakes it, every ``poll_interval_s`` while something is settling (or always, in poll mode), and at
least every ``rescan_interval_s``. For each stem it tracks stability, validates, fingerprints and
inserts a queued job, or moves refused inputs to failed/ with a one-line reason.

Whether the inbox is there and the watchdog observer are :class:`daemon.inbox_watch.InboxWatch`'s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from daemon import files as fl
from daemon import inbox as ib
from daemon import outbox as ob
from daemon import statefiles
from daemon.config import Config
from daemon.inbox_watch import InboxWatch
from daemon.jobs import Job, JobStatus, rejection_key
from daemon.log import get_logger, job_log
from daemon.patience import Stopped, patiently
from daemon.redrop import Redrop, decide
from daemon.store import StaleJob, Store
from engine.api import InputError

__all__ = ["Scanner"]

T = TypeVar("T")

# A refusal that could not be written (full disk, read-only failed/) is tried again after this
# long, doubling up to the cap; nothing is recorded meanwhile, so a full disk creates no rows.
_REFUSE_RETRY_S = 2.0
_REFUSE_RETRY_MAX_S = 60.0

log = get_logger("infinitetalkd.watcher")


@dataclass
class _Known:
    """A stem state already handled. ``job_id``: the queued/running job these files belong to or
    duplicate; when that job finishes, the same files are judged again (skip, requeue, leave)."""

    signature: tuple[Any, ...]
    prepared: ib.Prepared
    job_id: int | None


@dataclass
class _Wait:
    reason: str
    since: float


@dataclass
class _Retry:
    """A stem not looked at again before ``at`` (see :meth:`Scanner._defer`)."""

    signature: tuple[Any, ...]
    at: float
    backoff: float


class Scanner:
    """Turns inbox files into queued jobs. ``wake_worker`` is called after a job was queued.

    ``files_lock`` is shared with the worker: whoever moves a job's inputs holds it, and both sides
    re-check the database and the files while holding it.
    """

    def __init__(self, config: Config, store: Store, identity: str, *, files_lock: threading.Lock,
                 wake_worker: Callable[[], None], on_reject: Callable[[], None] | None = None,
                 stop_event: threading.Event | None = None, leading: Callable[[], bool] | None = None,
                 name: str = "", move_to_failed: Callable[[list[Job]], None] | None = None) -> None:
        """``leading``: whether this process holds the ingest lease now (None: always, one daemon
        alone); only the leader scans, refuses, and sweeps expired jobs. ``move_to_failed`` moves
        the inputs of jobs the database ended to failed/ (swept ones, and those nobody moved: :meth:`_unmoved`).
        ``name``: the worker name, reported with the waiting list."""
        self.config = config
        self.leading = leading
        self.name = name
        self.move_to_failed = move_to_failed
        self._was_leading = False
        self.store = store
        self.identity = identity
        self.files_lock = files_lock
        self.wake_worker = wake_worker
        self.on_reject = on_reject
        self.wake = threading.Event()
        self._stop = stop_event if stop_event is not None else threading.Event()
        self._thread: threading.Thread | None = None
        self.tracker = ib.StabilityTracker()
        self.known: dict[str, _Known] = {}  # stem -> the state already handled
        self.waiting: dict[str, _Wait] = {}
        self.retry: dict[str, _Retry] = {}
        self._last_failure = ""
        self._refs_cache: dict[str, tuple[tuple[int, int], list[tuple[str, str]]]] = {}
        self.watch = InboxWatch(config.paths.inbox, config.watch, self.wake)
        self.last_cycle = time.monotonic()
        self._next_check: float | None = None
        self.limits = ib.Limits(
            max_input_bytes=config.jobs.max_input_mb * 2**20,
            max_sidecar_bytes=config.jobs.max_sidecar_kb * 1024,
            max_image_pixels=config.jobs.max_image_pixels,
        )

    # -- thread -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="infinitetalkd-scanner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.watch.stop()

    @property
    def inbox_missing(self) -> bool:
        return self.watch.missing

    @property
    def mode(self) -> str:
        """How the inbox is watched now: inotify, or poll."""
        return self.watch.mode

    def alive(self) -> bool:
        """The scanner thread runs and finished a cycle recently (feeds the systemd watchdog)."""
        limit = 2 * self.config.watch.rescan_interval_s + 120
        return (self._thread is not None and self._thread.is_alive()
                and time.monotonic() - self.last_cycle < limit)

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                # In inotify mode a full pass waits for an event or the rescan interval, but the
                # inbox's presence is checked every poll interval: a share that is unmounted or
                # renamed away while idle sends no event.
                if self.wake.is_set() or now >= next_scan or self.watch.presence_changed():
                    self.wake.clear()
                    self.scan_once()
                    next_scan = time.monotonic() + (self._timeout() if self._was_leading
                                                    else self.config.watch.poll_interval_s)
                self._last_failure = ""
            except Stopped:
                break
            except Exception as exc:  # the scanner outlives any bad pass; logged once, not per pass
                key = f"{type(exc).__name__}: {exc}"
                if key != self._last_failure:
                    log.exception("scan.failed")
                self._last_failure = key
                next_scan = time.monotonic() + self.config.watch.poll_interval_s
            self.last_cycle = time.monotonic()
            self.wake.wait(max(0.01, min(next_scan - time.monotonic(), self.config.watch.poll_interval_s)))

    def _timeout(self) -> float:
        w = self.config.watch
        if self.watch.mode == "poll" or self.watch.missing:
            return w.poll_interval_s
        timeout = w.rescan_interval_s
        if self._next_check is not None:
            timeout = min(timeout, max(0.05, self._next_check - time.monotonic()))
        return timeout

    def _db(self, call: Callable[[], T], what: str) -> T:
        return patiently(call, what, stop=self._stop)

    # -- scanning -----------------------------------------------------------------------------

    def is_leader(self) -> bool:
        leading = self.leading is None or self.leading()
        if leading != self._was_leading:
            log.info("ingest.leader" if leading else "ingest.follower", worker=self.name)
            self._was_leading = leading
            if not leading:  # another process scans now: forget what this one had decided
                self.known.clear()
                self.waiting.clear()
                self.retry.clear()
                self.tracker.keep_only({})
        return leading

    def scan_once(self) -> None:
        """One full pass over the inbox (only by the ingest leader)."""
        if not self.is_leader():
            return
        self._sweep()
        if not self.watch.check():
            self._write_status()
            return
        now = time.monotonic()
        try:
            entries = ib.list_inbox(self.config.paths.inbox)
        except OSError as exc:  # gone between the stat and the listing, EIO / ESTALE on a dropped share
            self.watch.mark_missing("unreadable", str(exc))
            self._write_status()
            return
        groups = ib.group_entries(entries)
        # Files named in a sidecar (audio2, masks) belong to that sidecar's job; a stem made only
        # of such files is not a job of its own (and must not be refused as incomplete).
        referenced = self._referenced(groups)
        groups = {s: g for s, g in groups.items() if not set(g.entries) <= referenced}
        self.tracker.keep_only(groups)
        for gone in set(self.known) - set(groups):
            del self.known[gone]
        for gone in set(self.waiting) - set(groups):
            del self.waiting[gone]
        for gone in set(self.retry) - set(groups):
            del self.retry[gone]
        self._next_check = None
        for stem in sorted(groups):
            # A leader that lost its lease during the pass (stopped, cut off) stops here: the rest
            # of the inbox is the new leader's (docs/daemon.md §4.6).
            if self._stop.is_set() or not self.is_leader():
                break
            with structlog.contextvars.bound_contextvars(stem=stem):
                self._consider_isolated(groups[stem], now)
        self._write_status()

    def _sweep(self) -> None:
        """Fail running jobs whose lease expired with no attempt left (or a cancel request): the
        database decides (one winner per job), then their inputs go to failed/."""
        if self.leading is None:
            return  # one daemon alone: its own recovery at start does this
        expired = self._db(self.store.sweep_expired, "sweeping expired jobs")
        if expired and self.move_to_failed is not None:
            with self.files_lock:
                self.move_to_failed(expired)

    def _consider_isolated(self, g: ib.Group, now: float) -> None:
        """One stem's decision, isolated: whatever it raises, the other stems are still looked at,
        and the stem is refused once with the reason (not retried on every pass)."""
        try:
            self._consider(g, now)
        except Stopped:
            raise
        except OSError as exc:  # the inbox's storage (a share dropping, a file vanishing): look again later
            if g.stem not in self.retry:
                log.warning("scan.stem_unreadable", error=str(exc), hint="looked at again shortly")
            self._defer(g.stem, self._safe_signature(g))
        except Exception as exc:  # a bug or an unforeseen input must not stop the scan of other stems
            log.exception("scan.stem_failed")
            reason = f"internal error while checking the files: {type(exc).__name__}: {ib.one_line(str(exc))[:300]}"
            signature = self._safe_signature(g)
            try:
                self._reject(g, {}, reason, signature)
            except Stopped:
                raise
            except Exception:  # noqa: BLE001 - recorded below; tried again after a back-off
                log.exception("scan.reject_failed")
                self._defer(g.stem, signature)

    def _safe_signature(self, g: ib.Group) -> tuple[Any, ...]:
        try:
            return self._signature(g, self._ref_entries(g))
        except Exception:  # noqa: BLE001 - the group's own files still identify this state
            return self._signature(g, {})

    def _sidecar_refs(self, g: ib.Group) -> list[tuple[str, str]]:
        """The file names a group's sidecar names, cached on the sidecar's (size, mtime)."""
        sidecar = ib.parts_of(g).sidecar
        if sidecar is None or g.entries[sidecar].kind != "file":
            return []
        e = g.entries[sidecar]
        cached = self._refs_cache.get(sidecar)
        if cached is not None and cached[0] == (e.size, e.mtime_ns):
            return cached[1]
        refs: list[tuple[str, str]] = []
        # Any error is reported by prepare() once the files are stable (a broken sidecar names nothing).
        with contextlib.suppress(Exception):
            refs = ib.sidecar_refs(ib.load_sidecar(self.config.paths.inbox / sidecar, self.limits.max_sidecar_bytes))
        self._refs_cache[sidecar] = ((e.size, e.mtime_ns), refs)
        return refs

    def _referenced(self, groups: dict[str, ib.Group]) -> set[str]:
        names = {n for g in groups.values() for n in g.entries}
        self._refs_cache = {k: v for k, v in self._refs_cache.items() if k in names}
        return {name for g in groups.values() for _, name in self._sidecar_refs(g)}

    def _recheck_at(self, when: float) -> None:
        self._next_check = when if self._next_check is None else min(self._next_check, when)

    def _wait(self, stem: str, reason: str, now: float) -> None:
        prev = self.waiting.get(stem)
        if prev is None or prev.reason != reason:
            self.waiting[stem] = _Wait(reason, time.time())
            log.debug("inbox.waiting", reason=reason)

    def _signature(self, g: ib.Group, ref_entries: dict[str, ib.Entry | None]) -> tuple[Any, ...]:
        return (tuple(sorted((e.name, e.size, e.mtime_ns, e.kind) for e in g.entries.values()))
                + tuple(sorted((n, e.size, e.mtime_ns, e.kind) if e else (n, -1, -1, "missing")
                               for n, e in ref_entries.items())))

    def _defer(self, stem: str, signature: tuple[Any, ...]) -> None:
        """Look at this stem again after a back-off (a refusal that could not be written, files that
        another process should move)."""
        prev = self.retry.get(stem)
        backoff = _REFUSE_RETRY_S if prev is None else min(prev.backoff * 2, _REFUSE_RETRY_MAX_S)
        self.retry[stem] = _Retry(signature, time.monotonic() + backoff, backoff)
        self._recheck_at(time.monotonic() + backoff)

    def _ref_entries(self, g: ib.Group) -> dict[str, ib.Entry | None]:
        """The files a group's sidecar names (None where missing); names that are not bare are
        left to prepare() to refuse."""
        out: dict[str, ib.Entry | None] = {}
        for key, name in self._sidecar_refs(g):
            try:
                ib.check_bare_name(key, name)
            except InputError:
                continue
            out[name] = ib.stat_entry(self.config.paths.inbox, name)
        return out

    def _consider(self, g: ib.Group, now: float) -> None:
        cfg = self.config
        inbox = cfg.paths.inbox
        parts = ib.parts_of(g)
        ref_entries = self._ref_entries(g)
        signature = self._signature(g, ref_entries)
        retry = self.retry.get(g.stem)
        if retry is not None and retry.signature == signature and now < retry.at:
            return  # its refusal could not be written; tried again after the back-off
        known = self.known.get(g.stem)
        if known is not None and known.signature == signature:
            # This exact state was handled already; look again only once the job it waited on ended.
            if known.job_id is not None:
                job_id = known.job_id
                job = self._db(lambda: self.store.get(job_id), "reading a job")
                if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                    self._ingest(known.prepared, signature)
            return
        stable_for = self.tracker.observe(g.stem, signature, now)
        marker = parts.marker is not None
        if cfg.jobs.ready_marker == "required" and not marker:
            self._wait(g.stem, f"waiting for {g.stem}.ready (jobs.ready_marker = required)", now)
            return
        window = cfg.watch.stable_window_s
        if not marker and stable_for < window:
            self._wait(g.stem, "settling: files changed less than stable_window_s ago", now)
            self._recheck_at(now + min(cfg.watch.poll_interval_s, window - stable_for))
            return
        missing = list(parts.missing)
        if cfg.jobs.sidecar == "required" and parts.sidecar is None:
            missing.append(f"a sidecar {g.stem}.yaml (jobs.sidecar = required)")
        missing += [f"{n} (named in the sidecar)" for n, e in ref_entries.items() if e is None]
        limit = cfg.watch.incomplete_after_s
        if missing and parts.problem is None:
            if not marker and stable_for < limit:
                self._wait(g.stem, f"incomplete: missing {' and '.join(missing)}", now)
                self._recheck_at(now + limit - stable_for)
                return
            self._reject(g, ref_entries, f"stem '{g.stem}' is missing {' and '.join(missing)}", signature)
            return
        try:
            prepared = ib.prepare(inbox, g.stem, parts, defaults=cfg.render, identity=self.identity,
                                  limits=self.limits)
        except ib.StillWriting as exc:
            # A header that promises more than the file holds: a writer that paused. Wait for the
            # rest up to incomplete_after_s (from the last change), then refuse as truncated.
            if stable_for < limit:
                self._wait(g.stem, f"incomplete: {ib.one_line(str(exc))}", now)
                self._recheck_at(now + min(cfg.watch.poll_interval_s * 10, limit - stable_for))
                return
            self._reject(g, ref_entries, ib.one_line(str(exc)), signature)
            return
        except InputError as exc:
            self._reject(g, ref_entries, ib.one_line(str(exc)), signature)
            return
        self.waiting.pop(g.stem, None)
        self._ingest(prepared, signature)

    def _files_unchanged(self, prepared: ib.Prepared) -> bool:
        inbox = self.config.paths.inbox
        for name, size, mtime_ns in prepared.signature:
            e = ib.stat_entry(inbox, name)
            if e is None or e.kind != "file" or (e.size, e.mtime_ns) != (size, mtime_ns):
                return False
        return True

    def _ingest(self, prepared: ib.Prepared, signature: tuple[Any, ...]) -> None:
        cfg = self.config
        stem = prepared.stem
        with self.files_lock:
            if not self._files_unchanged(prepared):
                self.tracker.forget(stem)  # changed while hashing: start the stability clock again
                self.known.pop(stem, None)
                return
            existing = self._db(lambda: self.store.by_fingerprint(prepared.fingerprint), "looking up a fingerprint")
            if existing is None:
                job, created = self._db(lambda: self.store.add(
                    fingerprint=prepared.fingerprint, stem=stem, inputs=prepared.inputs, params=prepared.params,
                    identity=self.identity, max_attempts=cfg.jobs.max_attempts), "queueing a job")
                self.known[stem] = _Known(signature, prepared, job.id)
                if created:
                    log.info("job.queued", job_id=job.id, files=prepared.names)
                    self.wake_worker()
                return
            self.known[stem] = _Known(signature, prepared, self._existing(existing, prepared, signature))

    def _existing(self, job: Job, prepared: ib.Prepared, signature: tuple[Any, ...]) -> int | None:
        """Carry out the re-drop decision (daemon/redrop.py) for files with the fingerprint of job
        ``job``. Returns the id of the job to wait on when it is (again) queued or running."""
        cfg = self.config
        recorded = tuple(sorted((str(i["name"]), int(i["size"]), int(i["mtime_ns"])) for i in job.inputs))
        what = decide(job.status, same_files=recorded == prepared.signature, redo_finished=cfg.jobs.redo_finished)
        if what is Redrop.WAIT:
            if prepared.stem != job.stem:
                log.info("job.duplicate", job_id=job.id, reason=f"same inputs as {job.status.value} job {job.id}")
            return job.id
        if what is Redrop.RENDER_AGAIN:
            return self._requeue(job, prepared, "dropped again (jobs.redo_finished = render)")
        if what is Redrop.SKIP:
            # No row is won here: only the ingest leader moves these files, checked right before.
            if not self.is_leader():
                return None
            try:
                where = fl.dispose_after_success(
                    cfg.paths.inbox, prepared.inputs, None, after_success=cfg.jobs.after_success,
                    archive_root=cfg.paths.archive, stem=prepared.stem, job_id=job.id, settled_in=cfg.paths.settled)
            except OSError as exc:
                log.error("job.archive_failed", job_id=job.id, error=str(exc), hint="tried again later")
                return None
            log.info("job.skipped", job_id=job.id, outputs=job.outputs.get("mp4"), inputs=where,
                     reason=f"already rendered as job {job.id} (jobs.redo_finished = skip)")
            return None
        if what is Redrop.LEAVE:
            if self._unmoved(job, prepared.stem, signature):
                return job.id  # looked at again, after a back-off, until its files are moved
            log.warning("job.left_in_inbox", job_id=job.id, reason=job.error,
                        hint=f"run 'infinitetalkd retry {job.id}'")
            return None
        return self._requeue(job, prepared, f"dropped again after it was {job.status.value}")

    def _unmoved(self, job: Job, stem: str, signature: tuple[Any, ...]) -> bool:
        """Whether the database ended ``job`` (refused, failed, cancelled) and nobody moved its files,
        still in the inbox. The process that won the row moves them right after, unless it died or
        was cut off: once the row is older than ``jobs.lease_s`` (a winner still alive has lost
        every lease by then) the leader moves them itself (docs/daemon.md §4.3). Until they are gone
        the stem is looked at again after a back-off."""
        if job.failed_dir is not None or job.finished_at is None or self.move_to_failed is None:
            return False
        lease_s = self.config.jobs.lease_s
        if stem not in self.retry:
            log.info("job.unmoved", job_id=job.id, hint=f"its files go to failed/ as soon as the process that "
                     f"ended it moves them, or by the ingest leader {lease_s:g} s (jobs.lease_s) after it ended")
        if self._db(self.store.db_time, "reading the database clock") - job.finished_at > lease_s:
            log.warning("job.orphan_moved", job_id=job.id, reason="its files were still in the inbox long after the "
                        "database ended it: the process that ended it died or was cut off before moving them")
            self.move_to_failed([job])
        self._defer(stem, signature)
        return True

    def _requeue(self, job: Job, prepared: ib.Prepared, reason: str) -> int | None:
        try:
            new = self._db(lambda: self.store.requeue_finished(job, stem=prepared.stem, inputs=prepared.inputs,
                                                               max_attempts=self.config.jobs.max_attempts),
                           "requeueing a job")
        except StaleJob:
            return None
        log.info("job.requeued", job_id=new.id, reason=reason)
        self.wake_worker()
        return new.id

    def _reject(self, g: ib.Group, refs: dict[str, ib.Entry | None], reason: str,
                signature: tuple[Any, ...]) -> None:
        """Refuse a group: failed/<stem>/ gets its files, error.txt and a log; the job table a row.

        All or nothing: when failed/ cannot be written (full disk, permissions) the row is deleted
        again, the files stay in the inbox, and the stem is looked at again after a back-off."""
        cfg = self.config
        inbox = cfg.paths.inbox
        names = sorted(g.entries) + sorted(n for n, e in refs.items() if e is not None and n not in g.entries)
        with self.files_lock:
            present = [ib.stat_entry(inbox, n) for n in names]
            inputs: list[dict[str, Any]] = [{"role": "input", "name": e.name, "size": e.size, "mtime_ns": e.mtime_ns}
                                            for e in present if e is not None]
            if not inputs:
                return
            key = rejection_key(g.stem, inputs)
            job, created = self._db(lambda: self.store.reject(key, stem=g.stem, inputs=inputs, error=reason),
                                    "refusing")
            if not created:  # another ingester (a former leader) refused these very files: its move
                self._unmoved(job, g.stem, signature)
                self.tracker.forget(g.stem)
                return
            try:
                dest = fl.to_failed(cfg.paths.failed, g.stem, job.id, inbox, inputs, reason,
                                    settled_in=cfg.paths.settled)
            except OSError as exc:
                self._db(lambda: self.store.delete(job.id), "undoing a refusal")
                if g.stem not in self.retry:
                    log.error("job.reject_move_failed", error=str(exc), reason=reason,
                              hint="the files stay in the inbox; tried again later")
                self._defer(g.stem, signature)
                return
            with structlog.contextvars.bound_contextvars(job_id=job.id), \
                    job_log(dest / ob.fit_name(g.stem, ".log"), job.id):
                log.warning("job.rejected", reason=reason, files=[i["name"] for i in inputs])
            self._db(lambda: self.store.set_failed_dir(job.id, str(dest)), "refusing")
        if self.on_reject is not None:
            self.on_reject()
        self.retry.pop(g.stem, None)
        self.tracker.forget(g.stem)
        self.waiting.pop(g.stem, None)

    # -- status file --------------------------------------------------------------------------

    def _write_status(self) -> None:
        """state/inbox.json: why each stem waits, for `infinitetalkd status`."""
        doc = {
            "updated_at": time.time(),
            "inbox": str(self.config.paths.inbox),
            "inbox_missing": self.watch.missing,
            "fstype": self.watch.fstype,
            "watch_mode": self.watch.mode,
            "waiting": [{"stem": s, "reason": w.reason, "since": w.since} for s, w in sorted(self.waiting.items())],
        }
        if self.leading is not None and self.is_leader():
            # a fleet: the waiting list lives in the database for every host's status (written by the
            # leader only: a cut-off former leader must not replace the new one's)
            now = time.time()
            waiting = {s: (w.reason, now - w.since) for s, w in self.waiting.items()}
            try:
                self.store.set_waiting(self.name, waiting)
            except Exception as exc:  # noqa: BLE001 - a status report; the next pass writes it again
                log.warning("status.waiting_failed", error=str(exc))
        statefiles.write(self.config.paths.state, statefiles.INBOX, doc)
