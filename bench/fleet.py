"""The fleet's own overhead on the CPU, with the fake renderer (tests/daemon/fake_renderer.py) where the GPU would be:

- ``claim``: claim-to-start latency: real daemon processes (tests/daemon/fake_daemon.py) on one inbox and one
  job database; jobs dropped one at a time while the workers are idle; the figure is the job's
  ``started_at - created_at`` on the database clock (queued by the ingest leader -> claimed by some worker);
- ``ingest``: how fast the ingest leader queues many stems dropped at once (each with a ``.ready`` marker, so no
  stability wait), one scanner, from the first pass until every stem is queued;
- ``status``: the wall time of ``infinitetalkd status --json`` with N jobs in the database.

    python -m bench.fleet [--only claim,ingest,status] [--workers 3] [--claims 20] [--stems 5000] [--jobs 10000]
                          [--store-url postgresql+psycopg://user@host/db]

SQLite in each part's temporary state folder by default; with ``--store-url`` every part runs on that
PostgreSQL database instead, **which is emptied before each part** (its ``public`` schema dropped): give
it a throwaway database.

Prints one Markdown table and writes ``fleet.json`` to ``--out`` (default: a temporary folder).
Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(root: Path, store_url: str | None, **over: Any) -> Path:
    doc: dict[str, Any] = {
        "paths": {"inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "state": str(root / "state")},
        "watch": {"mode": "poll", "poll_interval_s": 0.2, "stable_window_s": 0.3},
        "jobs": {"lease_s": 10, "min_free_mb": 0},
        "worker": {"heartbeat_s": 1.0},
        "engine": {"models_dir": str(root / "models"), "device": "cpu"},
        "logging": {"level": "warning", "format": "json"},
    }
    if store_url:
        doc["store"] = {"url": store_url}
    for k, v in over.items():
        doc[k].update(v)
    for d in ("inbox", "outbox", "state", "models"):
        (root / d).mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _drop(inbox: Path, stem: str, shade: int) -> None:
    from tests.daemon.conftest import write_png, write_wav

    write_png(inbox / f"{stem}.png", color=(shade % 256, (shade // 256) % 256, 90))
    write_wav(inbox / f"{stem}.wav", seconds=0.2)
    (inbox / f"{stem}.ready").touch()


def bench_claim(root: Path, workers: int, claims: int, store_url: str | None = None) -> dict[str, Any]:
    from daemon.config import load_config
    from daemon.jobs import JobStatus
    from daemon.store import Store

    cfg_path = _config(root, store_url)
    cfg = load_config(cfg_path)
    env = dict(os.environ, FAKE_STEPS="2", FAKE_STEP_S="0.01", PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.daemon.fake_daemon", str(cfg_path)], cwd=REPO,
                              env=dict(env, INFINITETALKD_WORKER=f"w{i}",
                                       INFINITETALKD_STATE=str(root / "state" / f"w{i}")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(workers)]
    store = Store.connect(cfg.store, cfg.paths.database)
    try:
        _wait(lambda: len([w for w in store.list_workers() if w.stopped_at is None]) == workers, 120, "workers")
        latencies = []
        for i in range(claims):
            _drop(cfg.paths.inbox, f"c{i}", i)
            job = _wait(lambda n=f"c{i}": (j := store.find(n)) is not None and j.status is JobStatus.DONE and j,
                        60, f"job c{i}")
            latencies.append(job.started_at - job.created_at)
    finally:
        store.close()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    lat = sorted(latencies)
    return {"what": f"claim-to-start latency, {workers} daemons on {_backend(store_url)}, idle (the ingest leader "
                    "wakes its own worker at once; the others poll every watch.poll_interval_s = 0.2 s)",
            "median_s": round(statistics.median(lat), 3), "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
            "max_s": round(lat[-1], 3), "n": len(lat)}


def bench_ingest(root: Path, stems: int, store_url: str | None = None) -> dict[str, Any]:
    from daemon.config import load_config
    from daemon.store import Store
    from daemon.watcher import Scanner

    cfg = load_config(_config(root, store_url, jobs={"ready_marker": "required"}))
    for i in range(stems):
        _drop(cfg.paths.inbox, f"s{i:05d}", i)
    store = Store.connect(cfg.store, cfg.paths.database)
    try:
        scanner = Scanner(cfg, store, "fake-renderer/1", files_lock=threading.Lock(), wake_worker=lambda: None)
        t0 = time.perf_counter()
        passes = 0
        while store.counts()["queued"] < stems:
            scanner.scan_once()
            passes += 1
        seconds = time.perf_counter() - t0
    finally:
        store.close()
    return {"what": f"ingest of {stems} stems dropped at once (png + wav + .ready, one scanner, {_backend(store_url)})",
            "seconds": round(seconds, 2), "stems_per_s": round(stems / seconds, 1), "passes": passes}


def bench_status(root: Path, jobs: int, repeat: int = 5, store_url: str | None = None) -> dict[str, Any]:
    from sqlalchemy import insert

    from daemon import cli
    from daemon.config import load_config
    from daemon.jobs import JobRow, JobStatus
    from daemon.store import Store

    cfg_path = _config(root, store_url)
    cfg = load_config(cfg_path)
    store = Store.connect(cfg.store, cfg.paths.database)
    now = time.time()
    statuses = [JobStatus.DONE] * 8 + [JobStatus.FAILED, JobStatus.QUEUED]
    rows = [{"fingerprint": f"{i:064x}", "stem": f"s{i}", "status": statuses[i % 10].value, "attempts": 1,
             "max_attempts": 3, "cancel_requested": False, "created_at": now - jobs + i, "updated_at": now,
             "started_at": now - jobs + i, "finished_at": now - jobs + i + 1, "progress": 1.0, "progress_text": "",
             "inputs": [{"role": "image", "name": f"s{i}.png", "size": 1, "mtime_ns": 1}], "params": {},
             "engine_identity": "fake", "outputs": {"mp4": f"s{i}.mp4"}, "timings": {}} for i in range(jobs)]
    with store.engine.begin() as conn:
        conn.execute(insert(JobRow.__table__), rows)  # type: ignore[arg-type]
    store.close()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["status", "--json", "--config", str(cfg_path)]) == 0
        times.append(time.perf_counter() - t0)
    return {"what": f"infinitetalkd status --json with {jobs} jobs ({_backend(store_url)}, in-process)",
            "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), "n": repeat}


def _empty_database(url: str) -> None:
    """A fresh start for the next part on PostgreSQL: the schema dropped and made again."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


def _backend(store_url: str | None) -> str:
    return "PostgreSQL" if store_url else "SQLite"


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="claim,ingest,status")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--claims", type=int, default=20)
    ap.add_argument("--stems", type=int, default=5000)
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--store-url", default=None, help="a throwaway PostgreSQL database (emptied before each part)")
    args = ap.parse_args(argv)
    url = args.store_url
    from daemon.log import setup_logging

    setup_logging("warning", "json")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    out.mkdir(parents=True, exist_ok=True)
    parts = {"claim": lambda d: bench_claim(d, args.workers, args.claims, store_url=url),
             "ingest": lambda d: bench_ingest(d, args.stems, store_url=url),
             "status": lambda d: bench_status(d, args.jobs, store_url=url)}
    results = {}
    for name in args.only.split(","):
        if url:
            _empty_database(url)
        with tempfile.TemporaryDirectory(prefix=f"bench-fleet-{name}-") as d:
            results[name] = parts[name](Path(d))
    doc = {"date": time.strftime("%Y-%m-%d"), "store": _backend(url),
           "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
           "python": platform.python_version(), "results": results}
    (out / "fleet.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print("| part | what | figures |\n|---|---|---|")
    for name, r in results.items():
        figures = ", ".join(f"{k} {v}" for k, v in r.items() if k != "what")
        print(f"| {name} | {r['what']} | {figures} |")
    print(f"(written to {out / 'fleet.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
