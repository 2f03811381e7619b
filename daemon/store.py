"""The only code that talks to the database (SQLAlchemy 2 Core over the table in jobs.py).

SQLite rules (daemon.md section 4): the file lives on a local disk; WAL; a busy timeout; every
transaction starts with ``BEGIN IMMEDIATE`` so a read-then-write never fails with "database is
locked" half-way; transactions are tiny and never held across GPU work.

Every status change is a guarded UPDATE that names the expected current status (and, for a running
job, the worker and attempt that claimed it: fencing) and checks that a row matched.

Portability: statements are plain SQLAlchemy Core. The dialect-specific part of claiming lives in
:func:`_claim_statement` (PostgreSQL adds ``FOR UPDATE SKIP LOCKED``); the SQLite connection
set-up lives in :func:`_sqlite_engine`.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.sql import Update

from daemon.jobs import TERMINAL, Base, Job, JobRow, JobStatus, SchemaMeta

__all__ = ["Store", "StoreError", "StaleJob", "SCHEMA_VERSION"]

_T = cast(Table, JobRow.__table__)
_META = cast(Table, SchemaMeta.__table__)


class StoreError(RuntimeError):
    """The database cannot be used (unreadable, or a schema newer than this program)."""


class StaleJob(RuntimeError):
    """A guarded update matched no row: the job is no longer in the state this worker holds."""


# --------------------------------------------------------------------------------------------
# Schema migrations. Each function brings the schema from version i to i + 1 inside one
# transaction. When migration 2 is added, freeze migration 1's DDL (today it is create_all of
# the current models) as literal Table definitions, and make migration 2 an ALTER.
# --------------------------------------------------------------------------------------------


def _migration_1(conn: Connection) -> None:
    Base.metadata.create_all(conn, tables=[_T])


_MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1]
SCHEMA_VERSION = len(_MIGRATIONS)


def _sqlite_engine(path: Path, busy_timeout_ms: int) -> Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would emit a deferred BEGIN
        # only before DML); _on_begin below emits BEGIN IMMEDIATE instead (SQLAlchemy's
        # documented pysqlite recipe, with IMMEDIATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Switching to WAL needs a moment alone with the file and does not wait on busy_timeout:
        # retry while another process (a CLI command, the daemon) creates or opens it too.
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                cur.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        cur.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; WAL keeps it consistent
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _claim_statement(dialect: str, worker_id: str, now: float, lease_s: float) -> Update:
    """UPDATE the oldest queued job to running and return it.

    SQLite: exclusivity comes from BEGIN IMMEDIATE (one writer at a time; SKIP LOCKED would mean
    nothing). PostgreSQL: the candidate row is locked with FOR UPDATE SKIP LOCKED so several
    hosts claim different jobs.
    """
    candidate = (
        select(_T.c.id)
        .where(_T.c.status == JobStatus.QUEUED.value, _T.c.cancel_requested.is_(False))
        .order_by(_T.c.id)
        .limit(1)
    )
    if dialect == "postgresql":
        candidate = candidate.with_for_update(skip_locked=True)
    return (
        update(_T)
        .where(_T.c.id == candidate.scalar_subquery(), _T.c.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.RUNNING.value, worker_id=worker_id, attempts=_T.c.attempts + 1,
                lease_until=now + lease_s, heartbeat_at=now, started_at=now, updated_at=now,
                progress=0.0, progress_text="", error=None)
        .returning(*_T.c)
    )


def _job(row: Row[Any]) -> Job:
    m = row._mapping
    data = {k: m[k] for k in Job.__dataclass_fields__}
    data["status"] = JobStatus(m["status"])
    data["cancel_requested"] = bool(m["cancel_requested"])
    data["progress"] = float(m["progress"])
    return Job(**data)


class Store:
    """Job persistence. Safe to share between threads (each call takes its own connection)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, database: Path | str, *, busy_timeout_ms: int = 10_000) -> Store:
        """Open (creating and migrating) a database: a file path for SQLite, or a SQLAlchemy URL."""
        if isinstance(database, Path):
            engine = _sqlite_engine(database, busy_timeout_ms)
        else:
            engine = create_engine(database)
        store = cls(engine)
        store._migrate()
        return store

    def close(self) -> None:
        self.engine.dispose()

    # -- schema -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self.engine.begin() as conn:
            Base.metadata.create_all(conn, tables=[_META])
            current = conn.execute(select(_META.c.version).where(_META.c.id == 1)).scalar()
            if current is None:
                conn.execute(insert(_META).values(id=1, version=0))
                current = 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the job database has schema version {current}, newer than this infinitetalkd "
                    f"({SCHEMA_VERSION}); upgrade infinitetalkd or point paths.state elsewhere"
                )
            for version in range(current, SCHEMA_VERSION):
                _MIGRATIONS[version](conn)
            conn.execute(update(_META).where(_META.c.id == 1).values(version=SCHEMA_VERSION))

    def schema_version(self) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(select(_META.c.version).where(_META.c.id == 1)).scalar_one())

    # -- reads --------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        with self.engine.begin() as conn:
            row = conn.execute(select(_T).where(_T.c.id == job_id)).first()
        return None if row is None else _job(row)

    def find(self, key: str) -> Job | None:
        """A job by id, or the newest job of that stem."""
        if key.isdigit():
            return self.get(int(key))
        with self.engine.begin() as conn:
            row = conn.execute(select(_T).where(_T.c.stem == key).order_by(_T.c.id.desc()).limit(1)).first()
        return None if row is None else _job(row)

    def by_fingerprint(self, fingerprint: str) -> Job | None:
        with self.engine.begin() as conn:
            row = conn.execute(select(_T).where(_T.c.fingerprint == fingerprint)).first()
        return None if row is None else _job(row)

    def list_jobs(self, statuses: Sequence[JobStatus] = (), limit: int = 50) -> list[Job]:
        stmt = select(_T).order_by(_T.c.id.desc()).limit(limit)
        if statuses:
            stmt = stmt.where(_T.c.status.in_([s.value for s in statuses]))
        with self.engine.begin() as conn:
            return [_job(r) for r in conn.execute(stmt)]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobStatus}
        with self.engine.begin() as conn:
            for status, n in conn.execute(select(_T.c.status, func.count()).group_by(_T.c.status)):
                out[str(status)] = int(n)
        return out

    def last_success(self) -> float | None:
        with self.engine.begin() as conn:
            value = conn.execute(
                select(func.max(_T.c.finished_at)).where(_T.c.status == JobStatus.DONE.value)
            ).scalar()
        return None if value is None else float(value)

    def cancel_requests(self) -> list[Job]:
        """Queued jobs whose cancellation was requested (the daemon finishes them off)."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(_T).where(_T.c.status == JobStatus.QUEUED.value,
                                                 _T.c.cancel_requested.is_(True)))
            return [_job(r) for r in rows]

    # -- ingest -------------------------------------------------------------------------------

    def add(self, *, fingerprint: str, stem: str, inputs: list[dict[str, Any]], params: dict[str, Any],
            identity: str, max_attempts: int) -> tuple[Job, bool]:
        """Insert a queued job unless its fingerprint exists. Returns (job, created)."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(_T).where(_T.c.fingerprint == fingerprint)).first()
                if row is not None:
                    return _job(row), False
                row = conn.execute(
                    insert(_T).values(fingerprint=fingerprint, stem=stem, status=JobStatus.QUEUED.value,
                                      attempts=0, max_attempts=max_attempts, cancel_requested=False,
                                      created_at=now, updated_at=now, inputs=inputs, params=params,
                                      engine_identity=identity, progress=0.0, progress_text="",
                                      outputs={}, timings={}).returning(*_T.c)
                ).one()
                return _job(row), True
        except IntegrityError:  # another process inserted it between our select and insert
            existing = self.by_fingerprint(fingerprint)
            if existing is None:
                raise
            return existing, False

    def add_rejected(self, *, stem: str, inputs: list[dict[str, Any]], error: str) -> Job:
        """Record inputs refused at ingest as a failed job, so status and metrics show them."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                insert(_T).values(fingerprint=f"rejected:{uuid.uuid4().hex}", stem=stem,
                                  status=JobStatus.FAILED.value, attempts=0, max_attempts=0,
                                  cancel_requested=False, created_at=now, updated_at=now, finished_at=now,
                                  inputs=inputs, params={}, engine_identity="", progress=0.0,
                                  progress_text="", error=error, outputs={}, timings={}).returning(*_T.c)
            ).one()
        return _job(row)

    def set_failed_dir(self, job_id: int, failed_dir: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(_T).where(_T.c.id == job_id).values(failed_dir=failed_dir))

    def requeue_finished(self, job: Job, *, stem: str, inputs: list[dict[str, Any]], max_attempts: int) -> Job:
        """A finished job's inputs were dropped again: queue it once more with fresh attempts."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                update(_T)
                .where(_T.c.id == job.id, _T.c.status == job.status.value)
                .values(status=JobStatus.QUEUED.value, stem=stem, inputs=inputs, attempts=0,
                        max_attempts=max_attempts, cancel_requested=False, error=None, failed_dir=None,
                        worker_id=None, lease_until=None, started_at=None, finished_at=None,
                        progress=0.0, progress_text="", created_at=now, updated_at=now)
                .returning(*_T.c)
            ).first()
        if row is None:
            raise StaleJob(f"job {job.id} changed while it was being requeued")
        return _job(row)

    # -- the worker's side --------------------------------------------------------------------

    def claim(self, worker_id: str, lease_s: float) -> Job | None:
        """Move the oldest queued job to running for ``worker_id``; None when the queue is empty."""
        with self.engine.begin() as conn:
            stmt = _claim_statement(self.engine.dialect.name, worker_id, time.time(), lease_s)
            row = conn.execute(stmt).first()
        return None if row is None else _job(row)

    def _fenced(self, job: Job, worker_id: str) -> Any:
        return (_T.c.id == job.id, _T.c.status == JobStatus.RUNNING.value, _T.c.worker_id == worker_id,
                _T.c.attempts == job.attempts)

    def heartbeat(self, job: Job, worker_id: str, lease_s: float, progress: float,
                  text: str) -> tuple[bool, bool] | None:
        """Extend the lease and store progress. Returns (still ours, cancel requested), or None when
        the database stayed busy past the busy timeout (the caller simply tries again later)."""
        now = time.time()
        try:
            with self.engine.begin() as conn:
                row = conn.execute(
                    update(_T).where(*self._fenced(job, worker_id))
                    .values(lease_until=now + lease_s, heartbeat_at=now, updated_at=now,
                            progress=progress, progress_text=text)
                    .returning(_T.c.cancel_requested)
                ).first()
        except OperationalError:
            return None
        if row is None:
            return False, False
        return True, bool(row[0])

    def finish(self, job: Job, worker_id: str, status: JobStatus, *, error: str | None = None,
               outputs: dict[str, Any] | None = None, timings: dict[str, Any] | None = None,
               failed_dir: str | None = None) -> Job:
        """running -> done | failed | cancelled, only if this worker still holds this attempt."""
        assert status in TERMINAL
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                update(_T).where(*self._fenced(job, worker_id))
                .values(status=status.value, error=error, outputs=outputs or {}, timings=timings or {},
                        failed_dir=failed_dir, finished_at=now, updated_at=now, lease_until=None,
                        progress=1.0 if status is JobStatus.DONE else _T.c.progress, progress_text=status.value)
                .returning(*_T.c)
            ).first()
        if row is None:
            raise StaleJob(f"job {job.id} is no longer held by {worker_id} (attempt {job.attempts})")
        return _job(row)

    def requeue(self, job: Job, worker_id: str, *, refund: bool, error: str | None = None) -> Job:
        """running -> queued. ``refund`` gives the attempt back (a clean shutdown is not the job's
        fault); otherwise the attempt stays used and the caller fails the job when none are left."""
        now = time.time()
        attempts = _T.c.attempts - 1 if refund else _T.c.attempts
        with self.engine.begin() as conn:
            row = conn.execute(
                update(_T).where(*self._fenced(job, worker_id))
                .values(status=JobStatus.QUEUED.value, attempts=attempts, worker_id=None, lease_until=None,
                        updated_at=now, error=error, progress=0.0, progress_text="")
                .returning(*_T.c)
            ).first()
        if row is None:
            raise StaleJob(f"job {job.id} is no longer held by {worker_id}")
        return _job(row)

    def recover(self, host: str) -> tuple[list[Job], list[Job]]:
        """At start: running jobs of this host (it runs one daemon) or with an expired lease were
        interrupted. Requeue those with attempts left; fail the others. Returns (requeued, failed)."""
        now = time.time()
        requeued: list[Job] = []
        failed: list[Job] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(_T).where(_T.c.status == JobStatus.RUNNING.value,
                                 (_T.c.worker_id.like(f"{host}:%")) | (_T.c.lease_until < now))
            ).all()
            for r in rows:
                job = _job(r)
                if job.attempts >= job.max_attempts:
                    error = (f"interrupted {job.attempts} times (the process died during each render); "
                             f"giving up after jobs.max_attempts={job.max_attempts}")
                    new = conn.execute(
                        update(_T).where(_T.c.id == job.id, _T.c.status == JobStatus.RUNNING.value)
                        .values(status=JobStatus.FAILED.value, error=error, finished_at=now, updated_at=now,
                                worker_id=None, lease_until=None).returning(*_T.c)).one()
                    failed.append(_job(new))
                else:
                    new = conn.execute(
                        update(_T).where(_T.c.id == job.id, _T.c.status == JobStatus.RUNNING.value)
                        .values(status=JobStatus.QUEUED.value, worker_id=None, lease_until=None, updated_at=now,
                                progress=0.0, progress_text="",
                                error=f"interrupted during attempt {job.attempts}; requeued")
                        .returning(*_T.c)).one()
                    requeued.append(_job(new))
        return requeued, failed

    # -- operator commands ----------------------------------------------------------------------

    def request_cancel(self, job_id: int) -> Job | None:
        """Flag a queued or running job for cancellation; the daemon acts on it. None if finished."""
        with self.engine.begin() as conn:
            row = conn.execute(
                update(_T).where(_T.c.id == job_id,
                                 _T.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
                .values(cancel_requested=True, updated_at=time.time()).returning(*_T.c)
            ).first()
        return None if row is None else _job(row)

    def cancel_queued(self, job: Job, *, error: str, failed_dir: str | None) -> Job | None:
        """queued (with a cancel request) -> cancelled. None if it was claimed meanwhile."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                update(_T).where(_T.c.id == job.id, _T.c.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.CANCELLED.value, error=error, failed_dir=failed_dir,
                        finished_at=now, updated_at=now).returning(*_T.c)
            ).first()
        return None if row is None else _job(row)

    def retry(self, job_id: int) -> Job | None:
        """failed | cancelled -> queued with fresh attempts. None if the job is in another state."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                update(_T).where(_T.c.id == job_id,
                                 _T.c.status.in_([JobStatus.FAILED.value, JobStatus.CANCELLED.value]),
                                 ~_T.c.fingerprint.startswith("rejected:"))
                .values(status=JobStatus.QUEUED.value, attempts=0, cancel_requested=False, error=None,
                        failed_dir=None, worker_id=None, lease_until=None, started_at=None,
                        finished_at=None, progress=0.0, progress_text="", updated_at=now)
                .returning(*_T.c)
            ).first()
        return None if row is None else _job(row)

    def delete(self, job_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(_T).where(_T.c.id == job_id))
