"""Schema migrations of the job database, serialised across processes and hosts.

Each migration brings the schema from version i to i + 1 and is frozen: its DDL is spelled out here
on its own metadata, never derived from the live models in :mod:`daemon.jobs` / :mod:`daemon.db_models`
(those move on; a database created by version 1 must keep meaning exactly what version 1 wrote).
A test compares the migrated schema with the live models.

All migrations run in one transaction that first takes the migration lock: ``pg_advisory_xact_lock``
on PostgreSQL, the write lock of ``BEGIN IMMEDIATE`` on SQLite (see :mod:`daemon.db`). Any number
of processes may start at once on an empty database: the first migrates, the others wait for it
and then find the current version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)

from daemon.db import StoreError

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "migrate", "read_version", "MIGRATION_LOCK_KEY"]

# An arbitrary constant that names the lock (PostgreSQL advisory locks are keyed by a bigint).
MIGRATION_LOCK_KEY = 0x696E66746B6431  # "inftkd1"

_META = MetaData()
SCHEMA_META = Table(
    "schema_meta", _META,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)


def _migration_1(conn: Connection) -> None:
    """The single-host schema: the jobs table as version 0.1.0 created it."""
    md = MetaData()
    Table(
        "jobs", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("fingerprint", String(80), unique=True, nullable=False),
        Column("stem", String(255), nullable=False, index=True),
        Column("status", String(16), nullable=False, index=True),
        Column("attempts", Integer, nullable=False),
        Column("max_attempts", Integer, nullable=False),
        Column("cancel_requested", Boolean, nullable=False),
        Column("worker_id", String(255)),
        Column("lease_until", Float),
        Column("heartbeat_at", Float),
        Column("created_at", Float, nullable=False),
        Column("updated_at", Float, nullable=False),
        Column("started_at", Float),
        Column("finished_at", Float),
        Column("inputs", JSON, nullable=False),
        Column("params", JSON, nullable=False),
        Column("engine_identity", Text, nullable=False),
        Column("progress", Float, nullable=False),
        Column("progress_text", Text, nullable=False),
        Column("error", Text),
        Column("outputs", JSON, nullable=False),
        Column("timings", JSON, nullable=False),
        Column("failed_dir", Text),
    )
    md.create_all(conn)


def _migration_2(conn: Connection) -> None:
    """The fleet: named workers, leases, output-name reservations, the scanner's waiting list, and an
    index for finding one worker's jobs at its start."""
    md = MetaData()
    jobs = Table("jobs", md, Column("id", Integer, primary_key=True), Column("worker_id", String(255)))
    Index("ix_jobs_worker_id", jobs.c.worker_id).create(conn)
    Table(
        "workers", md,
        Column("name", String(255), primary_key=True),
        Column("token", String(64), nullable=False),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("device", String(64), nullable=False),
        Column("gpu", String(255), nullable=False),
        Column("version", String(64), nullable=False),
        Column("recipe", Text, nullable=False),
        Column("started_at", Float, nullable=False),
        Column("heartbeat_at", Float, nullable=False),
        Column("stopped_at", Float),
        Column("job_id", Integer),
    )
    Table(
        "leases", md,
        Column("name", String(64), primary_key=True),
        Column("holder", String(255), nullable=False),
        Column("epoch", Integer, nullable=False),
        Column("acquired_at", Float, nullable=False),
        Column("expires_at", Float, nullable=False),
    )
    Table(
        "output_names", md,
        Column("name", String(255), primary_key=True),
        Column("job_id", Integer, nullable=False, index=True),
        Column("attempt", Integer, nullable=False),
        Column("worker", String(255), nullable=False),
        Column("reserved_at", Float, nullable=False),
    )
    Table(
        "scanner_waiting", md,
        Column("stem", String(255), primary_key=True),
        Column("reason", Text, nullable=False),
        Column("since", Float, nullable=False),
        Column("reporter", String(255), nullable=False),
        Column("updated_at", Float, nullable=False),
    )
    md.create_all(conn, tables=[md.tables[n] for n in ("workers", "leases", "output_names", "scanner_waiting")])


def _add_column(conn: Connection, table: str, column: Column[Any], default: str | None = None) -> None:
    """ALTER TABLE ... ADD COLUMN, spelled for this backend (SQLAlchemy Core has no construct for it)."""
    prep = conn.dialect.identifier_preparer
    ddl = f"ALTER TABLE {prep.quote(table)} ADD COLUMN {prep.quote(column.name)} {column.type.compile(conn.dialect)}"
    if default is not None:
        ddl += f" DEFAULT {default}"
    if not column.nullable:
        ddl += " NOT NULL"
    conn.exec_driver_sql(ddl)


def _migration_3(conn: Connection) -> None:
    """Resume and redo (docs/daemon.md §4.8): chunks rendered over all attempts and where the latest
    attempt resumed; a redo job's original, first chunk, seed and inputs folder; a worker's pause reason."""
    for column, default in (
        (Column("chunks_rendered", Integer, nullable=False), "0"),
        (Column("resumed_from_chunk", Integer), None),
        (Column("redo_of", Integer), None),
        (Column("redo_from_chunk", Integer), None),
        (Column("redo_seed", BigInteger), None),
        (Column("inputs_dir", Text), None),
    ):
        _add_column(conn, "jobs", column, default)
    _add_column(conn, "workers", Column("paused", Text))


MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2, _migration_3]
SCHEMA_VERSION = len(MIGRATIONS)


def read_version(conn: Connection) -> int | None:
    """The schema version recorded in the database; None if it has none (empty or foreign)."""
    if not conn.dialect.has_table(conn, "schema_meta"):
        return None
    value = conn.execute(select(SCHEMA_META.c.version).where(SCHEMA_META.c.id == 1)).scalar()
    return None if value is None else int(value)


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring the database to ``target``; returns (version found, version now)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # A migration may wait for the daemons' (tiny) transactions and for another process's
            # migration: allow it longer than the everyday timeouts, for this transaction only.
            conn.exec_driver_sql("SET LOCAL lock_timeout = '120s'")
            conn.exec_driver_sql("SET LOCAL statement_timeout = '600s'")
            # Held until this transaction ends: a concurrent first start waits here, then sees
            # the tables this one created.
            conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
        SCHEMA_META.create(conn, checkfirst=True)
        found = read_version(conn)
        if found is None:
            conn.execute(insert(SCHEMA_META).values(id=1, version=0))
            found = 0
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"the job database has schema version {found}, newer than this infinitetalkd "
                f"({SCHEMA_VERSION}); upgrade infinitetalkd or point the store elsewhere"
            )
        for version in range(found, max(found, target)):
            MIGRATIONS[version](conn)
        if target > found:
            conn.execute(update(SCHEMA_META).where(SCHEMA_META.c.id == 1).values(version=target))
    return found, max(found, target)
