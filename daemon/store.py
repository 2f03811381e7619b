"""The only code that talks to the database (SQLAlchemy 2 Core over the tables in jobs.py and db_models.py).

One coordinator for one host or a fleet (docs/daemon.md §4): SQLite on a local disk, or PostgreSQL
shared by several hosts. Connection settings live in :mod:`daemon.db`, schema changes in
:mod:`daemon.migrations`, the fleet's tables (workers, leases, output names, the scanner's waiting
list) in :mod:`daemon.store_fleet`.

Rules:
- every status change is one entry of :data:`daemon.jobs.TRANSITIONS`, applied as a guarded UPDATE
  that names the statuses it may start from (and, for a running job, the worker and attempt that
  claimed it: fencing) and checks that a row matched;
- every timestamp and every lease is computed by the database (:func:`daemon.db.db_now`), never from
  the clock of the host that runs this code;
- transactions are tiny and never held across GPU work.

The dialect-specific part of claiming lives in :meth:`Store.claim` (PostgreSQL adds
``FOR UPDATE SKIP LOCKED``; on SQLite ``BEGIN IMMEDIATE`` already makes writers take turns).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, Engine, Table, and_, delete, func, insert, or_, select, update
from sqlalchemy.engine import URL, Row
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.sql import Update

from daemon.db import StoreError, StoreOptions, StoreSettings, build_url, db_now, make_engine, redacted
from daemon.db_models import WORKERS
from daemon.jobs import TERMINAL, TRANSITIONS, Job, JobRow, JobStatus
from daemon.migrations import SCHEMA_VERSION, read_version
from daemon.migrations import migrate as run_migrations
from daemon.store_fleet import FleetOps

__all__ = ["Store", "StoreError", "StaleJob", "SCHEMA_VERSION"]

_T = cast(Table, JobRow.__table__)


class StaleJob(RuntimeError):
    """A guarded update matched no row: the job is no longer in the state this worker holds."""


def _job(row: Row[Any]) -> Job:
    m = row._mapping
    data = {k: m[k] for k in Job.__dataclass_fields__}
    data["status"] = JobStatus(m["status"])
    data["cancel_requested"] = bool(m["cancel_requested"])
    data["progress"] = float(m["progress"])
    return Job(**data)


def _guarded(name: str, *where: Any, **values: Any) -> Update:
    """UPDATE jobs per transition ``name``: only rows in one of its source statuses and matching
    ``where``; SET exactly what the transition allows (see :class:`daemon.jobs.Transition`)."""
    tr = TRANSITIONS[name]
    return (update(_T).where(_T.c.status.in_(sorted(s.value for s in tr.sources)), *where)
            .values(tr.values(**values)))


_GIVE_UP = ("interrupted {attempts} times (the process died during each render); "
            "giving up after jobs.max_attempts={max_attempts}")


class Store(FleetOps):
    """Job persistence. Safe to share between threads (each call takes its own connection)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, database: Path | str, *, busy_timeout_ms: int = 10_000, options: StoreOptions | None = None,
             migrate: bool | None = True) -> Store:
        """Open a database: a file path for SQLite, or a URL (``options`` adds the password and timeouts).

        ``migrate``: True (the default) brings the schema to :data:`SCHEMA_VERSION` first; False refuses
        any other version (an older one with a pointer to ``infinitetalkd migrate``); None leaves the
        schema as it is (``migrate``, ``doctor``)."""
        if options is None:
            options = StoreOptions(busy_timeout_s=busy_timeout_ms / 1000)
        if isinstance(database, Path):
            url = build_url(replace(options, url=None), database)
        else:
            url = build_url(replace(options, url=database), Path())
        return cls._start(url, options, migrate)

    @classmethod
    def connect(cls, settings: StoreSettings | None, sqlite_path: Path, *, migrate: bool | None = True) -> Store:
        """Open the store ``cfg.store`` describes (None or no url: SQLite at ``sqlite_path``, which is
        ``cfg.paths.database``); ``migrate`` as for :meth:`open`."""
        opts = StoreOptions() if settings is None else StoreOptions.from_settings(settings)
        return cls._start(build_url(opts, sqlite_path), opts, migrate)

    @classmethod
    def _start(cls, url: URL, opts: StoreOptions, migrate: bool | None) -> Store:
        store = cls(make_engine(url, opts))
        try:
            if migrate:
                store.migrate()
            elif migrate is not None:
                store.check_schema()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()

    @property
    def url(self) -> str:
        """Where the store is, without the password (for logs, ``status`` and ``doctor``)."""
        return redacted(self.engine.url)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def __repr__(self) -> str:
        return f"Store({self.url})"

    def _now(self) -> ColumnElement[float]:
        return db_now(self.engine.dialect.name)

    # -- schema -------------------------------------------------------------------------------

    def migrate(self) -> tuple[int, int]:
        """Bring the schema to :data:`SCHEMA_VERSION`; returns (version found, version now)."""
        return run_migrations(self.engine)

    def check_schema(self) -> int:
        """The schema version, or :class:`StoreError` if it is not the one this program uses."""
        with self.engine.begin() as conn:
            found = read_version(conn) or 0
        if found > SCHEMA_VERSION:
            raise StoreError(f"the job database has schema version {found}, newer than this infinitetalkd "
                             f"({SCHEMA_VERSION}); upgrade infinitetalkd")
        if found < SCHEMA_VERSION:
            raise StoreError(f"the job database has schema version {found}; this infinitetalkd needs "
                             f"{SCHEMA_VERSION}: run 'infinitetalkd migrate'")
        return found

    def schema_version(self) -> int:
        with self.engine.begin() as conn:
            return read_version(conn) or 0

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
        return self._insert_once(fingerprint, stem=stem, status=JobStatus.QUEUED.value, max_attempts=max_attempts,
                                 inputs=inputs, params=params, engine_identity=identity)

    def _insert_once(self, fingerprint: str, **values: Any) -> tuple[Job, bool]:
        """INSERT a job row unless ``fingerprint`` exists: (job, created). Exactly one of several
        concurrent callers (hosts) gets created=True; only it may move the files."""
        try:
            with self.engine.begin() as conn:
                row = conn.execute(select(_T).where(_T.c.fingerprint == fingerprint)).first()
                if row is not None:
                    return _job(row), False
                now = self._now()
                row = conn.execute(
                    insert(_T).values(fingerprint=fingerprint, attempts=0, cancel_requested=False,
                                      created_at=now, updated_at=now, progress=0.0, progress_text="",
                                      outputs={}, timings={}, **values).returning(*_T.c)
                ).one()
                return _job(row), True
        except IntegrityError:  # another process inserted it between our select and insert
            existing = self.by_fingerprint(fingerprint)
            if existing is None:
                raise
            return existing, False

    def reject(self, key: str, *, stem: str, inputs: list[dict[str, Any]], error: str) -> tuple[Job, bool]:
        """Record a refused drop once per ``key`` (:func:`daemon.jobs.rejection_key`): (job, created).
        Only the caller that got created=True moves the files to failed/."""
        return self._insert_once(f"rejected:{key}", stem=stem, status=JobStatus.FAILED.value, max_attempts=0,
                                 inputs=inputs, params={}, engine_identity="", error=error,
                                 finished_at=self._now())

    def add_rejected(self, *, stem: str, inputs: list[dict[str, Any]], error: str, key: str | None = None) -> Job:
        """Record inputs refused at ingest as a failed job, so status and metrics show them (a fresh
        row each call unless ``key`` is given; see :meth:`reject`)."""
        return self.reject(key or uuid.uuid4().hex, stem=stem, inputs=inputs, error=error)[0]

    def add_redo(self, original: Job, *, fingerprint: str, stem: str, from_chunk: int, seed: int,
                 inputs_dir: str) -> tuple[Job, bool]:
        """Queue a redo of the finished job ``original`` (``infinitetalkd redo``): its inputs, settings and
        engine identity, re-rendered from chunk ``from_chunk`` with ``seed``, reading its inputs from
        ``inputs_dir``. Returns (job, created); the same redo asked twice is one job (``fingerprint``)."""
        return self._insert_once(fingerprint, stem=stem, status=JobStatus.QUEUED.value,
                                 max_attempts=original.max_attempts, inputs=original.inputs, params=original.params,
                                 engine_identity=original.engine_identity, redo_of=original.id,
                                 redo_from_chunk=from_chunk, redo_seed=seed, inputs_dir=inputs_dir)

    def finished_before(self, job_ids: Collection[int], *, keep_s: float) -> dict[int, bool]:
        """For each of ``job_ids`` that exists: whether its checkpoints may go (docs/daemon.md §4.8): failed
        or cancelled, or done more than ``keep_s`` seconds ago on the database clock (queued and running
        jobs: False). Ids with no row are left out of the answer."""
        if not job_ids:
            return {}
        now = self._now()
        expired = or_(_T.c.status.in_([JobStatus.FAILED.value, JobStatus.CANCELLED.value]),
                      and_(_T.c.status == JobStatus.DONE.value, _T.c.finished_at < now - keep_s))
        with self.engine.begin() as conn:
            rows = conn.execute(select(_T.c.id, expired.label("gone")).where(_T.c.id.in_(sorted(job_ids)))).all()
        return {int(r.id): bool(r.gone) for r in rows}

    def set_worker_paused(self, name: str, token: str, reason: str | None) -> bool:
        """Record why worker ``name`` does not claim (None: it claims), for ``status`` on any host.
        False when the name is no longer this process's."""
        with self.engine.begin() as conn:
            res = conn.execute(update(WORKERS).where(WORKERS.c.name == name, WORKERS.c.token == token)
                               .values(paused=reason or None))
        return res.rowcount == 1

    def set_failed_dir(self, job_id: int, failed_dir: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(_T).where(_T.c.id == job_id).values(failed_dir=failed_dir))

    def requeue_finished(self, job: Job, *, stem: str, inputs: list[dict[str, Any]], max_attempts: int) -> Job:
        """A finished job's inputs were dropped again: queue it once more with fresh attempts."""
        now = self._now()
        with self.engine.begin() as conn:
            row = conn.execute(
                _guarded("redrop", _T.c.id == job.id, _T.c.status == job.status.value, stem=stem, inputs=inputs,
                         max_attempts=max_attempts, created_at=now, updated_at=now).returning(*_T.c)
            ).first()
        if row is None:
            raise StaleJob(f"job {job.id} changed while it was being requeued")
        return _job(row)

    # -- the worker's side --------------------------------------------------------------------

    def claim(self, worker_id: str, lease_s: float, *, identities: Collection[str] | None = None) -> Job | None:
        """Give ``worker_id`` the oldest claimable job: a queued one, or a running one whose lease
        expired on the database clock (its holder stopped heartbeating; attempts + 1, and the old
        holder's fence no longer matches). None when there is none. Jobs with no attempt left or a
        cancel request are left to :meth:`sweep_expired`. ``identities``: only jobs whose
        ``engine_identity`` is one of these (a worker skips what it cannot render; None: any)."""
        now = self._now()
        claimable = and_(_T.c.cancel_requested.is_(False), or_(
            _T.c.status == JobStatus.QUEUED.value,
            and_(_T.c.status == JobStatus.RUNNING.value, _T.c.lease_until < now,
                 _T.c.attempts < _T.c.max_attempts)))
        if identities is not None:
            claimable = and_(claimable, _T.c.engine_identity.in_(sorted(identities)))
        candidate = select(_T.c.id).where(claimable).order_by(_T.c.id).limit(1)
        if self.engine.dialect.name == "postgresql":
            # Several hosts claim different rows instead of queueing on the first one's lock.
            candidate = candidate.with_for_update(skip_locked=True)
        stmt = _guarded("claim", _T.c.id == candidate.scalar_subquery(), claimable,
                        worker_id=worker_id, attempts=_T.c.attempts + 1, lease_until=now + lease_s,
                        heartbeat_at=now, started_at=now, updated_at=now)
        with self.engine.begin() as conn:
            row = conn.execute(stmt.returning(*_T.c)).first()
        return None if row is None else _job(row)

    def _fenced(self, job: Job, worker_id: str) -> tuple[ColumnElement[bool], ...]:
        return (_T.c.id == job.id, _T.c.status == JobStatus.RUNNING.value, _T.c.worker_id == worker_id,
                _T.c.attempts == job.attempts)

    def holds(self, job: Job, worker_id: str) -> bool:
        """Whether ``worker_id`` still holds this attempt of ``job`` (checked right before publishing)."""
        with self.engine.begin() as conn:
            return conn.execute(select(_T.c.id).where(*self._fenced(job, worker_id))).first() is not None

    def completed(self, job: Job, worker_id: str) -> Job | None:
        """The row if this attempt of ``job`` was finished by ``worker_id`` (done, failed or cancelled).
        For a completion whose reply was lost in an outage: when the retried :meth:`finish` raises
        :class:`StaleJob`, this tells "my earlier try committed" from "I lost the job"."""
        with self.engine.begin() as conn:
            row = conn.execute(select(_T).where(
                _T.c.id == job.id, _T.c.worker_id == worker_id, _T.c.attempts == job.attempts,
                _T.c.status.in_([s.value for s in TERMINAL]))).first()
        return None if row is None else _job(row)

    def heartbeat(self, job: Job, worker_id: str, lease_s: float, progress: float,
                  text: str) -> tuple[bool, bool] | None:
        """Extend the lease to database now + ``lease_s`` and store progress. Returns (still ours,
        cancel requested), or None when the database could not be reached or stayed busy or locked
        past its timeouts (the caller simply tries again later)."""
        now = self._now()
        try:
            with self.engine.begin() as conn:
                row = conn.execute(
                    _guarded("heartbeat", *self._fenced(job, worker_id), lease_until=now + lease_s,
                             heartbeat_at=now, updated_at=now, progress=progress, progress_text=text)
                    .returning(_T.c.cancel_requested)
                ).first()
        except OperationalError:
            return None
        if row is None:
            return False, False
        return True, bool(row[0])

    def record_chunks(self, job: Job, worker_id: str, chunks_rendered: int, resumed_from_chunk: int | None) -> bool:
        """Store the chunks rendered over all attempts and where this attempt resumed, while ``worker_id``
        holds this attempt (docs/daemon.md §4.8). False when it no longer does."""
        with self.engine.begin() as conn:
            res = conn.execute(_guarded("chunks", *self._fenced(job, worker_id), chunks_rendered=chunks_rendered,
                                        resumed_from_chunk=resumed_from_chunk, updated_at=self._now()))
        return res.rowcount == 1

    def finish(self, job: Job, worker_id: str, status: JobStatus, *, error: str | None = None,
               outputs: dict[str, Any] | None = None, timings: dict[str, Any] | None = None,
               failed_dir: str | None = None, chunks_rendered: int | None = None) -> Job:
        """running -> done | failed | cancelled, only if this worker still holds this attempt."""
        assert status in TERMINAL
        name = {JobStatus.DONE: "done", JobStatus.FAILED: "fail", JobStatus.CANCELLED: "cancel_running"}[status]
        now = self._now()
        with self.engine.begin() as conn:
            row = conn.execute(
                _guarded(name, *self._fenced(job, worker_id), error=error, outputs=outputs or {},
                         timings=timings or {}, failed_dir=failed_dir, finished_at=now, updated_at=now,
                         progress=1.0 if status is JobStatus.DONE else _T.c.progress, progress_text=status.value,
                         chunks_rendered=_T.c.chunks_rendered if chunks_rendered is None else chunks_rendered)
                .returning(*_T.c)
            ).first()
        if row is None:
            raise StaleJob(f"job {job.id} is no longer held by {worker_id} (attempt {job.attempts})")
        return _job(row)

    def requeue(self, job: Job, worker_id: str, *, refund: bool, error: str | None = None) -> Job:
        """running -> queued. ``refund`` gives the attempt back (a clean shutdown is not the job's
        fault); otherwise the attempt stays used and the caller fails the job when none are left."""
        attempts = _T.c.attempts - 1 if refund else _T.c.attempts
        with self.engine.begin() as conn:
            row = conn.execute(
                _guarded("requeue", *self._fenced(job, worker_id), attempts=attempts, error=error,
                         updated_at=self._now()).returning(*_T.c)
            ).first()
        if row is None:
            raise StaleJob(f"job {job.id} is no longer held by {worker_id}")
        return _job(row)

    def _recover(self, which: ColumnElement[bool]) -> tuple[list[Job], list[Job]]:
        requeued: list[Job] = []
        failed: list[Job] = []
        now = self._now()
        with self.engine.begin() as conn:
            rows = conn.execute(select(_T).where(_T.c.status == JobStatus.RUNNING.value, which)).all()
            for r in rows:
                job = _job(r)
                same = (_T.c.id == job.id, _T.c.attempts == job.attempts)
                if job.attempts >= job.max_attempts:
                    stmt = _guarded("give_up", *same, finished_at=now, updated_at=now,
                                    error=_GIVE_UP.format(attempts=job.attempts, max_attempts=job.max_attempts))
                    failed.append(_job(conn.execute(stmt.returning(*_T.c)).one()))
                else:
                    stmt = _guarded("requeue", *same, updated_at=now,
                                    error=f"interrupted during attempt {job.attempts}; requeued")
                    requeued.append(_job(conn.execute(stmt.returning(*_T.c)).one()))
        return requeued, failed

    def recover(self, host: str) -> tuple[list[Job], list[Job]]:
        """At start, for the single-daemon-per-host layout of worker ids "<host>:<pid>": running
        jobs of this host, or with an expired lease, were interrupted. Requeue those with attempts
        left; fail the others. Returns (requeued, failed). A fleet uses :meth:`recover_worker`."""
        return self._recover(_T.c.worker_id.like(f"{host}:%") | (_T.c.lease_until < self._now()))

    def recover_worker(self, name: str) -> tuple[list[Job], list[Job]]:
        """At a named worker's start (after :meth:`register_worker` succeeded, so no live process
        has this name): the running jobs recorded under ``name`` belonged to its previous, dead
        incarnation. Requeue those with attempts left, fail the others; a sibling's jobs are never
        touched (their expiry is the claim's and the sweeper's business). Returns (requeued, failed)."""
        return self._recover(_T.c.worker_id == name)

    def sweep_expired(self) -> list[Job]:
        """Finish running jobs whose lease expired and that no worker may claim again: no attempt
        left (-> failed) or a cancel request (-> cancelled). Run by the ingest leader, which then
        moves each job's inputs to failed/ and records it with :meth:`set_failed_dir`."""
        now = self._now()
        out: list[Job] = []
        with self.engine.begin() as conn:
            rows = conn.execute(select(_T).where(
                _T.c.status == JobStatus.RUNNING.value, _T.c.lease_until < now,
                (_T.c.attempts >= _T.c.max_attempts) | _T.c.cancel_requested.is_(True))).all()
            for r in rows:
                job = _job(r)
                same = (_T.c.id == job.id, _T.c.attempts == job.attempts, _T.c.lease_until < now)
                if job.cancel_requested:
                    stmt = _guarded("cancel_running", *same, error="cancelled (its worker had stopped)",
                                    finished_at=now, updated_at=now, progress_text=JobStatus.CANCELLED.value)
                else:
                    stmt = _guarded("give_up", *same, finished_at=now, updated_at=now,
                                    error=_GIVE_UP.format(attempts=job.attempts, max_attempts=job.max_attempts))
                row = conn.execute(stmt.returning(*_T.c)).first()
                if row is not None:
                    out.append(_job(row))
        return out

    # -- operator commands ----------------------------------------------------------------------

    def request_cancel(self, job_id: int) -> Job | None:
        """Flag a queued or running job for cancellation; the daemon acts on it. None if finished."""
        with self.engine.begin() as conn:
            row = conn.execute(
                _guarded("request_cancel", _T.c.id == job_id, cancel_requested=True, updated_at=self._now())
                .returning(*_T.c)
            ).first()
        return None if row is None else _job(row)

    def cancel_queued(self, job: Job, *, error: str, failed_dir: str | None) -> Job | None:
        """queued (with a cancel request) -> cancelled. None if it was claimed meanwhile."""
        now = self._now()
        with self.engine.begin() as conn:
            row = conn.execute(
                _guarded("cancel_queued", _T.c.id == job.id, error=error, failed_dir=failed_dir,
                         finished_at=now, updated_at=now).returning(*_T.c)
            ).first()
        return None if row is None else _job(row)

    def retry(self, job_id: int) -> Job | None:
        """failed | cancelled -> queued with fresh attempts. None if the job is in another state."""
        with self.engine.begin() as conn:
            row = conn.execute(
                _guarded("retry", _T.c.id == job_id, ~_T.c.fingerprint.startswith("rejected:"),
                         updated_at=self._now()).returning(*_T.c)
            ).first()
        return None if row is None else _job(row)

    def delete(self, job_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(_T).where(_T.c.id == job_id))
