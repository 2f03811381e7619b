"""Watching the inbox: watchdog events are hints, full scans are the truth (daemon.md section 3).

The :class:`Scanner` runs on its own thread. It lists the inbox at start, whenever a watchdog event
wakes it, every ``poll_interval_s`` while something is settling (or always, in poll mode), and at
least every ``rescan_interval_s``. For each stem it tracks stability, validates, fingerprints and
inserts a queued job, or moves refused inputs to failed/ with a one-line reason.

In poll mode (configured, or ``auto`` on a network filesystem, where inotify never sees other
machines' writes) no watchdog observer runs at all: the scan itself is the poll. An inbox that
disappears (NAS unmounted) is logged and checked every poll interval; when it comes back, or is
remounted (device/inode changed), the observer is started again.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from daemon import inbox as ib
from daemon import outbox as ob
from daemon.config import Config
from daemon.jobs import Job, JobStatus
from daemon.log import get_logger, job_log
from daemon.store import StaleJob, Store
from engine.api import InputError

__all__ = ["Scanner", "filesystem_type", "is_network_fs", "watch_mode", "dispose_inputs"]

log = get_logger("infinitetalkd.watcher")

# Filesystems where inotify does not report changes made by other machines (inotify(7)).
_NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "davfs", "sshfs", "virtiofs", "vboxsf", "vmhgfs", "prl_fs", "ocfs2", "gfs2", "orangefs",
})


def filesystem_type(path: Path) -> str:
    """The filesystem type holding ``path``, from /proc/self/mountinfo (longest mount-point prefix)."""
    target = str(path.resolve())
    best, best_len = "unknown", -1
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > best_len:
            best, best_len = right.split()[0], len(mount)
    return best


def is_network_fs(fstype: str) -> bool:
    # FUSE filesystems (sshfs, rclone, s3fs, ...) are treated as remote: inotify sees only local writes.
    return fstype in _NETWORK_FS or fstype.startswith("fuse.") or fstype == "fuse"


def watch_mode(configured: str, fstype: str) -> str:
    """The mode a configuration implies on a filesystem: 'inotify' or 'poll'."""
    if configured == "auto":
        return "poll" if is_network_fs(fstype) else "inotify"
    return configured


class _Hint(FileSystemEventHandler):
    """Runs on watchdog's thread: only wakes the scanner (records nothing, decides nothing)."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.wake.set()


def dispose_inputs(config: Config, stem: str, job_id: int, paths: list[Path]) -> str:
    """After success: move the inputs to archive/<stem>/ or delete them (jobs.after_success)."""
    paths = [p for p in paths if os.path.lexists(p)]
    if not paths:
        return "already gone"
    if config.jobs.after_success == "delete":
        for p in paths:
            p.unlink()
        return "deleted"
    dest = ob.unique_dir(config.paths.archive, stem, job_id)
    ob.move_files(paths, dest)
    return str(dest)


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


class Scanner:
    """Turns inbox files into queued jobs. ``wake_worker`` is called after a job was queued.

    ``files_lock`` is shared with the worker: whoever moves a job's inputs holds it, and both sides
    re-check the database and the files while holding it.
    """

    def __init__(self, config: Config, store: Store, identity: str, *, files_lock: threading.Lock,
                 wake_worker: Callable[[], None], on_reject: Callable[[], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.identity = identity
        self.files_lock = files_lock
        self.wake_worker = wake_worker
        self.on_reject = on_reject
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self.tracker = ib.StabilityTracker()
        self.known: dict[str, _Known] = {}  # stem -> the state already handled
        self.waiting: dict[str, _Wait] = {}
        self._refs_cache: dict[str, tuple[tuple[int, int], list[tuple[str, str]]]] = {}
        self.inbox_missing = False
        self._inbox_ident: tuple[int, int] | None = None
        self.fstype = "unknown"
        self.mode = "poll"
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
        self._stop_observer()

    def alive(self) -> bool:
        """The scanner thread runs and finished a cycle recently (feeds the systemd watchdog)."""
        limit = 2 * self.config.watch.rescan_interval_s + 120
        return (self._thread is not None and self._thread.is_alive()
                and time.monotonic() - self.last_cycle < limit)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:  # the scanner must outlive any one bad pass; the next pass retries
                log.exception("scan.failed")
            self.last_cycle = time.monotonic()
            self.wake.wait(self._timeout())
            self.wake.clear()

    def _timeout(self) -> float:
        w = self.config.watch
        if self.mode == "poll" or self.inbox_missing:
            return w.poll_interval_s
        timeout = w.rescan_interval_s
        if self._next_check is not None:
            timeout = min(timeout, max(0.05, self._next_check - time.monotonic()))
        return timeout

    # -- observer and inbox presence ----------------------------------------------------------

    def _stop_observer(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=10)
            except Exception:  # a dead watch on a vanished mount may refuse to stop cleanly
                log.warning("watcher.stop_failed", exc_info=True)

    def _start_observer(self) -> None:
        self._stop_observer()
        inbox = self.config.paths.inbox
        self.fstype = filesystem_type(inbox)
        self.mode = watch_mode(self.config.watch.mode, self.fstype)
        if self.mode == "inotify":
            try:
                obs = Observer()
                obs.schedule(_Hint(self.wake), str(inbox), recursive=False)
                obs.daemon = True
                obs.start()
                self._observer = obs
            except OSError as exc:  # ENOSPC: inotify watch limit; EMFILE: instance limit
                log.error("watcher.failed", error=str(exc), fallback="poll",
                          hint="raise fs.inotify.max_user_watches / max_user_instances")
                self.mode = "poll"
        log.info("watcher.started", inbox=str(inbox), fstype=self.fstype, mode=self.mode,
                 configured=self.config.watch.mode)

    def _check_inbox(self) -> bool:
        inbox = self.config.paths.inbox
        try:
            st = os.stat(inbox)
            ok = stat.S_ISDIR(st.st_mode)
        except OSError:
            ok = False
        if not ok:
            if not self.inbox_missing:
                log.error("inbox.missing", inbox=str(inbox),
                          hint=f"is the share mounted? checking again every {self.config.watch.poll_interval_s:g} s")
                self._stop_observer()
            self.inbox_missing = True
            return False
        ident = (st.st_dev, st.st_ino)
        if self.inbox_missing:
            log.warning("inbox.back", inbox=str(inbox))
        elif self._inbox_ident is not None and ident != self._inbox_ident:
            log.warning("inbox.remounted", inbox=str(inbox))
        elif self._observer is not None and not self._observer.is_alive():
            log.error("watcher.died", inbox=str(inbox))
        elif self._inbox_ident is not None:
            return True
        self.inbox_missing = False
        self._inbox_ident = ident
        self._start_observer()
        return True

    # -- scanning -----------------------------------------------------------------------------

    def scan_once(self) -> None:
        """One full pass over the inbox."""
        if not self._check_inbox():
            self._write_status()
            return
        now = time.monotonic()
        try:
            entries = ib.list_inbox(self.config.paths.inbox)
        except OSError as exc:  # e.g. EIO / ESTALE on a dropped share: treat as gone for now
            log.error("inbox.unreadable", error=str(exc))
            self._inbox_ident = None
            self._stop_observer()
            self.inbox_missing = True
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
        self._next_check = None
        for stem in sorted(groups):
            if self._stop.is_set():
                break
            with structlog.contextvars.bound_contextvars(stem=stem):
                self._consider(groups[stem], now)
        self._write_status()

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
        with contextlib.suppress(InputError):  # reported by prepare() once the files are stable
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

    def _consider(self, g: ib.Group, now: float) -> None:
        cfg = self.config
        inbox = cfg.paths.inbox
        parts = ib.parts_of(g)
        refs = self._sidecar_refs(g)
        ref_entries: dict[str, ib.Entry | None] = {}
        for key, name in refs:
            try:
                ib.check_bare_name(key, name)
            except InputError:
                continue
            ref_entries[name] = ib.stat_entry(inbox, name)
        signature = (tuple(sorted((e.name, e.size, e.mtime_ns, e.kind) for e in g.entries.values()))
                     + tuple(sorted((n, e.size, e.mtime_ns, e.kind) if e else (n, -1, -1, "missing")
                                    for n, e in ref_entries.items())))
        known = self.known.get(g.stem)
        if known is not None and known.signature == signature:
            # This exact state was handled already; look again only once the job it waited on ended.
            if known.job_id is not None:
                job = self.store.get(known.job_id)
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
        if missing and parts.problem is None:
            reason = f"stem '{g.stem}' is missing {' and '.join(missing)}"
            limit = cfg.watch.incomplete_after_s
            if not marker and stable_for < limit:
                self._wait(g.stem, f"incomplete: missing {' and '.join(missing)}", now)
                self._recheck_at(now + limit - stable_for)
                return
            self._reject(g, ref_entries, reason, signature)
            return
        try:
            prepared = ib.prepare(inbox, g.stem, parts, defaults=cfg.render, identity=self.identity,
                                  limits=self.limits)
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
            existing = self.store.by_fingerprint(prepared.fingerprint)
            if existing is None:
                job, created = self.store.add(fingerprint=prepared.fingerprint, stem=stem, inputs=prepared.inputs,
                                              params=prepared.params, identity=self.identity,
                                              max_attempts=cfg.jobs.max_attempts)
                self.known[stem] = _Known(signature, prepared, job.id)
                if created:
                    log.info("job.queued", job_id=job.id, files=prepared.names)
                    self.wake_worker()
                return
            self.known[stem] = _Known(signature, prepared, self._existing(existing, prepared))

    def _existing(self, job: Job, prepared: ib.Prepared) -> int | None:
        """The same inputs + params (+ engine) as job ``job`` are in the inbox. Returns the id of
        the job to wait on when it is (again) queued or running."""
        cfg = self.config
        stem = prepared.stem
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            if stem != job.stem:
                log.info("job.duplicate", job_id=job.id, reason=f"same inputs as {job.status.value} job {job.id}")
            return job.id
        recorded = tuple(sorted((str(i["name"]), int(i["size"]), int(i["mtime_ns"])) for i in job.inputs))
        if job.status is JobStatus.DONE:
            if cfg.jobs.redo_finished == "render":
                return self._requeue(job, prepared, "dropped again (jobs.redo_finished = render)")
            where = dispose_inputs(cfg, stem, job.id, [cfg.paths.inbox / n for n in prepared.names])
            log.info("job.skipped", job_id=job.id, outputs=job.outputs.get("mp4"), inputs=where,
                     reason=f"already rendered as job {job.id} (jobs.redo_finished = skip)")
            return None
        if recorded == prepared.signature:
            # The very files of a failed job that kept its inputs (disk full): wait for `retry`.
            log.warning("job.left_in_inbox", job_id=job.id, reason=job.error,
                        hint=f"run 'infinitetalkd retry {job.id}'")
            return None
        return self._requeue(job, prepared, f"dropped again after it was {job.status.value}")

    def _requeue(self, job: Job, prepared: ib.Prepared, reason: str) -> int | None:
        try:
            new = self.store.requeue_finished(job, stem=prepared.stem, inputs=prepared.inputs,
                                              max_attempts=self.config.jobs.max_attempts)
        except StaleJob:
            return None
        log.info("job.requeued", job_id=new.id, reason=reason)
        self.wake_worker()
        return new.id

    def _reject(self, g: ib.Group, refs: dict[str, ib.Entry | None], reason: str,
                signature: tuple[Any, ...]) -> None:
        """Refuse a group: failed/<stem>/ gets its files, error.txt and a log; the job table a row."""
        cfg = self.config
        inbox = cfg.paths.inbox
        names = sorted(g.entries) + sorted(n for n, e in refs.items() if e is not None and n not in g.entries)
        with self.files_lock:
            present = [ib.stat_entry(inbox, n) for n in names]
            inputs = [{"role": "input", "name": e.name, "size": e.size, "mtime_ns": e.mtime_ns}
                      for e in present if e is not None]
            if not inputs:
                return
            job = self.store.add_rejected(stem=g.stem, inputs=inputs, error=reason)
            dest = ob.unique_dir(cfg.paths.failed, g.stem, job.id)
            with structlog.contextvars.bound_contextvars(job_id=job.id), job_log(dest / f"{g.stem}.log", job.id):
                log.warning("job.rejected", reason=reason, files=[i["name"] for i in inputs])
            try:
                ob.move_files([inbox / str(i["name"]) for i in inputs], dest)
                ob.write_error(dest, reason)
            except OSError as exc:  # e.g. no write permission on the inbox: say so, do not loop
                log.error("job.reject_move_failed", job_id=job.id, error=str(exc), reason=reason)
                return
            self.store.set_failed_dir(job.id, str(dest))
        if self.on_reject is not None:
            self.on_reject()
        self.tracker.forget(g.stem)
        self.waiting.pop(g.stem, None)

    # -- status file --------------------------------------------------------------------------

    def _write_status(self) -> None:
        """state/inbox.json: why each stem waits, for `infinitetalkd status`."""
        doc = {
            "updated_at": time.time(),
            "inbox": str(self.config.paths.inbox),
            "inbox_missing": self.inbox_missing,
            "fstype": self.fstype,
            "watch_mode": self.mode,
            "waiting": [{"stem": s, "reason": w.reason, "since": w.since} for s, w in sorted(self.waiting.items())],
        }
        path = self.config.paths.state / "inbox.json"
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("status_file.failed", error=str(exc))
