"""A fleet on one inbox: three real daemon processes (the fake renderer) sharing one job database,
on SQLite (one host) and on PostgreSQL (as several hosts would).

During the run the worker rendering a job is killed with SIGKILL, and its job is taken over by
another worker once its lease expires, with no restart of anything; then the ingest leader is
killed and another daemon takes the inbox over. At the end every good drop is published exactly
once (one mp4, one json, one log) and every bad drop has exactly one failed/ folder.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemon import cli, doctor
from daemon.config import parse_config
from daemon.instance import resolve
from daemon.jobs import JobStatus
from daemon.store import Store
from daemon.store_fleet import INGEST_LEASE
from tests.daemon.conftest import Env, spawn, wait_for, write_png, write_wav

LEASE_S = 3.0
STEPS, STEP_S = 15, 0.1  # 1.5 s a render


def _drop_bad(env: Env, stem: str) -> None:
    (env.inbox / f"{stem}.png").write_bytes(b"this is not an image at all")
    write_wav(env.inbox / f"{stem}.wav")


def _drop_good(env: Env, stem: str, shade: int) -> None:
    write_png(env.inbox / f"{stem}.png", color=(shade, 120, 90))  # distinct fingerprints
    write_wav(env.inbox / f"{stem}.wav")


def _start(env: Env, names: list[str]) -> dict[str, subprocess.Popen[bytes]]:
    return {name: spawn(env, steps=STEPS, step_s=STEP_S, extra_env={
        "INFINITETALKD_WORKER": name, "INFINITETALKD_STATE": str(env.root / "state" / name)})
        for name in names}


def test_three_daemons_share_one_inbox(db_target: Path | str, tmp_path: Path, procs: list[subprocess.Popen[bytes]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    store_cfg = {} if isinstance(db_target, Path) else {"store": {"url": db_target}}
    env = Env(tmp_path, {"jobs": {"lease_s": LEASE_S, "max_attempts": 3},
                         "worker": {"heartbeat_s": 0.3}, **store_cfg})
    good = [f"good{i}" for i in range(9)]
    bad = ["bad0", "bad1"]
    for i, stem in enumerate(good):
        _drop_good(env, stem, 10 + 20 * i)
    for stem in bad:
        _drop_bad(env, stem)
    daemons = _start(env, ["w0", "w1", "w2"])
    procs.extend(daemons.values())
    store = Store.connect(env.config.store, env.config.paths.database)
    try:
        # 1. kill -9 the worker of a job in mid-render: another worker takes the job over.
        victim = wait_for(lambda: next((j for j in store.list_jobs([JobStatus.RUNNING])
                                        if j.progress > 0 and j.worker_id in daemons), None),
                          timeout=60, what="a render in progress")
        killed_at = time.monotonic()
        daemons[str(victim.worker_id)].send_signal(signal.SIGKILL)
        daemons[str(victim.worker_id)].wait(10)
        taken = wait_for(lambda: (j := store.get(victim.id)) is not None and j.worker_id != victim.worker_id
                         and j.status in (JobStatus.RUNNING, JobStatus.DONE) and j, timeout=60,
                         what="another worker to take the killed worker's job over")
        assert taken.attempts == victim.attempts + 1
        assert time.monotonic() - killed_at < LEASE_S + 30  # the lease, plus a loaded machine's slack
        done = env.wait_status(victim.stem, JobStatus.DONE, timeout=60)
        assert done.worker_id != victim.worker_id

        # 2. kill -9 the ingest leader: a survivor takes the inbox over.
        alive = {n: p for n, p in daemons.items() if p.poll() is None}
        leader = wait_for(lambda: (lease := store.lease(INGEST_LEASE)) is not None and lease.remaining_s > 0
                          and lease.holder in alive and lease.holder, timeout=60, what="a live ingest leader")
        alive.pop(leader).send_signal(signal.SIGKILL)
        daemons[leader].wait(10)
        late_good, late_bad = ["late0", "late1"], ["latebad"]
        for i, stem in enumerate(late_good):
            _drop_good(env, stem, 200 + 20 * i)
        for stem in late_bad:
            _drop_bad(env, stem)
        good += late_good
        bad += late_bad
        for stem in good:
            env.wait_status(stem, JobStatus.DONE, timeout=90)
        wait_for(lambda: all((env.failed / s).is_dir() for s in bad), timeout=60, what="every bad drop refused")
        new_leader = store.lease(INGEST_LEASE)
        assert new_leader is not None and new_leader.holder in alive
        assert all(p.poll() is None for p in alive.values()), "a surviving daemon exited"
        capsys.readouterr()
        assert cli.main(["status", "--json", "--config", str(env.config_path)]) == 0
        status = json.loads(capsys.readouterr().out)
        states = {w["name"]: w["state"] for w in status["workers"]}
        assert set(states) == {"w0", "w1", "w2"} and all(states[n] == "live" for n in alive)
        assert status["ingest_leader"]["holder"] in alive and "password" not in json.dumps(status)
    finally:
        store.close()
        env.close()
    for p in alive.values():
        p.send_signal(signal.SIGTERM)
    for p in alive.values():
        assert p.wait(30) == 0

    # Exactly once: one mp4, json and log per good drop, nothing else in the outbox.
    assert env.outbox_files() == sorted(f"{s}.{ext}" for s in good for ext in ("json", "log", "mp4"))
    assert sorted(p.name for p in env.failed.iterdir()) == sorted(bad)  # one folder per bad drop
    for stem in bad:
        assert "error.txt" in {p.name for p in (env.failed / stem).iterdir()}
    store = Store.connect(env.config.store, env.config.paths.database)
    try:
        jobs = store.list_jobs(limit=1000)
    finally:
        store.close()
    assert sorted(j.stem for j in jobs if j.status is JobStatus.DONE) == sorted(good)
    assert sorted(j.stem for j in jobs if j.status is JobStatus.FAILED) == sorted(bad)  # one refusal each
    assert len(jobs) == len(good) + len(bad)
    assert not list(env.inbox.iterdir())  # every input archived or in failed/


def test_one_config_serves_every_gpu_of_a_host(tmp_path: Path) -> None:
    """The template unit's environment: device, worker name, per-worker state, metrics port; the
    SQLite database stays in the config's state folder, shared by the workers."""
    cfg = parse_config({"paths": {"state": str(tmp_path / "state")}}, base=tmp_path, where="test")
    inst = resolve(cfg, env={"INFINITETALKD_DEVICE": "cuda:2", "INFINITETALKD_STATE": str(tmp_path / "state" / "2"),
                             "INFINITETALKD_METRICS_PORT": "9472"})
    assert inst.name.endswith("/cuda:2") and inst.config.engine.device == "cuda:2"
    assert inst.config.paths.state == tmp_path / "state" / "2" and inst.database == tmp_path / "state" / "jobs.db"
    assert inst.config.metrics.port == 9472 and inst.tmp.parent == cfg.paths.tmp and "/" not in inst.tmp.name
    assert resolve(cfg, device="cuda:1", env={"INFINITETALKD_WORKER": "box-a/gpu1"}).name == "box-a/gpu1"
    with pytest.raises(ValueError, match="INFINITETALKD_METRICS_PORT"):
        resolve(cfg, env={"INFINITETALKD_METRICS_PORT": "http"})


def test_doctor_checks_the_job_database(tmp_path: Path) -> None:
    cfg = parse_config({"paths": {"state": str(tmp_path / "state")}}, base=tmp_path, where="test")
    (tmp_path / "state").mkdir()
    Store.connect(cfg.store, cfg.paths.database).close()  # creates the schema
    checks = {c.name: c for c in doctor.check_store(cfg)}
    assert [checks[n].status for n in ("database", "clock_skew", "schema", "fleet")] == ["ok"] * 4
    assert "latency" in checks["database"].text
    bad = parse_config({"paths": {"state": str(tmp_path / "state")}, "store": {
        "url": "postgresql+psycopg://nobody@127.0.0.1:1/none", "connect_timeout_s": 2}}, base=tmp_path, where="test")
    [only] = doctor.check_store(bad)
    assert only.status == "bad" and "unreachable" in only.text


def test_nothing_is_claimed_while_the_database_is_unreachable(tmp_path: Path) -> None:
    """The side thread found the database unreachable (a real server that does not answer): the worker
    claims nothing, says why, and claims again once a heartbeat gets through."""
    import threading

    from daemon.config import StoreConfig
    from daemon.db_liveness import Liveness
    from daemon.metrics import Metrics
    from daemon.notify import Notifier
    from daemon.worker import Worker
    from tests.daemon.fake_renderer import FakeRenderer

    env = Env(tmp_path)
    try:
        for d in (env.outbox, env.config.paths.state):
            d.mkdir(parents=True, exist_ok=True)
        store = env.store
        job, _ = store.add(fingerprint="a" * 64, stem="alice", inputs=[], params={}, identity="x", max_attempts=3)
        down = Store.connect(StoreConfig(url="postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout_s=1),
                             tmp_path, migrate=None)
        token = store.register_worker("w", host="here", pid=1, device="cpu", gpu="", version="test", stale_s=60)
        live = Liveness(down, "w", token, lease_s=10, interval_s=1)
        live.beat()
        assert not live.database_ok and live.database_error
        worker = Worker(env.config, store, FakeRenderer(env.config.engine.options()), "x", notifier=Notifier({}),
                        metrics=Metrics(), stop=threading.Event(), wake=threading.Event(),
                        files_lock=threading.Lock(), name="w", live=live)
        assert worker._once() is None
        assert store.get(job.id).status is JobStatus.QUEUED  # type: ignore[union-attr]
        assert "the job database is unreachable" in worker.paused
        down.close()
        live.store = store  # the database answers again
        live.beat()
        assert live.database_ok
        assert not live.name_lost and worker._once() is not None  # claimed and ran (its inputs are gone)
        assert store.get(job.id).status is not JobStatus.QUEUED  # type: ignore[union-attr]
    finally:
        env.close()
