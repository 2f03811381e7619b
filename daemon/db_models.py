"""The fleet's tables beside ``jobs`` (schema version 2): workers, leases, output names, the scanner's
waiting list. Plain SQLAlchemy Core tables on the same metadata as :class:`daemon.jobs.JobRow`.

Every timestamp is Unix seconds from the database clock (:func:`daemon.db.db_now`), never from the
clock of the host that wrote it. Only :mod:`daemon.store` reads or writes these tables; the DDL that
creates them is frozen separately in :mod:`daemon.migrations`.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, String, Table, Text

from daemon.jobs import Base

__all__ = ["WORKERS", "LEASES", "OUTPUT_NAMES", "SCANNER_WAITING"]

# One row per named worker (one daemon process per GPU). ``token`` identifies the process that
# registered the name: a heartbeat or stop with another token is refused, so a process that lost its
# name (stalled past the liveness window, replaced) learns it instead of overwriting its successor.
WORKERS = Table(
    "workers", Base.metadata,
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
    # why the worker does not claim now (full disk, missing inbox, database outage); None: it claims
    Column("paused", Text),
)

# Named leases ("ingest": the one process that scans the inbox, rejects, cancels and sweeps).
# ``epoch`` grows each time the lease changes hands: a fencing number for whoever needs one.
LEASES = Table(
    "leases", Base.metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

# Output base names in the (shared) outbox: the primary key makes a name one job's, whichever
# host publishes first.
OUTPUT_NAMES = Table(
    "output_names", Base.metadata,
    Column("name", String(255), primary_key=True),
    Column("job_id", Integer, nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("worker", String(255), nullable=False),
    Column("reserved_at", Float, nullable=False),
)

# The inbox scanner's "waiting" list (incomplete groups, missing ready markers), written by the
# ingest leader so that ``status`` on any host shows it.
SCANNER_WAITING = Table(
    "scanner_waiting", Base.metadata,
    Column("stem", String(255), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("since", Float, nullable=False),
    Column("reporter", String(255), nullable=False),
    Column("updated_at", Float, nullable=False),
)
