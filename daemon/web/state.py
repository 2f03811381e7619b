"""What the page and the API read: the job store, ``state/inbox.json``, the settings table.

The store is opened lazily and kept; while it cannot be read (no database yet, locked past the
short busy timeout, a server that is down) every read raises :class:`Unavailable` with the reason,
which the API answers with 503 and the page shows in a banner, and the next request tries again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from daemon.config import Config
from daemon.db import StoreConfigError
from daemon.instance import stale_after
from daemon.jobs import Job, JobStatus
from daemon.store import Store, StoreError
from daemon.store_fleet import WorkerInfo
from engine.settings import form_fields

__all__ = ["Unavailable", "StoreAccess", "job_doc", "workers", "daemon_seen", "read_inbox_status",
           "settings_fields", "Snapshot", "snapshot"]

# The web process reads while the daemon writes; a read that waits longer than this reports the
# database as busy instead of hanging the page.
BUSY_TIMEOUT_MS = 2000


class Unavailable(RuntimeError):
    """The job store cannot be read right now; the message says why."""


def open_store(cfg: Config) -> Store:
    """The one place that knows where the job store is (the fleet's PostgreSQL URL goes here)."""
    db = cfg.paths.database
    if cfg.store.url is None and not db.exists():
        raise Unavailable(f"no job database at {db} yet (start the daemon: infinitetalkd run)")
    try:
        return Store.connect(cfg.store.model_copy(update={"busy_timeout_s": BUSY_TIMEOUT_MS / 1000}), db)
    except StoreConfigError as exc:
        raise Unavailable(str(exc)) from None


class StoreAccess:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._store: Store | None = None
        self._lock = threading.Lock()

    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                try:
                    self._store = open_store(self.cfg)
                except (StoreError, SQLAlchemyError, OSError) as exc:
                    raise Unavailable(_reason(exc)) from None
            return self._store

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(store, ...)``, with database errors turned into :class:`Unavailable`."""
        store = self.store()
        try:
            return fn(store, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise Unavailable(_reason(exc)) from None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return " ".join(text.split())[:300] or type(exc).__name__


def job_doc(j: Job) -> dict[str, Any]:
    """A job as the API shows it (daemon.web.app.JobOut describes the fields)."""
    return {
        "id": j.id, "stem": j.stem, "status": j.status.value, "attempts": j.attempts, "max_attempts": j.max_attempts,
        "progress": round(j.progress, 4), "progress_text": j.progress_text, "cancel_requested": j.cancel_requested,
        "error": j.error, "outputs": dict(j.outputs), "worker": j.worker_id, "created_at": j.created_at,
        "started_at": j.started_at, "finished_at": j.finished_at, "rejected": j.rejected,
        "params": {k: v for k, v in j.params.items() if k not in ("audio", "image", "video", "masks")},
        "resumed_from_chunk": j.resumed_from_chunk, "chunks_rendered": j.chunks_rendered, "redo_of": j.redo_of,
    }


def workers(cfg: Config, snap: Snapshot) -> list[dict[str, Any]]:
    """The live workers of the registry (not stopped, heartbeat younger than the stale limit): name,
    device, GPU model, job, heartbeat age and pause reason."""
    stems, stale_s = {j.id: j.stem for j in snap.running}, stale_after(cfg)
    return [{"name": w.name, "device": w.device, "gpu": w.gpu if w.gpu != w.device else None, "job_id": w.job_id,
             "stem": stems.get(w.job_id) if w.job_id is not None else None, "heartbeat_age_s": round(w.age_s, 1),
             "paused": w.paused} for w in snap.workers if w.state(stale_s) == "live"]


def read_inbox_status(cfg: Config) -> dict[str, Any]:
    """The scanner's ``state/inbox.json`` (waiting stems and why); {} while it is absent or torn."""
    try:
        doc = json.loads((cfg.paths.state / "inbox.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def daemon_seen(cfg: Config, inbox: dict[str, Any], running: list[Job]) -> dict[str, Any]:
    """When the daemon last showed a sign of life: its inbox scan (at least every rescan_interval_s)
    or its running job's heartbeat. Older than two rescan intervals: it is probably stopped."""
    marks = [float(inbox["updated_at"])] if isinstance(inbox.get("updated_at"), (int, float)) else []
    marks += [j.heartbeat_at for j in running if j.heartbeat_at]
    if not marks:
        return {"seen_s_ago": None, "alive": False}
    ago = max(0.0, time.time() - max(marks))
    return {"seen_s_ago": round(ago, 1), "alive": ago <= 2 * cfg.watch.rescan_interval_s + 5}


def settings_fields(cfg: Config) -> list[dict[str, Any]]:
    """The submit form's settings: the documented keys (engine.settings.form_fields, from the one schema),
    with config.yaml's render defaults shown as the defaults. File settings are uploads instead."""
    return [{**f, "default": cfg.render.get(str(f["key"]), f["default"]), "min": f["minimum"], "max": f["maximum"]}
            for f in form_fields()]


@dataclass(frozen=True)
class Snapshot:
    counts: dict[str, int]
    running: list[Job]
    queued: list[Job]
    done: list[Job]
    failed: list[Job]  # failed and cancelled
    finished_version: str  # changes whenever a job finishes or is retried: the page reloads results
    workers: list[WorkerInfo]


def _read(store: Store) -> Snapshot:
    running = store.list_jobs([JobStatus.RUNNING], limit=20)
    queued = sorted(store.list_jobs([JobStatus.QUEUED], limit=50), key=lambda j: j.id)
    done = store.list_jobs([JobStatus.DONE], limit=12)
    failed = store.list_jobs([JobStatus.FAILED, JobStatus.CANCELLED], limit=12)
    counts = store.counts()
    marks = ",".join(f"{j.id}:{j.status.value}:{j.updated_at}" for j in (*done, *failed))
    return Snapshot(counts, running, queued, done, failed, hashlib.sha256(marks.encode()).hexdigest()[:16],
                    store.list_workers())


def snapshot(access: StoreAccess) -> Snapshot:
    result: Snapshot = access.call(_read)
    return result
