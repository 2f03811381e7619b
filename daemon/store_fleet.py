"""The fleet half of :class:`daemon.store.Store`: named workers, named leases, output-name
reservations, the scanner's waiting list, and the checks ``doctor`` and ``status`` need.

Liveness is judged on the database clock only (:func:`daemon.db.db_now`): a heartbeat stores the
database's now, and ages are computed by the database. The local clock appears only in
:meth:`FleetOps.clock_skew`, which reports how far it is from the database's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, Engine, Table, and_, case, delete, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from daemon.db import StoreError, db_now, redacted
from daemon.db_models import LEASES, OUTPUT_NAMES, SCANNER_WAITING, WORKERS
from daemon.jobs import Job, JobRow, JobStatus
from daemon.migrations import SCHEMA_VERSION, read_version

__all__ = ["FleetOps", "WorkerNameTaken", "WorkerInfo", "Lease", "Waiting", "Health", "INGEST_LEASE"]

_T = cast(Table, JobRow.__table__)

INGEST_LEASE = "ingest"  # the lease whose holder scans the inbox, rejects, cancels queued jobs and sweeps


class WorkerNameTaken(StoreError):
    """Another live process (recent heartbeat, not stopped) is registered under this worker name."""


@dataclass(frozen=True)
class WorkerInfo:
    """One row of the worker registry; ``age_s`` is the heartbeat's age on the database clock."""

    name: str
    token: str
    host: str
    pid: int
    device: str
    gpu: str
    version: str
    recipe: str
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    job_id: int | None
    age_s: float
    paused: str | None = None  # why it does not claim (schema 3); None: it claims

    def state(self, stale_s: float) -> str:
        """"stopped" (signed off), "stale" (no heartbeat for ``stale_s``) or "live"."""
        return "stopped" if self.stopped_at is not None else "stale" if self.age_s > stale_s else "live"


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    epoch: int
    acquired_at: float
    expires_at: float
    remaining_s: float  # on the database clock; negative once expired


@dataclass(frozen=True)
class Waiting:
    stem: str
    reason: str
    since: float
    reporter: str


@dataclass(frozen=True)
class Health:
    """What ``doctor`` reports about the database (``error`` set when it could not be reached)."""

    backend: str
    url: str
    reachable: bool
    latency_s: float | None = None
    clock_skew_s: float | None = None  # database clock minus this host's clock
    schema_version: int | None = None
    expected_version: int = SCHEMA_VERSION
    error: str | None = None


def _lease(m: RowMapping, remaining_s: float) -> Lease:
    return Lease(name=m["name"], holder=m["holder"], epoch=int(m["epoch"]), acquired_at=float(m["acquired_at"]),
                 expires_at=float(m["expires_at"]), remaining_s=remaining_s)


class FleetOps:
    engine: Engine

    def _now(self) -> ColumnElement[float]:
        return db_now(self.engine.dialect.name)

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT that supports ``on_conflict_do_*`` on this backend (both have the same spelling)."""
        if self.engine.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    # -- worker registry --------------------------------------------------------------------------

    def register_worker(self, name: str, *, host: str, pid: int, device: str, gpu: str, version: str,
                        stale_s: float, recipe: str = "") -> str:
        """Take the worker name ``name`` for this process and return its token. Refused with
        :class:`WorkerNameTaken` while another process holds it: registered, not stopped, and a
        heartbeat younger than ``stale_s`` on the database clock. A stale holder is replaced (its
        later heartbeats return False)."""
        now = self._now()
        token = uuid.uuid4().hex
        values: dict[str, Any] = dict(name=name, token=token, host=host, pid=pid, device=device, gpu=gpu,
                                      version=version, recipe=recipe, started_at=now, heartbeat_at=now,
                                      stopped_at=None, job_id=None)
        stmt = self._insert(WORKERS).values(values)
        free = or_(WORKERS.c.stopped_at.is_not(None), WORKERS.c.heartbeat_at < now - stale_s)
        stmt = stmt.on_conflict_do_update(index_elements=[WORKERS.c.name],
                                          set_={k: v for k, v in values.items() if k != "name"}, where=free)
        try:
            with self.engine.begin() as conn:
                row = conn.execute(stmt.returning(WORKERS.c.token)).first()
        except IntegrityError:  # PostgreSQL: a concurrent first registration of the same name won
            row = None
        if row is None:
            holder = next((w for w in self.list_workers() if w.name == name), None)
            where = f" (pid {holder.pid} on {holder.host}, heartbeat {holder.age_s:.0f} s ago)" if holder else ""
            raise WorkerNameTaken(f"worker name {name!r} is in use by a live process{where}; give this one "
                                  "another name (worker.name, --device) or stop the other")
        return token

    def worker_heartbeat(self, name: str, token: str, job_id: int | None = None) -> bool:
        """Mark the worker alive now (database clock) and record its current job. False when the name
        is no longer this process's (it was replaced after going stale): the caller must stop."""
        with self.engine.begin() as conn:
            res = conn.execute(update(WORKERS).where(WORKERS.c.name == name, WORKERS.c.token == token,
                                                     WORKERS.c.stopped_at.is_(None))
                               .values(heartbeat_at=self._now(), job_id=job_id))
        return res.rowcount == 1

    def set_worker_engine(self, name: str, token: str, *, recipe: str, gpu: str) -> bool:
        """Record the recipe (engine identity) this worker renders and its GPU model, known once its
        engine is loaded. False when the name is no longer this process's."""
        with self.engine.begin() as conn:
            res = conn.execute(update(WORKERS).where(WORKERS.c.name == name, WORKERS.c.token == token)
                               .values(recipe=recipe, gpu=gpu))
        return res.rowcount == 1

    def queued_by_recipe(self) -> dict[str, int]:
        """How many queued jobs need each recipe (engine identity): a worker claims only its own
        (docs/daemon.md §4.9), so a recipe no live worker has is a queue that never moves."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(_T.c.engine_identity, func.count()).where(_T.c.status == JobStatus.QUEUED.value)
                                .group_by(_T.c.engine_identity)).all()
        return {str(r[0]): int(r[1]) for r in rows}

    def stop_worker(self, name: str, token: str) -> None:
        """A clean exit: the row stays (``status`` shows when it stopped) and the name is free at once."""
        now = self._now()
        with self.engine.begin() as conn:
            conn.execute(update(WORKERS).where(WORKERS.c.name == name, WORKERS.c.token == token)
                         .values(stopped_at=now, heartbeat_at=now, job_id=None))

    def list_workers(self) -> list[WorkerInfo]:
        """All registered workers, by name, with each heartbeat's age on the database clock."""
        age = (self._now() - WORKERS.c.heartbeat_at).label("age_s")
        with self.engine.begin() as conn:
            rows = conn.execute(select(WORKERS, age).order_by(WORKERS.c.name)).all()
        return [WorkerInfo(**{**r._mapping, "age_s": float(r._mapping["age_s"])}) for r in rows]

    # -- named leases (the ingest leader) -----------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take or extend lease ``name`` for ``holder`` until database now + ``ttl_s``; None while
        another holder's lease runs. ``epoch`` grows whenever the lease is taken afresh (from
        someone else, or after it expired), never while one holder keeps renewing it in time."""
        now = self._now()
        stmt = self._insert(LEASES).values(name=name, holder=holder, epoch=1, acquired_at=now, expires_at=now + ttl_s)
        kept = and_(LEASES.c.holder == holder, LEASES.c.expires_at >= now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[LEASES.c.name],
            set_={"holder": holder, "expires_at": now + ttl_s,
                  "epoch": case((kept, LEASES.c.epoch), else_=LEASES.c.epoch + 1),
                  "acquired_at": case((kept, LEASES.c.acquired_at), else_=now)},
            where=or_(LEASES.c.holder == holder, LEASES.c.expires_at < now))
        try:
            with self.engine.begin() as conn:
                row = conn.execute(stmt.returning(*LEASES.c)).first()
        except IntegrityError:  # PostgreSQL: a concurrent first acquisition won
            return None
        return None if row is None else _lease(row._mapping, ttl_s)

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend a lease this holder still has (same epoch, not expired on the database clock).
        None means it was lost: stop the leader's work and call :meth:`acquire_lease` again."""
        now = self._now()
        with self.engine.begin() as conn:
            row = conn.execute(update(LEASES).where(LEASES.c.name == lease.name, LEASES.c.holder == lease.holder,
                                                    LEASES.c.epoch == lease.epoch, LEASES.c.expires_at >= now)
                               .values(expires_at=now + ttl_s).returning(*LEASES.c)).first()
        return None if row is None else _lease(row._mapping, ttl_s)

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now (a clean stop): expired at once, so any worker may take it."""
        with self.engine.begin() as conn:
            conn.execute(update(LEASES).where(LEASES.c.name == name, LEASES.c.holder == holder)
                         .values(expires_at=self._now() - 1.0))

    def lease(self, name: str) -> Lease | None:
        """The lease row (for ``status``: who leads and for how much longer), or None if never taken."""
        remaining = (LEASES.c.expires_at - self._now()).label("remaining_s")
        with self.engine.begin() as conn:
            row = conn.execute(select(LEASES, remaining).where(LEASES.c.name == name)).first()
        return None if row is None else _lease(row._mapping, float(row._mapping["remaining_s"]))

    # -- output names on a shared outbox --------------------------------------------------------------

    def reserve_output(self, name: str, job: Job, worker_id: str) -> bool:
        """Reserve the output base name ``name`` for ``job`` while ``worker_id`` holds this attempt.
        True if the name is now this job's (also when an earlier attempt of it reserved it); False if
        another job has it or the job is no longer held (then publish nothing)."""
        now = self._now()
        fence = (_T.c.id == job.id, _T.c.status == JobStatus.RUNNING.value, _T.c.worker_id == worker_id,
                 _T.c.attempts == job.attempts)
        held = select(literal(1)).select_from(_T).where(*fence).exists()
        # INSERT ... SELECT ... WHERE <the job is held>: nothing is reserved for a lost attempt.
        source = select(literal(name), literal(job.id), literal(job.attempts), literal(worker_id), now).where(held)
        stmt = (self._insert(OUTPUT_NAMES)
                .from_select(["name", "job_id", "attempt", "worker", "reserved_at"], source)
                .on_conflict_do_update(index_elements=[OUTPUT_NAMES.c.name],
                                   set_={"attempt": job.attempts, "worker": worker_id, "reserved_at": now},
                                   where=OUTPUT_NAMES.c.job_id == job.id))
        try:
            with self.engine.begin() as conn:
                row = conn.execute(stmt.returning(OUTPUT_NAMES.c.job_id)).first()
        except IntegrityError:  # PostgreSQL: another job's first reservation of the name won
            return False
        return row is not None

    def output_names(self, job_id: int) -> list[str]:
        with self.engine.begin() as conn:
            return [str(n) for n in conn.execute(select(OUTPUT_NAMES.c.name).where(OUTPUT_NAMES.c.job_id == job_id)
                                                 .order_by(OUTPUT_NAMES.c.name)).scalars()]

    def release_outputs(self, job_id: int) -> None:
        """Forget a job's reservations (the job was deleted, or its unpublished name may go)."""
        with self.engine.begin() as conn:
            conn.execute(delete(OUTPUT_NAMES).where(OUTPUT_NAMES.c.job_id == job_id))

    # -- the scanner's waiting list ---------------------------------------------------------------------

    def set_waiting(self, reporter: str, waiting: Mapping[str, tuple[str, float]]) -> None:
        """Replace the waiting list with ``{stem: (reason, age_s)}`` from the ingest leader. Ages, not
        timestamps, cross the wire: ``since`` is stored on the database clock."""
        with self.engine.begin() as conn:
            now = float(conn.execute(select(self._now())).scalar_one())
            conn.execute(delete(SCANNER_WAITING))
            if waiting:
                conn.execute(insert(SCANNER_WAITING), [
                    {"stem": stem, "reason": reason, "since": now - max(0.0, age), "reporter": reporter,
                     "updated_at": now} for stem, (reason, age) in sorted(waiting.items())])

    def waiting(self) -> list[Waiting]:
        with self.engine.begin() as conn:
            rows = conn.execute(select(SCANNER_WAITING).order_by(SCANNER_WAITING.c.stem)).all()
        return [Waiting(stem=r.stem, reason=r.reason, since=float(r.since), reporter=r.reporter) for r in rows]

    # -- status ------------------------------------------------------------------------------------------

    def fleet_snapshot(self, stale_s: float) -> dict[str, Any]:
        """What ``status`` (text and ``--json``) shows about the fleet, JSON-ready: each worker with
        its state ("live", "stale": no heartbeat for ``stale_s``, "stopped") and heartbeat age on
        the database clock, the ingest leader, and the scanner's waiting list."""
        workers = [{
            "name": w.name, "host": w.host, "pid": w.pid, "device": w.device, "gpu": w.gpu, "version": w.version,
            "job_id": w.job_id, "heartbeat_age_s": round(w.age_s, 1), "paused": w.paused,
            "state": w.state(stale_s),
        } for w in self.list_workers()]
        lease = self.lease(INGEST_LEASE)
        leader = None if lease is None or lease.remaining_s < 0 else {
            "holder": lease.holder, "epoch": lease.epoch, "remaining_s": round(lease.remaining_s, 1)}
        waiting = [{"stem": w.stem, "reason": w.reason, "since": w.since, "reporter": w.reporter}
                   for w in self.waiting()]
        return {"workers": workers, "ingest_leader": leader, "waiting": waiting}

    # -- doctor ------------------------------------------------------------------------------------------

    def db_time(self) -> float:
        """The database clock now, as Unix seconds."""
        with self.engine.begin() as conn:
            return float(conn.execute(select(self._now())).scalar_one())

    def ping(self) -> float:
        """One round trip (a transaction with ``SELECT 1``); returns its latency in seconds."""
        t0 = time.monotonic()
        with self.engine.begin() as conn:
            conn.execute(select(literal(1))).scalar_one()
        return time.monotonic() - t0

    def clock_skew(self) -> float:
        """Database clock minus this host's clock, in seconds (read halfway through a round trip)."""
        t0 = time.time()
        db = self.db_time()
        t1 = time.time()
        return db - (t0 + t1) / 2

    def health(self) -> Health:
        """Reachability, latency, clock skew and schema version, for ``doctor``; never raises for a
        database that cannot be reached (the reason is in ``error``)."""
        url, backend = redacted(self.engine.url), self.engine.dialect.name
        try:
            latency = min(self.ping() for _ in range(3))  # the first may include connecting
            skew = self.clock_skew()
            with self.engine.begin() as conn:
                version = read_version(conn)
        except Exception as exc:  # noqa: BLE001 - any failure is a finding to report, not a crash
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            return Health(backend=backend, url=url, reachable=False,
                          error=f"{type(exc).__name__}: {detail[0] if detail else ''}")
        return Health(backend=backend, url=url, reachable=True, latency_s=latency, clock_skew_s=skew,
                      schema_version=version)
