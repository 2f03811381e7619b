"""Connecting to the job database: SQLite on one host, PostgreSQL for a fleet (docs/daemon.md §4).

This module turns ``cfg.store`` (or a bare path / URL) into a SQLAlchemy engine with the session
settings the store relies on, and gives the store its one clock: the database's.

- SQLite: WAL, a busy timeout, ``BEGIN IMMEDIATE`` for every transaction (a read-then-write never
  fails with "database is locked" half-way).
- PostgreSQL (``postgresql+psycopg://``): pool pre-ping (a connection killed by a server restart is
  replaced, not handed out), ``connect_timeout``, TCP keepalives, and ``statement_timeout`` /
  ``lock_timeout`` / ``idle_in_transaction_session_timeout`` set in every connection's start-up
  packet, so no statement, lock wait or stopped client can stall a worker for longer than configured.
- The password never sits in the config file: it comes from an environment variable or a file and
  is added to the URL in memory only; :func:`redacted` is what logs, ``status`` and ``doctor`` show.

Liveness is judged on database time only (:func:`db_now`): a host whose clock is wrong can neither
steal a live job nor keep a dead one.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Double, Engine, cast, create_engine, event, extract, func
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.sql.elements import ColumnElement

__all__ = ["StoreError", "StoreOptions", "StoreConfigError", "StoreSettings", "build_url", "redacted", "make_engine",
           "db_now", "is_transient"]


class StoreError(RuntimeError):
    """The database cannot be used (unreadable, or a schema newer than this program)."""


class StoreConfigError(ValueError):
    """The store settings cannot work (bad URL, password variable unset, password file unreadable)."""


class StoreSettings(Protocol):
    """The attributes of ``cfg.store`` this module reads (the config schema owns the class; a frozen
    dataclass fits, and so does :class:`StoreOptions`)."""

    @property
    def url(self) -> str | None: ...
    @property
    def password_env(self) -> str | None: ...
    @property
    def password_file(self) -> Path | None: ...
    @property
    def connect_timeout_s(self) -> float: ...
    @property
    def statement_timeout_s(self) -> float: ...
    @property
    def lock_timeout_s(self) -> float: ...
    @property
    def busy_timeout_s(self) -> float: ...


@dataclass(frozen=True)
class StoreOptions:
    """Connection settings; the field names and defaults are those of ``cfg.store``."""

    url: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    connect_timeout_s: float = 10.0
    statement_timeout_s: float = 30.0
    lock_timeout_s: float = 10.0
    busy_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, s: StoreSettings) -> StoreOptions:
        return cls(url=s.url, password_env=s.password_env, password_file=s.password_file,
                   connect_timeout_s=s.connect_timeout_s, statement_timeout_s=s.statement_timeout_s,
                   lock_timeout_s=s.lock_timeout_s, busy_timeout_s=s.busy_timeout_s)


def _password(opts: StoreOptions) -> str | None:
    if opts.password_env:
        value = os.environ.get(opts.password_env)
        if value is None:
            raise StoreConfigError(f"store.password_env names the environment variable {opts.password_env}, "
                                   "which is not set")
        return value
    if opts.password_file is not None:
        try:
            # One line; the trailing newline editors add is not part of the password.
            return opts.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise StoreConfigError(f"store.password_file {opts.password_file}: {exc.strerror or exc}") from None
    return None


def build_url(opts: StoreOptions, sqlite_path: Path) -> URL:
    """The URL to connect to: ``opts.url`` with the password filled in, or SQLite at ``sqlite_path``."""
    if opts.url is None:
        return URL.create("sqlite", database=str(sqlite_path))
    try:
        url = make_url(opts.url)
    except ArgumentError:
        # The message would repeat the URL, password and all: say what is wrong without it.
        raise StoreConfigError("store.url is not a database URL (expected e.g. "
                               "postgresql+psycopg://user@host/db or sqlite:///path/jobs.db)") from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreConfigError(f"store.url: unsupported database {backend!r} (use sqlite or postgresql+psycopg)")
    if backend == "postgresql" and url.get_driver_name() not in ("psycopg", ""):
        raise StoreConfigError(f"store.url: use the psycopg driver (postgresql+psycopg://), "
                               f"not {url.get_driver_name()!r}")
    if backend == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
        password = _password(opts)
        if password is not None:
            url = url.set(password=password)
    elif not url.database or url.database == ":memory:":
        raise StoreConfigError("store.url: an SQLite URL needs a file (sqlite:///path/jobs.db); "
                               "an in-memory database cannot be shared with the CLI")
    return url


def redacted(url: URL | str) -> str:
    """The URL as logs, ``status`` and ``doctor`` may show it: any password replaced by ``***``."""
    try:
        u = url if isinstance(url, URL) else make_url(url)
    except ArgumentError:
        return "<unparseable database URL>"
    return u.render_as_string(hide_password=True)


def _sqlite_engine(path: Path, busy_timeout_s: float) -> Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    busy_ms = int(busy_timeout_s * 1000)
    engine = create_engine(URL.create("sqlite", database=str(path)), connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would emit a deferred BEGIN
        # only before DML); _on_begin below emits BEGIN IMMEDIATE instead (SQLAlchemy's
        # documented pysqlite recipe, with IMMEDIATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
        # Switching to WAL needs a moment alone with the file and does not wait on busy_timeout:
        # retry while another process (a CLI command, a sibling worker) creates or opens it too.
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                    break
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


def _postgres_engine(url: URL, opts: StoreOptions) -> Engine:
    # idle_in_transaction_session_timeout: a client stopped inside a transaction (SIGSTOP, a
    # debugger, a host frozen mid-call) would hold its row locks until it resumes, and a sibling
    # could take over neither its job nor the ingest lease; the server ends such a session after
    # as long as a statement may run (the client reconnects when it resumes).
    ms = {k: max(1, int(v * 1000)) for k, v in
          (("statement_timeout", opts.statement_timeout_s), ("lock_timeout", opts.lock_timeout_s),
           ("idle_in_transaction_session_timeout", opts.statement_timeout_s))}
    # libpq's connect_timeout is whole seconds, and values below 2 are raised to 2.
    connect_s = max(2, math.ceil(opts.connect_timeout_s))
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=4,
        pool_timeout=opts.connect_timeout_s,
        connect_args={
            "connect_timeout": connect_s,
            # Server-side settings sent with every new connection (libpq "options"): they hold for
            # the whole session, including connections the pool opens after an outage.
            "options": " ".join(f"-c {k}={v}" for k, v in ms.items()),
            "application_name": "infinitetalkd",
            # A peer that vanished (host down, cable pulled) is noticed in ~1 min, not hours.
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
        },
    )


def make_engine(url: URL, opts: StoreOptions) -> Engine:
    """An engine for ``url`` (from :func:`build_url`) with this module's per-connection settings."""
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        return _sqlite_engine(Path(url.database), opts.busy_timeout_s)
    return _postgres_engine(url, opts)


def db_now(dialect: str) -> ColumnElement[float]:
    """The database's clock as Unix seconds (float), for use inside statements.

    PostgreSQL: ``now()``, the start of the transaction, so every timestamp one transaction writes is
    the same. SQLite: the clock of the one host that holds the file, read by SQLite itself.
    """
    if dialect == "postgresql":
        return cast(extract("epoch", func.now()), Double)
    return (func.julianday("now") - 2440587.5) * 86400.0


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is an outage or a wait that ran out (server down or restarting,
    connection lost, connect / statement / lock / busy timeout, pool exhausted), after which the
    same call may simply be tried again later, as opposed to a bug or a constraint violation."""
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
