"""``infinitetalkd doctor``: checks of an installation, as lines for people or JSON for scripts.

Each check is a :class:`Check` (ok, bad or info, one line, optional detail lines). The engine is reached
only through the two callables the command line passes in (the model check and a lazy module import), so
this module stays torch-free and the tests can stand in for the GPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from daemon.config import Config
from daemon.instance import stale_after
from daemon.store import Store
from daemon.store_fleet import WorkerInfo
from engine.api import short_identity

__all__ = ["Check", "ModelsCheck", "check_installation", "check_models", "check_gpu", "check_recipes", "print_checks",
           "as_json"]

Status = Literal["ok", "bad", "info"]
# (models_dir, files, preset) -> (ok, one line per expected file)
ModelsCheck = Callable[[Path, Mapping[str, str], str], tuple[bool, list[str]]]
ImportFn = Callable[[str], Any]

_PREFIX = {"ok": "ok   ", "bad": "BAD  ", "info": "info "}


@dataclass(frozen=True)
class Check:
    name: str  # what was checked: config, inbox, ..., models, tokenizer, gpu
    status: Status
    text: str
    details: tuple[str, ...] = ()


def _ok(ok: bool) -> Status:
    return "ok" if ok else "bad"


def _writable(d: Path) -> str | None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
            pass
        return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_models(models_dir: Path, files: Mapping[str, str], preset: str, models_check: ModelsCheck) -> list[Check]:
    """The model files, one detail line each (the tokenizer's too, when engine.files names one)."""
    ok, lines = models_check(models_dir, files, preset)
    return [Check("models", _ok(ok), f"models {models_dir}", tuple(lines))]


def check_installation(cfg: Config, models_dir: Path, models_check: ModelsCheck, engine: ImportFn) -> list[Check]:
    """Config, folders, filesystems, database, models and GPU."""
    from daemon.fsinfo import filesystem_type, is_network_fs, watch_mode

    checks = [Check("config", "ok", f"config {cfg.source}")]
    p = cfg.paths
    for name, d in (("inbox", p.inbox), ("outbox", p.outbox), ("failed", p.failed), ("archive", p.archive),
                    ("state", p.state)):
        err = _writable(d)
        checks.append(Check(name, _ok(err is None), f"{name:<8} {d} " + ("writable" if err is None
                                                                           else f"not writable: {err}")))
    fs = filesystem_type(p.inbox)
    mode = watch_mode(cfg.watch.mode, fs)
    checks.append(Check("watcher", "ok", f"inbox filesystem {fs}: watcher {mode} (watch.mode = {cfg.watch.mode})"
                        + (f"; stable_window_s {cfg.watch.stable_window_s:g} must exceed the share's attribute cache"
                           if is_network_fs(fs) else "")))
    sfs = filesystem_type(p.state)
    checks.append(Check("state_filesystem", _ok(not is_network_fs(sfs)), f"state filesystem {sfs}"
                        + (" is a network filesystem: SQLite needs a local disk" if is_network_fs(sfs) else "")))
    checks += check_store(cfg)
    try:
        same = os.stat(p.inbox).st_dev == os.stat(p.outbox).st_dev
    except OSError as exc:
        same = None
        checks.append(Check("shared_filesystem", "bad", f"inbox and outbox: {exc.strerror or exc}"))
    if same is not None:
        checks.append(Check("shared_filesystem", "ok" if same else "info",
                            "inbox and outbox on one filesystem" if same else
                            "inbox and outbox on different filesystems: inputs are copied, not renamed, "
                            "to archive/ and failed/"))
    checks += check_models(models_dir, cfg.engine.options().files, cfg.engine.preset, models_check)
    return checks + check_gpu(cfg.engine.device, engine)


def check_store(cfg: Config) -> list[Check]:
    """The job database: reachable, latency, clock skew, schema version, and the fleet's workers
    (whether they run the same program version). Never changes the schema."""
    try:
        # One host's SQLite file is created (as the daemon would); a shared database's schema is
        # never changed from here ('infinitetalkd migrate').
        store = Store.connect(cfg.store, cfg.paths.database, migrate=True if cfg.store.url is None else None)
    except Exception as exc:  # noqa: BLE001 - whatever stops the database from opening is the finding
        detail = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        return [Check("database", "bad", f"database: {detail}")]
    try:
        h = store.health()
        if not h.reachable:
            return [Check("database", "bad", f"database {h.url}: unreachable: {h.error}")]
        checks = [Check("database", "ok", f"database {h.url}: reachable, latency {1000 * (h.latency_s or 0):.1f} ms")]
        skew = h.clock_skew_s or 0.0
        checks.append(Check("clock_skew", "ok" if abs(skew) < 5 else "info",
                            f"this host's clock is {abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} the "
                            "database's (leases use the database clock only)"))
        version_ok = h.schema_version == h.expected_version
        checks.append(Check("schema", _ok(version_ok), f"schema {h.schema_version} "
                            + ("(current)" if version_ok else f"(this program needs {h.expected_version}: "
                                                              "run 'infinitetalkd migrate')")))
        if version_ok:
            workers = [w for w in store.list_workers() if w.stopped_at is None]
            versions = sorted({w.version for w in workers})
            checks.append(Check("fleet", "ok" if len(versions) <= 1 else "bad",
                                f"jobs {store.counts()}; {len(workers)} registered worker(s) not stopped; "
                                f"program versions: "
                                f"{', '.join(versions) or '-'}",
                                tuple(f"{w.name}: {w.host} pid {w.pid}, {w.device}, {w.version}, heartbeat "
                                      f"{w.age_s:.0f} s ago" for w in workers)))
            checks.append(check_recipes(workers, store.queued_by_recipe(), stale_after(cfg)))
        return checks
    finally:
        store.close()


def check_recipes(workers: list[WorkerInfo], queued: Mapping[str, int], stale_after_s: float) -> Check:
    """Whether the live workers render one recipe, and whether every queued job's recipe has a live
    worker: a worker claims only jobs of its own recipe (docs/daemon.md §4.9)."""
    live = [w for w in workers if w.state(stale_after_s) == "live" and w.recipe]
    recipes = {w.recipe for w in live}
    orphaned = {r: n for r, n in queued.items() if r not in recipes}
    details = [f"{w.name}: {short_identity(w.recipe)}" for w in live]
    details += [f"{n} queued job(s) of recipe {short_identity(r) or '(none)'}: no live worker renders it"
                for r, n in sorted(orphaned.items())]
    if not live:
        return Check("recipes", "info", "recipes: no live worker has loaded its engine yet", tuple(details))
    if orphaned:
        return Check("recipes", "bad", f"recipes: {sum(orphaned.values())} queued job(s) wait for a recipe no live "
                     "worker has; give those workers the same models and engine settings, or retry the jobs on a "
                     "worker that has them", tuple(details))
    if len(recipes) > 1:
        return Check("recipes", "bad", f"recipes: the {len(live)} live workers disagree ({len(recipes)} recipes): a "
                     "job is rendered only by workers of the recipe that queued it; give every worker the same "
                     "model files and engine settings", tuple(details))
    return Check("recipes", "ok", f"recipes: the {len(live)} live worker(s) agree", tuple(details))


def check_gpu(device: str, engine: ImportFn) -> list[Check]:
    """Device nodes, then per CUDA device what the fast path gets (fp8 GEMMs, FlashAttention-3)."""
    nodes = [n for n in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm") if os.path.exists(n)]
    out = [Check("gpu_nodes", "info", f"GPU device nodes: {', '.join(nodes) or 'none'}")]
    if device == "cpu":
        return [*out, Check("gpu", "ok", "engine.device = cpu (no GPU needed)")]
    try:
        torch = engine("torch")
    except ImportError:
        return [*out, Check("gpu", "bad", "torch is not installed")]
    if not torch.cuda.is_available():
        ok = device == "auto"
        return [*out, Check("gpu", _ok(ok), f"CUDA not available to torch {torch.__version__}"
                            + ("; engine.device = auto falls back to the CPU (very slow)" if ok else ""))]
    fast = engine("engine.fast")
    attention = engine("engine.attention")
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        fp8 = "fp8 GEMMs available" if fast.supports_fp8(i) else "no fp8 GEMMs (engine.fp8 needs compute 8.9+)"
        if attention.flash3_available(f"cuda:{i}"):
            fa3 = "FlashAttention-3 installed"
        elif props.major == 9:
            fa3 = "no FlashAttention-3 (optional: build flash-attention's hopper/ folder, README 'Speed')"
        else:
            fa3 = "SDPA attention (FlashAttention-3 is Hopper-only)"
        out.append(Check("gpu", "ok", f"cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, compute "
                         f"{props.major}.{props.minor}, {fp8}, {fa3}, cuDNN {torch.backends.cudnn.version()}, "
                         f"torch {torch.__version__}"))
    return out


def print_checks(checks: list[Check]) -> None:
    for c in checks:
        print(_PREFIX[c.status] + c.text)
        for line in c.details:
            print(f"       {line}")


def as_json(checks: list[Check]) -> dict[str, Any]:
    """``{"ok": bool, "problems": n, "checks": [{"name", "status", "text", "details"}, ...]}``."""
    bad = sum(c.status == "bad" for c in checks)
    return {"ok": bad == 0, "problems": bad, "checks": [{**asdict(c), "details": list(c.details)} for c in checks]}
