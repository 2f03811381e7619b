"""The job record: status enum, the SQLAlchemy table, and a plain snapshot for the rest of the code.

Lifecycle::

    queued --claim--> running --> done
       ^                 |   \\--> failed      (bad input, render error, out of memory, N crashes)
       |                 |    \\-> cancelled   (``infinitetalkd cancel``; stops at the next step)
       +---- requeue ----+   (SIGTERM: attempt refunded; crash or device fault: attempt used)
    failed / cancelled --retry or re-drop--> queued

``attempts`` counts started renders and is incremented by the claim itself, so a job that kills
the process still uses up an attempt. Only :mod:`daemon.store` reads or writes this table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["JobStatus", "Base", "JobRow", "SchemaMeta", "Job", "TERMINAL"]


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


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
    # Inputs refused at ingest get "rejected:<uuid>" (there is nothing trustworthy to hash).
    fingerprint: Mapped[str] = mapped_column(String(80), unique=True, nullable=False)
    stem: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # Lease: the claiming worker ("host:pid") and until when its claim holds without a heartbeat.
    worker_id: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    # Timestamps: Unix seconds (portable across SQLite and PostgreSQL, easy to compare).
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

    @property
    def rejected(self) -> bool:
        """Refused at ingest (never rendered; no content fingerprint)."""
        return self.fingerprint.startswith("rejected:")
