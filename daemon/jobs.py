"""The job record: status enum, the SQLAlchemy table, and a plain snapshot for the rest of the code.

Lifecycle::

    queued --claim--> running --> done
       ^                 | ^ \\--> failed      (bad input, render error, out of memory, N crashes)
       |                 | |  \\-> cancelled   (``infinitetalkd cancel``; stops at the next step)
       +---- requeue ----+ +-- claim again: its lease expired (the holder died; attempts + 1)
    (requeue: SIGTERM refunds the attempt; a crash or device fault uses it)
    failed / cancelled --retry or re-drop--> queued

``attempts`` counts started renders and is incremented by the claim itself, so a job that kills
the process still uses up an attempt. A ``running`` job whose lease ran out (on the database clock)
is claimed again by another worker (attempts + 1), or failed by the sweeper when none are left.
Every status change is one entry of :data:`TRANSITIONS`; only :mod:`daemon.store` reads or writes
this table, and it does so through those entries.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["JobStatus", "Base", "JobRow", "SchemaMeta", "Job", "TERMINAL", "Transition", "TRANSITIONS",
           "rejection_key"]


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)

# Columns put back to their initial value when a job (re)enters the queue.
_FRESH: Mapping[str, Any] = {
    "worker_id": None, "lease_until": None, "started_at": None, "finished_at": None, "error": None,
    "failed_dir": None, "progress": 0.0, "progress_text": "", "attempts": 0, "cancel_requested": False,
    "chunks_rendered": 0, "resumed_from_chunk": None,
}


@dataclass(frozen=True)
class Transition:
    """One allowed change of a job row: from which statuses, to which (None: unchanged), which
    columns the caller may give values (``sets``), and which are reset to fixed values (``resets``).
    Columns in neither keep their value; the store's guarded UPDATE refuses anything else."""

    name: str
    sources: frozenset[JobStatus]
    target: JobStatus | None
    sets: frozenset[str]
    resets: Mapping[str, Any] = field(default_factory=dict)

    def values(self, **given: Any) -> dict[str, Any]:
        """The SET clause: ``given`` (checked against ``sets``), the resets, and the new status."""
        extra = set(given) - self.sets
        if extra:
            raise ValueError(f"transition {self.name} does not set {sorted(extra)}")
        out = {**self.resets, **given}
        if self.target is not None:
            out["status"] = self.target.value
        return out


def _t(name: str, sources: tuple[JobStatus, ...], target: JobStatus | None, sets: str,
       resets: Mapping[str, Any] | None = None) -> Transition:
    return Transition(name, frozenset(sources), target, frozenset(sets.split() + ["updated_at"]), dict(resets or {}))


_Q, _R, _D, _F, _C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)
_CLEAR = {"progress": 0.0, "progress_text": "", "error": None}
_UNLEASE = {"worker_id": None, "lease_until": None}
_FINISH = "error outputs timings failed_dir finished_at progress progress_text chunks_rendered"

TRANSITIONS: Mapping[str, Transition] = {t.name: t for t in (
    # queued -> running, or a running job whose lease expired (the store adds that condition):
    # a new attempt for a new holder; the previous holder's fence (worker, attempts) no longer matches.
    _t("claim", (_Q, _R), _R, "worker_id attempts lease_until heartbeat_at started_at",
       {**_CLEAR, "resumed_from_chunk": None}),
    _t("heartbeat", (_R,), None, "lease_until heartbeat_at progress progress_text"),
    # a chunk finished (or the attempt resumed after a checkpoint): the counts that survive a kill -9
    _t("chunks", (_R,), None, "chunks_rendered resumed_from_chunk"),
    _t("done", (_R,), _D, _FINISH, {"lease_until": None}),
    _t("fail", (_R,), _F, _FINISH, {"lease_until": None}),
    _t("cancel_running", (_R,), _C, _FINISH, {"lease_until": None}),
    # running -> queued by its holder (SIGTERM, device fault) or at its own worker's restart.
    _t("requeue", (_R,), _Q, "attempts error", {**_UNLEASE, "progress": 0.0, "progress_text": ""}),
    # running -> failed when no attempt is left (recovery at start, the sweeper).
    _t("give_up", (_R,), _F, "error finished_at", _UNLEASE),
    _t("cancel_queued", (_Q,), _C, "error failed_dir finished_at"),
    _t("request_cancel", (_Q, _R), None, "cancel_requested"),
    _t("retry", (_F, _C), _Q, "", _FRESH),
    _t("redrop", (_D, _F, _C), _Q, "stem inputs max_attempts created_at", _FRESH),
)}


def rejection_key(stem: str, inputs: list[dict[str, Any]]) -> str:
    """A deterministic key for a refused drop (the same files seen by two ingesters give one key):
    sha256 over the stem and each file's role, name, size and mtime, as the scanner recorded them."""
    fields = ("role", "name", "size", "mtime_ns")
    doc = [stem, sorted([str(i.get(k, "")) for k in fields] for i in inputs)]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class SchemaMeta(Base):
    """One row: the schema version the migrations brought this database to."""

    __tablename__ = "schema_meta"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # sha256 over input bytes + render params + engine identity: the same drop twice is one job.
    # Inputs refused at ingest get "rejected:<rejection_key>" (one row per bad drop, whoever saw it).
    fingerprint: Mapped[str] = mapped_column(String(80), unique=True, nullable=False)
    stem: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # Lease: the claiming worker's name and until when (database clock) its claim holds without a heartbeat.
    worker_id: Mapped[str | None] = mapped_column(String(255), index=True)
    lease_until: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    # Timestamps: Unix seconds from the database clock (portable across SQLite and PostgreSQL).
    created_at: Mapped[float] = mapped_column(Float, nullable=False)
    updated_at: Mapped[float] = mapped_column(Float, nullable=False)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    # inputs: [{"role", "name", "size", "mtime_ns", "sha256"}]; params: RenderRequest.params().
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    engine_identity: Mapped[str] = mapped_column(Text, nullable=False, default="")
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    progress_text: Mapped[str] = mapped_column(Text, nullable=False, default="")
    error: Mapped[str | None] = mapped_column(Text)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    failed_dir: Mapped[str | None] = mapped_column(Text)
    # Resume (docs/daemon.md §4.8): chunks rendered to completion over all attempts of this queueing, and the
    # first chunk (0-based) the latest attempt rendered after a checkpoint (None: it started at chunk 0).
    chunks_rendered: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    resumed_from_chunk: Mapped[int | None] = mapped_column(Integer)
    # A redo (``infinitetalkd redo``): the finished job it re-renders from chunk ``redo_from_chunk`` with
    # ``redo_seed``. ``inputs_dir``: where the job's inputs are when not in the inbox (a redo's own copy).
    redo_of: Mapped[int | None] = mapped_column(Integer)
    redo_from_chunk: Mapped[int | None] = mapped_column(Integer)
    redo_seed: Mapped[int | None] = mapped_column(BigInteger)
    inputs_dir: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class Job:
    """A snapshot of one row, detached from any session."""

    id: int
    fingerprint: str
    stem: str
    status: JobStatus
    attempts: int
    max_attempts: int
    cancel_requested: bool
    worker_id: str | None
    lease_until: float | None
    heartbeat_at: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    inputs: list[dict[str, Any]]
    params: dict[str, Any]
    engine_identity: str
    progress: float
    progress_text: str
    error: str | None
    outputs: dict[str, Any]
    timings: dict[str, Any]
    failed_dir: str | None
    chunks_rendered: int = 0
    resumed_from_chunk: int | None = None
    redo_of: int | None = None
    redo_from_chunk: int | None = None
    redo_seed: int | None = None
    inputs_dir: str | None = None

    @property
    def rejected(self) -> bool:
        """Refused at ingest (never rendered; no content fingerprint)."""
        return self.fingerprint.startswith("rejected:")
