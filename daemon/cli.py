"""``infinitetalkd``: one console script with subcommands.

    infinitetalkd run [--config FILE]                  the daemon (systemd runs this)
    infinitetalkd status [--config FILE] [--json]      queue, running job with progress, failures
    infinitetalkd retry JOB | cancel JOB               JOB is a job id or a stem (``cancel -- -x``
                                                       for a stem beginning with '-')
    infinitetalkd redo JOB --from-chunk N [--seed S]   re-render a finished job from chunk N (new name)
    infinitetalkd web [--config FILE]                  the web page and HTTP API (no GPU, no engine)
    infinitetalkd doctor [--config FILE] [--models-dir DIR] [--json]
    infinitetalkd migrate [--config FILE]              bring the job database's schema up to date
    infinitetalkd tiny-models DIR [--seed N]           write a tiny random models folder (tests, demo)
    infinitetalkd render IMAGE AUDIO [AUDIO2] -o OUT.mp4 [...]   one render, no daemon, no database

Exit codes: :data:`EXIT_CODES` (``--help`` lists them). 78 (EX_CONFIG) is in the systemd unit's
RestartPreventExitStatus.

This is the only daemon module that imports the engine beyond its torch-free modules (``engine.api``,
``engine.recipes``, ``engine.settings``), and only inside functions (through :func:`_engine`), so
``status`` or ``cancel`` never pay for torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any, cast

from sqlalchemy.exc import DatabaseError, OperationalError

from daemon import doctor, oneshot, statefiles
from daemon.config import EX_CONFIG, Config, ConfigError, load_config
from daemon.db import StoreConfigError
from daemon.instance import stale_after
from daemon.jobs import Job, JobStatus
from daemon.ops import OpError, retry_job
from daemon.patience import unusable_database
from daemon.progress import format_duration
from daemon.store import Store, StoreError
from engine.api import (
    EngineOptions,
    InputError,
    Renderer,
    RenderError,
    RenderStopped,
)
from engine.recipes import PRESETS
from engine.settings import parse_set_option, request_from_settings, settings_help

__all__ = ["main"]

DEFAULT_CONFIG = os.environ.get("INFINITETALKD_CONFIG", "config.yaml")
EXIT_INPUT = 2


class _Fail(Exception):
    """Print the message and exit with the code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- engine access (lazy; tests replace these two functions) --------------------------------


def _engine(module: str) -> Any:
    return importlib.import_module(module)


def _load_engine(options: EngineOptions) -> Renderer:
    return cast(Renderer, _engine("engine").load_engine(options))


def _models_doctor(models_dir: Path, files: Mapping[str, str], need_lora: bool) -> tuple[bool, list[str]]:
    ok, lines = _engine("engine.models_dir").doctor(models_dir, files, need_lora=need_lora)
    return bool(ok), [str(x) for x in lines]


# -- helpers --------------------------------------------------------------------------------


def _config(path: str) -> Config:
    try:
        return load_config(Path(path))
    except ConfigError as exc:
        raise _Fail(str(exc), EX_CONFIG) from None


def _store(cfg: Config, *, create: bool = False, busy_timeout_ms: int = 10_000) -> Store:
    db = cfg.paths.database
    if cfg.store.url is None and not create and not db.exists():
        raise _Fail(f"no job database at {db} yet (start the daemon once: infinitetalkd run)")
    settings = cfg.store.model_copy(update={"busy_timeout_s": busy_timeout_ms / 1000})
    try:
        return Store.connect(settings, db)
    except (StoreError, StoreConfigError) as exc:
        raise _Fail(str(exc), EX_CONFIG) from None
    except OperationalError as exc:
        if _is_locked(exc):
            raise _busy(db) from None
        raise _Fail(unusable_database(db, exc), EX_CONFIG) from None
    except DatabaseError as exc:
        raise _Fail(unusable_database(db, exc), EX_CONFIG) from None


def _is_locked(exc: OperationalError) -> bool:
    return any(w in str(exc.orig or exc).lower() for w in ("locked", "busy"))


def _busy(db: Path) -> _Fail:
    return _Fail(f"database busy: another process holds {db} locked (a backup, an sqlite3 shell?); "
                 "try again in a moment")


def _find(store: Store, key: str) -> Job:
    job = store.find(key)
    if job is None:
        raise _Fail(f"no job {key!r} (give a job id or a stem; see infinitetalkd status)")
    return job


def _fmt_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _models_check(models_dir: Path, files: Mapping[str, str], preset: str) -> tuple[bool, list[str]]:
    """The model files for ``preset``'s LoRA policy, plus the tokenizer file when engine.files names one."""
    ok, lines = _models_doctor(models_dir, files, PRESETS[preset].use_lora)
    tokenizer = files.get("tokenizer")
    if tokenizer:  # checked here, not by the engine's model check: it is a path of its own, not in models_dir
        found = Path(tokenizer).is_file()
        ok = ok and found
        lines.append(f"{'ok' if found else 'MISSING':<8} tokenizer     {tokenizer}  (engine.files.tokenizer"
                     + (")" if found else ": no such file; give the spiece.model of google/umt5-xxl)"))
    return ok, lines


# -- subcommands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    ok, lines = _models_check(cfg.engine.models_dir, cfg.engine.options().files, cfg.engine.preset)
    if not ok:
        print(f"infinitetalkd: model files missing or wrong in {cfg.engine.models_dir} "
              f"(engine.models_dir in {cfg.source}):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        print("Put the files where the lines say (ComfyUI models/ layout), or set engine.files; "
              "'infinitetalkd doctor' checks again.", file=sys.stderr)
        return EX_CONFIG
    from daemon.service import run_daemon

    return run_daemon(cfg, _load_engine, device=args.device)


def _job_brief(j: Job) -> dict[str, Any]:
    return {
        "id": j.id, "stem": j.stem, "status": j.status.value, "attempts": j.attempts,
        "max_attempts": j.max_attempts, "progress": round(j.progress, 4), "progress_text": j.progress_text,
        "cancel_requested": j.cancel_requested, "error": j.error, "outputs": j.outputs,
        "failed_dir": j.failed_dir, "created_at": j.created_at, "started_at": j.started_at,
        "finished_at": j.finished_at, "resumed_from_chunk": j.resumed_from_chunk,
        "chunks_rendered": j.chunks_rendered,
        "redo": None if j.redo_of is None else {"of_job": j.redo_of, "from_chunk": j.redo_from_chunk,
                                                "seed": j.redo_seed},
    }


def _chunk_note(j: Job) -> str:
    """``status`` text: how the job's chunks went (docs/daemon.md §4.8); "" before the first chunk."""
    parts = [f"resumed from chunk {j.resumed_from_chunk}"] if j.resumed_from_chunk is not None else []
    if j.chunks_rendered:
        parts.append(f"{j.chunks_rendered} chunk{'s' if j.chunks_rendered != 1 else ''} rendered in total")
    if j.redo_of is not None:
        parts.append(f"redo of #{j.redo_of} from chunk {j.redo_from_chunk}, seed {j.redo_seed}")
    return f" ({'; '.join(parts)})" if parts else ""


def _recent_render_s(done: list[Job]) -> float | None:
    """Mean wall time (start to finish) of recently finished jobs; None when there are none."""
    spans = [j.finished_at - j.started_at for j in done if j.finished_at and j.started_at]
    return round(sum(spans) / len(spans), 1) if spans else None


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    store = _store(cfg, busy_timeout_ms=2000)  # a status that hangs is worse than "database busy"
    try:
        counts = store.counts()
        running = store.list_jobs([JobStatus.RUNNING], limit=10)
        queued = sorted(store.list_jobs([JobStatus.QUEUED], limit=20), key=lambda j: j.id)
        recent = store.list_jobs([JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED], limit=10)
        done = store.list_jobs([JobStatus.DONE], limit=10)
        last = store.last_success()
        fleet = store.fleet_snapshot(stale_after(cfg))
        fleet["store"] = store.url
    except OperationalError as exc:
        if _is_locked(exc):
            raise _busy(cfg.paths.database) from None
        raise
    finally:
        store.close()
    inbox = statefiles.read(cfg.paths.state, statefiles.INBOX)
    # each worker's pause reason from the database (any host, any state folder); a daemon that has not
    # written one yet (an older version) still has state/worker.json
    pauses = [(w["name"], str(w["paused"])) for w in fleet["workers"] if w.get("paused") and w["state"] == "live"]
    own = statefiles.read(cfg.paths.state, statefiles.WORKER)
    paused = str(own.get("paused") or "") if not pauses else pauses[0][1]
    per_job = _recent_render_s(done)
    queue_s = None if per_job is None else per_job * counts.get(JobStatus.QUEUED.value, 0)
    if args.json:
        doc = {"counts": counts, "running": [_job_brief(j) for j in running],
               "queued": [_job_brief(j) for j in queued], "recent": [_job_brief(j) for j in recent],
               "last_success": last, "inbox": inbox, "recent_render_s": per_job, "queue_estimate_s": queue_s,
               "paused": paused or None, **fleet}
        print(json.dumps(doc, indent=2))
        return 0
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; last success {_fmt_time(last)}")
    for name, reason in pauses or ([("", paused)] if paused else []):
        print(f"paused   {reason}" + (f" (worker {name})" if name else ""))
    _print_fleet(fleet)
    for j in running:
        cancel = " (cancel requested)" if j.cancel_requested else ""
        print(f"running  #{j.id} {j.stem}: {j.progress_text or 'starting'}{cancel}, "
              f"attempt {j.attempts}/{j.max_attempts}, since {_fmt_time(j.started_at)}{_chunk_note(j)}")
    if queue_s and per_job is not None:
        print(f"queue    about {format_duration(queue_s)} of rendering at the recent average of "
              f"{format_duration(per_job)} per job")
    for j in queued:
        cancel = " (cancel requested)" if j.cancel_requested else ""
        print(f"queued   #{j.id} {j.stem}{cancel}, attempts used {j.attempts}/{j.max_attempts}")
    for w in fleet["waiting"] or inbox.get("waiting", []):
        print(f"waiting  {w.get('stem')}: {w.get('reason')}")
    if inbox.get("inbox_missing"):
        print(f"inbox    {inbox.get('inbox')} is MISSING (not mounted?)")
    for j in recent:
        detail = j.outputs.get("mp4", "") if j.status is JobStatus.DONE else (j.error or "")
        print(f"{j.status.value:<8} #{j.id} {j.stem} {_fmt_time(j.finished_at)}  {detail}{_chunk_note(j)}")
    return 0


def _print_fleet(fleet: dict[str, Any]) -> None:
    """Workers and the ingest leader (``status`` text); one line per worker."""
    leader = fleet.get("ingest_leader")
    print(f"store    {fleet['store']}; ingest leader "
          + (f"{leader['holder']} (lease {leader['remaining_s']:.0f} s left)" if leader else "none"))
    for w in fleet["workers"]:
        job = f"job #{w['job_id']}" if w["job_id"] is not None else "idle"
        gpu = f" {w['gpu']}" if w.get("gpu") and w["gpu"] != w["device"] else ""
        print(f"worker   {w['name']} ({w['state']}, {w['device']}{gpu}, pid {w['pid']} on {w['host']}): {job}, "
              f"heartbeat {w['heartbeat_age_s']:.0f} s ago")


def cmd_retry(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    store = _store(cfg)
    try:
        job = _find(store, args.job)
        try:
            done = retry_job(cfg, store, job)
        except OpError as exc:
            raise _Fail(str(exc)) from None
        moved = done.moved
        if done.rescan:
            print(f"job #{job.id} ({job.stem}): moved {len(moved)} file(s) back to the inbox for a new scan")
            return 0
        print(f"job #{job.id} ({job.stem}) queued again" + (f"; moved back {', '.join(moved)}" if moved else ""))
        return 0
    except OperationalError as exc:
        if _is_locked(exc):
            raise _busy(cfg.paths.database) from None
        raise
    finally:
        store.close()


def cmd_cancel(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    store = _store(cfg)
    try:
        job = _find(store, args.job)
        new = store.request_cancel(job.id)
        if new is None:
            raise _Fail(f"job #{job.id} is already {job.status.value}")
        when = "stops at its next step" if new.status is JobStatus.RUNNING else "is cancelled by the daemon shortly"
        print(f"job #{job.id} ({job.stem}): cancel requested; it {when}; its inputs go to {cfg.paths.failed}/")
        return 0
    except OperationalError as exc:
        if _is_locked(exc):
            raise _busy(cfg.paths.database) from None
        raise
    finally:
        store.close()


def cmd_redo(args: argparse.Namespace) -> int:
    """Queue a re-render of a finished job from chunk N with another seed (daemon/redo.py)."""
    from daemon.redo import RedoError, redo_stem, request_redo

    cfg = _config(args.config)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if not 0 <= seed < 2**63:
        raise _Fail(f"--seed {seed}: must be 0 to 2**63 - 1", EXIT_INPUT)
    store = _store(cfg)
    try:
        job = _find(store, args.job)
        try:
            new, created = request_redo(cfg, store, job, args.from_chunk, seed)
        except (RedoError, OSError) as exc:
            raise _Fail(str(exc)) from None
    finally:
        store.close()
    if not created:
        print(f"job #{new.id} ({new.stem}) already re-renders job #{job.id} from chunk {args.from_chunk} with seed "
              f"{seed}; it is {new.status.value}")
        return 0
    print(f"job #{new.id} queued: re-renders job #{job.id} ({job.stem}) from chunk {args.from_chunk} with seed "
          f"{seed}; chunks 0 to {args.from_chunk - 1} are kept. The result is published as "
          f"{redo_stem(job.stem, args.from_chunk, seed)}.mp4; {job.outputs.get('mp4', 'the original')} stays.")
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    """The page and HTTP API (daemon/web/): no engine, no GPU; imported only here."""
    from daemon.web.server import serve

    return serve(_config(args.config))


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.config is None and args.models_dir is not None:
        checks = doctor.check_models(Path(args.models_dir), {}, "lightx2v", _models_check)
        if not args.json:
            print("\n".join(checks[0].details))
    else:
        cfg = _config(args.config or DEFAULT_CONFIG)
        models_dir = Path(args.models_dir) if args.models_dir else cfg.engine.models_dir
        checks = doctor.check_installation(cfg, models_dir, _models_check, _engine)
        if not args.json:
            doctor.print_checks(checks)
    report = doctor.as_json(checks)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def _doctor_gpu(device: str) -> int:
    """Print the GPU checks; the number of problems."""
    checks = doctor.check_gpu(device, _engine)
    doctor.print_checks(checks)
    return sum(c.status == "bad" for c in checks)


def cmd_tiny_models(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    _engine("engine.tiny").write_tiny_models(out, seed=args.seed)
    print(f"wrote a tiny random models folder to {out} (for tests and the demo; it renders noise)")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from daemon import inbox as ib
    from daemon.log import setup_logging

    cfg = _config(args.config) if args.config else None
    image = Path(args.image).resolve()
    base = Path(args.sidecar).resolve().parent if args.sidecar else Path.cwd()
    settings: dict[str, object] = {}
    try:
        if args.sidecar:
            settings.update(ib.load_sidecar(Path(args.sidecar), 1 << 20))
        if args.audio2:
            settings["audio2"] = args.audio2
        for item in args.set or []:
            key, value = parse_set_option(item)
            settings[key] = value
        is_video = image.suffix.lower().lstrip(".") in ib.VIDEO_EXTS
        request = request_from_settings(
            settings, audio=Path(args.audio).resolve(), image=None if is_video else image,
            video=image if is_video else None, resolve=lambda _k, name: (base / name).resolve(),
            defaults=cfg.render if cfg else None,
        )
        for p in (*request.audio, request.image or request.video, *request.masks):
            if p is not None and not p.is_file():
                raise InputError(f"{p}: no such file")
    except InputError as exc:
        print(f"infinitetalkd render: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_INPUT
    if cfg is not None:
        options = cfg.engine.options()
        if args.models_dir:
            options = dataclasses.replace(options, models_dir=Path(args.models_dir).resolve())
    else:
        options = EngineOptions(models_dir=Path(args.models_dir or "models").resolve())
    # A one-shot engine serves this one job: load it with the job's LoRA policy (the daemon's resident engine
    # instead refuses jobs whose preset needs the other policy).
    options = dataclasses.replace(options, preset=request.preset)
    ok, lines = _models_check(options.models_dir, options.files, options.preset)
    if not ok:
        print("infinitetalkd render: model files missing or wrong:\n  " + "\n  ".join(lines), file=sys.stderr)
        return EX_CONFIG
    setup_logging("warning", "console" if sys.stderr.isatty() else "json")
    oneshot.announce(request, options, _engine)
    out = Path(args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial.mp4")
    stop = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    old = signal.signal(signal.SIGINT, on_signal)
    bar = oneshot.ProgressBar()
    try:
        t0 = time.monotonic()
        renderer = _load_engine(options)
        print(f"engine loaded in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        result = renderer.render(request, tmp, bar, lambda: stop)
        bar.done()
        os.replace(tmp, out)
    except InputError as exc:
        bar.done()
        print(f"infinitetalkd render: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_INPUT
    except RenderStopped:
        bar.done()
        print("infinitetalkd render: interrupted", file=sys.stderr)
        return 130
    except RenderError as exc:
        bar.done()
        print(f"infinitetalkd render: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, old)
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}: {result.width}x{result.height}, {result.frames} frames, {result.duration_s:.2f} s "
          f"in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the job database (``store`` in the config; SQLite in paths.state by default).
    Safe while daemons run and from several hosts at once: migrations take a database lock."""
    from sqlalchemy.exc import SQLAlchemyError

    from daemon.db import StoreConfigError

    cfg = _config(args.config)
    try:
        store = Store.connect(getattr(cfg, "store", None), cfg.paths.database, migrate=None)
    except (StoreError, StoreConfigError) as exc:
        raise _Fail(str(exc), EX_CONFIG) from None
    try:
        found, now = store.migrate()
    except StoreError as exc:
        raise _Fail(str(exc), EX_CONFIG) from None
    except SQLAlchemyError as exc:
        raise _Fail(f"database {store.url}: {str(getattr(exc, 'orig', None) or exc).strip()}") from None
    finally:
        store.close()
    print(f"database {store.url}: " + (f"schema {found} -> {now}" if now != found else f"schema {now}, up to date"))
    return 0


# -- entry point ----------------------------------------------------------------------------


# (code, meaning): the epilog of --help and the README's list
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "ok"),
    (1, "failure (a job not found, a doctor check failed, a render failed)"),
    (2, "bad input: a wrong setting or an unreadable file (render), or a wrong command line"),
    (75, "device fault: the daemon wants a clean restart (EX_TEMPFAIL)"),
    (EX_CONFIG, "configuration error or missing model files (EX_CONFIG; systemd does not restart on it)"),
    (130, "interrupted (render, Ctrl-C)"),
)


def _version() -> str:
    try:
        return importlib.metadata.version("infinitetalkd")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return str(_engine("engine").__version__)


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:<4}{what}" for code, what in EXIT_CODES)
    ap = argparse.ArgumentParser(prog="infinitetalkd", description="Watch-folder InfiniteTalk render daemon.",
                                 epilog=f"exit codes:\n{codes}", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"infinitetalkd {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG) -> None:
        p.add_argument("--config", default=default, help=f"config file (default: {DEFAULT_CONFIG}; "
                       "env INFINITETALKD_CONFIG)")

    p = sub.add_parser("run", help="run the daemon")
    with_config(p)
    p.add_argument("--device", help="the GPU of this worker, e.g. cuda:1 (overrides engine.device; env "
                   "INFINITETALKD_DEVICE); the worker is named <host>/<device> unless worker.name is set")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="queue, running job and progress, recent results")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    for name, func, what in (("retry", cmd_retry, "queue a failed or cancelled job again"),
                             ("cancel", cmd_cancel, "cancel a queued job, or stop a running one at its next step")):
        p = sub.add_parser(name, help=what)
        p.add_argument("job", help="job id or stem (a stem that begins with '-' goes after '--': "
                       f"infinitetalkd {name} -- -x)")
        with_config(p)
        p.set_defaults(func=func)
    p = sub.add_parser("redo", help="re-render a finished job from chunk N with another seed (needs "
                       "jobs.keep_checkpoints_h)")
    p.add_argument("job", help="job id or stem of a finished job")
    p.add_argument("--from-chunk", type=int, required=True, metavar="N",
                   help="the first chunk to render again (0-based; chunks before it are kept)")
    p.add_argument("--seed", type=int, help="the seed of chunks N and later (default: a random one, printed)")
    with_config(p)
    p.set_defaults(func=cmd_redo)
    p = sub.add_parser("web", help="serve the web page and HTTP API (see README 'Web page and API')")
    with_config(p)
    p.set_defaults(func=cmd_web)
    p = sub.add_parser("doctor", help="check config, folders, filesystems, database, models and GPU")
    with_config(p, default=None)
    p.add_argument("--models-dir", help="check this models folder (alone: only the model check)")
    p.add_argument("--json", action="store_true", help="machine-readable output: {ok, problems, checks: [...]}")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("migrate", help="create or upgrade the job database schema")
    with_config(p)
    p.set_defaults(func=cmd_migrate)
    what = "write a tiny random models folder in the real ComfyUI layout (for tests and the demo; it renders noise)"
    p = sub.add_parser("tiny-models", help=what, description=what)
    p.add_argument("dir", help="the folder to write (created; files in it are replaced)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    p.set_defaults(func=cmd_tiny_models)
    p = sub.add_parser("render", help="render one job without the daemon", description="Render one job without "
                       "the daemon and its database.", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="settings (--set KEY=VALUE, or keys of --sidecar; values are JSON: 7, 2.5, true, "
                       "[896, 448]):\n" + settings_help())
    p.add_argument("image", help="portrait image, or a video to dub")
    p.add_argument("audio", help="speech file")
    p.add_argument("audio2", nargs="?", help="second speaker's speech file")
    p.add_argument("-o", "--output", required=True, help="output .mp4")
    p.add_argument("--models-dir", help="ComfyUI models folder (default: engine.models_dir, else ./models)")
    p.add_argument("--config", default=None, help="take engine settings and render defaults from this config")
    p.add_argument("--sidecar", help="a job YAML with settings; file names in it are relative to it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a setting (repeatable; keys below)")
    p.set_defaults(func=cmd_render)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _Fail as exc:
        print(f"infinitetalkd: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
