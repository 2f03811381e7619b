"""The store's fleet side on SQLite and PostgreSQL: URL and password handling, the worker registry,
the ingest lease, output-name reservations, one rejection per bad drop, the waiting list, doctor's checks."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.db import StoreConfigError, StoreOptions, build_url, make_engine, redacted
from daemon.jobs import rejection_key
from daemon.store import Store
from daemon.store_fleet import WorkerNameTaken


@pytest.fixture
def store(db_target: Path | str) -> Iterator[Store]:
    s = Store.open(db_target)
    yield s
    s.close()


def register(store: Store, name: str, stale_s: float = 30.0) -> str:
    return store.register_worker(name, host="h1", pid=123, device="cuda:0", gpu="NVIDIA H100", version="0.2.0",
                                 stale_s=stale_s, recipe="r1")


# -- URL, password, redaction (no server needed) ---------------------------------------------------


def test_password_comes_from_env_or_file_and_never_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITD_PW", "s3cret")
    url = build_url(StoreOptions(url="postgresql+psycopg://fleet@db.example/itd", password_env="ITD_PW"), tmp_path)
    assert url.password == "s3cret"
    shown = redacted(url)
    assert "s3cret" not in shown and shown == "postgresql+psycopg://fleet:***@db.example/itd"
    pw = tmp_path / "pw"
    pw.write_text("fromfile\n")
    url = build_url(StoreOptions(url="postgresql://fleet@db.example/itd", password_file=pw), tmp_path)
    assert url.password == "fromfile" and url.drivername == "postgresql+psycopg"
    engine = make_engine(url, StoreOptions())
    try:
        assert "fromfile" not in repr(Store(engine)) and "fromfile" not in Store(engine).url
    finally:
        engine.dispose()


@pytest.mark.parametrize(("opts", "message"), [
    (StoreOptions(url="postgresql+psycopg://u@h/db", password_env="ITD_UNSET_VAR"), "ITD_UNSET_VAR, which is not set"),
    (StoreOptions(url="postgresql+psycopg://u@h/db", password_file=Path("/nonexistent/pw")), "/nonexistent/pw"),
    (StoreOptions(url="mysql://u:hunter2@h/db"), "unsupported database 'mysql'"),
    (StoreOptions(url="postgresql+psycopg2://u@h/db"), "psycopg driver"),
    (StoreOptions(url="sqlite://"), "needs a file"),
    (StoreOptions(url="::not a url hunter2"), "not a database URL"),
])
def test_bad_store_settings_say_what_is_wrong(tmp_path: Path, opts: StoreOptions, message: str) -> None:
    with pytest.raises(StoreConfigError, match=message) as info:
        build_url(opts, tmp_path / "jobs.db")
    assert "hunter2" not in str(info.value)


def test_default_is_sqlite_in_the_state_folder(tmp_path: Path) -> None:
    s = Store.connect(None, tmp_path / "state" / "jobs.db")
    try:
        assert s.backend == "sqlite" and (tmp_path / "state" / "jobs.db").exists()
    finally:
        s.close()


# -- worker registry --------------------------------------------------------------------------------


def test_a_live_worker_name_is_refused_and_a_stale_one_is_taken_over(store: Store) -> None:
    token = register(store, "h1/cuda:0")
    with pytest.raises(WorkerNameTaken, match="in use by a live process"):
        register(store, "h1/cuda:0")
    assert store.worker_heartbeat("h1/cuda:0", token, job_id=7)
    [w] = store.list_workers()
    assert (w.name, w.device, w.gpu, w.job_id, w.stopped_at) == ("h1/cuda:0", "cuda:0", "NVIDIA H100", 7, None)
    assert 0 <= w.age_s < 30
    # Its heartbeat is older than a (tiny) liveness window: a new process takes the name, and the
    # old one learns at its next heartbeat that it lost it.
    token2 = register(store, "h1/cuda:0", stale_s=-1)
    assert token2 != token and not store.worker_heartbeat("h1/cuda:0", token)
    store.stop_worker("h1/cuda:0", token)  # the old token stops nothing
    assert store.list_workers()[0].stopped_at is None
    store.stop_worker("h1/cuda:0", token2)
    assert store.list_workers()[0].stopped_at is not None
    assert register(store, "h1/cuda:0")  # a cleanly stopped name is free at once


def test_clock_15_minutes_off_cannot_take_a_live_name_or_lease(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    register(store, "w")
    assert store.acquire_lease("ingest", "w", ttl_s=30) is not None
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 900)
    with pytest.raises(WorkerNameTaken):
        register(store, "w")
    assert store.acquire_lease("ingest", "other", ttl_s=30) is None
    assert abs(store.clock_skew() + 900) < 60  # doctor sees the skew


def _register_at_once(target: Path | str, barrier: Any, out: Any) -> None:
    s = Store.open(target)
    try:
        barrier.wait(60)
        try:
            register(s, "same/name")
            out.put("won")
        except WorkerNameTaken:
            out.put("refused")
    finally:
        s.close()


def test_simultaneous_registrations_of_one_name_have_one_winner(store: Store, db_target: Path | str) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, q = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_register_at_once, args=(db_target, barrier, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == ["refused"] * 3 + ["won"]


# -- the ingest lease -------------------------------------------------------------------------------


def test_ingest_lease_has_one_holder_and_a_fencing_epoch(store: Store) -> None:
    assert store.lease("ingest") is None
    a = store.acquire_lease("ingest", "a", ttl_s=30)
    assert a is not None and (a.holder, a.epoch) == ("a", 1) and 25 < a.remaining_s <= 30
    assert store.acquire_lease("ingest", "b", ttl_s=30) is None
    renewed = store.renew_lease(a, ttl_s=30)
    assert renewed is not None and renewed.epoch == 1
    again = store.acquire_lease("ingest", "a", ttl_s=30)
    assert again is not None and again.epoch == 1  # the same holder in time keeps its epoch
    store.release_lease("ingest", "a")
    b = store.acquire_lease("ingest", "b", ttl_s=30)
    assert b is not None and (b.holder, b.epoch) == ("b", 2)
    assert store.renew_lease(a, ttl_s=30) is None  # a was cut off: it must stop leading
    expired = store.acquire_lease("ingest", "b", ttl_s=-1)  # b stops renewing ...
    assert expired is not None and expired.remaining_s < 0
    assert store.renew_lease(expired, ttl_s=30) is None  # ... and may not pretend it never lapsed
    c = store.acquire_lease("ingest", "c", ttl_s=30)
    assert c is not None and c.epoch == 3


# -- output names, rejections, waiting list -----------------------------------------------------------


def _running(store: Store, fp: str, worker: str) -> Any:
    store.add(fingerprint=fp, stem="alice", inputs=[], params={}, identity="e", max_attempts=3)
    job = store.claim(worker, 30)
    assert job is not None and job.fingerprint == fp
    return job


def test_output_names_are_reserved_for_one_job(store: Store) -> None:
    j1 = _running(store, "fp1", "w1")
    j2 = _running(store, "fp2", "w2")
    assert store.reserve_output("alice", j1, "w1")
    assert not store.reserve_output("alice", j2, "w2")  # taken by another job
    assert store.reserve_output("alice.2", j2, "w2")
    assert not store.reserve_output("bob", j1, "w2")  # w2 does not hold j1: nothing reserved
    assert store.output_names(j1.id) == ["alice"]
    store.requeue(j1, "w1", refund=False)
    j1b = store.claim("w3", 30)
    assert j1b is not None and j1b.id == j1.id
    assert not store.reserve_output("alice", j1, "w1")  # the old attempt lost the job
    assert store.reserve_output("alice", j1b, "w3")  # the job's own name again, for its new attempt
    store.release_outputs(j1.id)
    assert store.output_names(j1.id) == [] and store.reserve_output("alice", j2, "w2")


def test_a_bad_drop_is_rejected_once_whoever_sees_it(store: Store) -> None:
    inputs = [{"role": "audio", "name": "x.wav", "size": 10, "mtime_ns": 5}]
    key = rejection_key("x", inputs)
    assert key == rejection_key("x", list(reversed(inputs))) and key != rejection_key("x", [{**inputs[0], "size": 11}])
    first, created = store.reject(key, stem="x", inputs=inputs, error="bad audio")
    second, created2 = store.reject(key, stem="x", inputs=inputs, error="bad audio (seen by another host)")
    assert created and not created2 and first.id == second.id and second.error == "bad audio"
    assert first.rejected and store.counts()["failed"] == 1
    store.delete(first.id)  # `retry` of a refused drop: judged afresh
    assert store.reject(key, stem="x", inputs=inputs, error="still bad")[1]


def test_waiting_list_is_replaced_and_timed_on_the_database_clock(store: Store) -> None:
    store.set_waiting("w1", {"a": ("incomplete: missing audio", 12.0), "b": ("waiting for b.ready", 0.0)})
    now = store.db_time()
    got = store.waiting()
    assert [(w.stem, w.reason, w.reporter) for w in got] == [
        ("a", "incomplete: missing audio", "w1"), ("b", "waiting for b.ready", "w1")]
    assert 11 < now - got[0].since < 20
    store.set_waiting("w2", {"b": ("waiting for b.ready", 1.0)})
    assert [w.stem for w in store.waiting()] == ["b"]
    store.set_waiting("w2", {})
    assert store.waiting() == []


# -- doctor --------------------------------------------------------------------------------------------


def test_health_reports_latency_skew_and_schema(store: Store) -> None:
    h = store.health()
    assert h.reachable and h.error is None and h.schema_version == h.expected_version == 3
    assert h.latency_s is not None and 0 <= h.latency_s < 5
    assert h.clock_skew_s is not None and abs(h.clock_skew_s) < 5


def test_health_of_an_unreachable_server_is_a_finding_not_a_crash() -> None:
    opts = StoreOptions(url="postgresql+psycopg://nobody:pw@127.0.0.1:9/none", connect_timeout_s=2)
    engine = make_engine(build_url(opts, Path()), opts)
    try:
        t0 = time.monotonic()
        h = Store(engine).health()
        assert not h.reachable and h.error and "OperationalError" in h.error
        assert "pw@" not in h.url and time.monotonic() - t0 < 30
    finally:
        engine.dispose()


# -- infinitetalkd migrate ---------------------------------------------------------------------------


def test_migrate_command_creates_then_upgrades_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from daemon import cli
    from daemon.migrations import migrate
    from tests.daemon.conftest import fast_config_dict

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(fast_config_dict(tmp_path)))
    db = tmp_path / "state" / "jobs.db"
    engine = make_engine(build_url(StoreOptions(), db), StoreOptions())
    assert migrate(engine, target=1) == (0, 1)  # a database an older infinitetalkd created
    engine.dispose()
    assert cli.main(["migrate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == f"database sqlite:///{db}: schema 1 -> 3"
    assert cli.main(["migrate", "--config", str(config)]) == 0
    assert "schema 3, up to date" in capsys.readouterr().out


def test_connect_takes_the_config_section(pg_url: str, tmp_path: Path) -> None:
    s = Store.connect(StoreOptions(url=pg_url, statement_timeout_s=7), tmp_path / "unused.db", migrate=None)
    try:
        assert s.backend == "postgresql" and s.schema_version() == 0 and not (tmp_path / "unused.db").exists()
        assert s.migrate() == (0, 3)
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "7s"
    finally:
        s.close()


def test_outages_and_timeouts_are_transient_constraint_errors_are_not(store: Store) -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError

    from daemon.db import is_transient

    opts = StoreOptions(url="postgresql+psycopg://nobody@127.0.0.1:9/none", connect_timeout_s=2)
    with pytest.raises(OperationalError) as down:
        Store.open("postgresql+psycopg://nobody@127.0.0.1:9/none", options=opts)
    assert is_transient(down.value)
    j = _running(store, "fp1", "w")
    with pytest.raises(IntegrityError) as dup, store.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO output_names VALUES ('n', {j.id}, 1, 'w', 0)")
        conn.exec_driver_sql(f"INSERT INTO output_names VALUES ('n', {j.id}, 1, 'w', 0)")
    assert not is_transient(dup.value)


# -- the liveness side thread ------------------------------------------------------------------------


def wait_until(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {cond}"
        time.sleep(0.02)


def test_liveness_keeps_the_job_and_reports_cancel_and_loss(store: Store) -> None:
    from daemon.db_liveness import Liveness

    # lease_s 2.5 with a heartbeat every 0.05 s: only a thread starved for 2.5 s (never, even on a busy CI machine)
    # could lose the job, and the sleep below still outlasts the lease, so only the heartbeats can keep it
    live = Liveness(store, "w", register(store, "w"), lease_s=2.5, interval_s=0.05).start()
    try:
        job = _running(store, "fp1", "w")
        live.track(job)
        live.progress(0.5, "denoise 2/4")
        wait_until(lambda: store.get(job.id).progress_text == "denoise 2/4")  # type: ignore[union-attr]
        time.sleep(3.0)  # past the lease the heartbeats set: only their renewals keep the job
        assert store.claim("thief", 30) is None and store.list_workers()[0].job_id == job.id
        store.request_cancel(job.id)
        wait_until(lambda: live.cancel_requested)
        store.requeue(job, "w", refund=False)  # the job leaves this attempt (as after a takeover)
        wait_until(lambda: live.job_lost)
        register(store, "w", stale_s=-1)  # another process took the name
        wait_until(lambda: live.name_lost)
    finally:
        live.stop()


def test_one_ingest_leader_and_a_takeover_when_it_stops(store: Store) -> None:
    from daemon.db_liveness import Liveness

    a = Liveness(store, "a", register(store, "a"), lease_s=10.0, interval_s=0.05, ingest=True).start()
    b = Liveness(store, "b", register(store, "b"), lease_s=10.0, interval_s=0.05, ingest=True).start()
    try:
        wait_until(lambda: a.leader or b.leader)
        first, second = (a, b) if a.leader else (b, a)
        time.sleep(0.3)
        assert first.leader and not second.leader
        first.stop()  # a clean stop releases the lease at once, long before its 10 s run out
        wait_until(lambda: second.leader, timeout=5)
        assert second.lease is not None and second.lease.epoch == 2
        assert store.lease("ingest").holder == second.name  # type: ignore[union-attr]
    finally:
        a.stop()
        b.stop()
    assert all(w.stopped_at is not None for w in store.list_workers())


def test_liveness_survives_an_unreachable_database(tmp_path: Path) -> None:
    from daemon.db_liveness import Liveness

    opts = StoreOptions(url="postgresql+psycopg://nobody@127.0.0.1:9/none", connect_timeout_s=2)
    down = Store(make_engine(build_url(opts, tmp_path), opts))
    live = Liveness(down, "w", "token", lease_s=1.0, interval_s=0.05, ingest=True)
    try:
        live.beat()
        assert not live.database_ok and "OperationalError" in (live.database_error or "")
        assert live.down_since is not None and not live.leader and live.beats == 1
    finally:
        live.stop()
        down.close()


def test_fleet_snapshot_for_status(store: Store) -> None:
    assert store.fleet_snapshot(stale_s=30) == {"workers": [], "ingest_leader": None, "waiting": []}
    register(store, "a")
    tb = register(store, "b")
    store.stop_worker("b", tb)
    store.acquire_lease("ingest", "a", ttl_s=30)
    store.set_waiting("a", {"x": ("incomplete: missing audio", 3.0)})
    snap = store.fleet_snapshot(stale_s=30)
    assert [(w["name"], w["state"]) for w in snap["workers"]] == [("a", "live"), ("b", "stopped")]
    assert snap["ingest_leader"]["holder"] == "a" and snap["waiting"][0]["stem"] == "x"
    assert [w["state"] for w in store.fleet_snapshot(stale_s=-1)["workers"]] == ["stale", "stopped"]
    store.release_lease("ingest", "a")
    assert store.fleet_snapshot(stale_s=30)["ingest_leader"] is None


def test_connections_cut_by_a_server_restart_are_replaced(pg_url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    s = Store.open(pg_url)
    try:
        assert s.counts()["queued"] == 0  # the pool now holds a connection
        dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as admin:  # what a restart does to every session
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert s.counts()["queued"] == 0  # pre-ping found the dead connection and opened a new one
    finally:
        s.close()


def test_a_client_stopped_inside_a_transaction_blocks_its_siblings_only_briefly(pg_url: str, tmp_path: Path) -> None:
    """A process stopped (SIGSTOP, a debugger) in mid-transaction holds its row locks only until the
    server ends its idle session (after store.statement_timeout_s); a sibling then takes the ingest
    lease over, and the stopped one, resumed, meets an error it waits out like an outage."""
    from sqlalchemy import select, update

    from daemon.config import StoreConfig
    from daemon.db import is_transient
    from daemon.db_models import LEASES

    stopped = Store.connect(StoreConfig(url=pg_url, statement_timeout_s=1), tmp_path)
    other = Store.connect(StoreConfig(url=pg_url, lock_timeout_s=8), tmp_path)
    conn = stopped.engine.connect()
    try:
        assert stopped.acquire_lease("ingest", "a", ttl_s=0.5) is not None
        conn.begin()
        conn.execute(update(LEASES).where(LEASES.c.name == "ingest").values(holder="a"))  # the row is locked
        time.sleep(0.6)  # ... and the holder stops; its lease runs out
        t0 = time.monotonic()
        lease = other.acquire_lease("ingest", "b", ttl_s=30)
        assert lease is not None and lease.holder == "b" and time.monotonic() - t0 < 6
        with pytest.raises(Exception) as cut:
            conn.execute(select(LEASES.c.holder))
        assert is_transient(cut.value)
    finally:
        conn.close()
        stopped.close()
        other.close()
