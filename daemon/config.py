"""config.yaml -> frozen dataclasses, validated once, with errors that name the key.

Relative paths are resolved against the folder that holds the config file, so ``./inbox`` in the
repository's config.yaml means ``<repo>/inbox`` whatever the current directory is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import yaml

from engine.api import BUCKET_TABLES, PRESETS, WARM_BUCKETS, EngineOptions, InputError, request_from_settings

__all__ = [
    "ConfigError",
    "Config",
    "PathsConfig",
    "WatchConfig",
    "JobsConfig",
    "EngineConfig",
    "LoggingConfig",
    "MetricsConfig",
    "WebConfig",
    "load_config",
    "parse_config",
]

EX_CONFIG = 78  # sysexits.h: configuration error (systemd's RestartPreventExitStatus)

WatchMode = Literal["auto", "inotify", "poll"]
Policy = Literal["optional", "required"]
Redo = Literal["skip", "render"]
AfterSuccess = Literal["archive", "delete"]
LogFormat = Literal["auto", "json", "console"]

# Per-job settings that name files belong in a job's sidecar, never in the shared defaults.
_PER_JOB_ONLY = ("audio2", "masks", "boxes")


class ConfigError(ValueError):
    """config.yaml is wrong. The message names the file and the key."""


@dataclass(frozen=True)
class PathsConfig:
    inbox: Path
    outbox: Path
    failed: Path
    archive: Path
    state: Path  # SQLite database and lock file; must be a local disk

    @property
    def database(self) -> Path:
        return self.state / "jobs.db"

    @property
    def tmp(self) -> Path:
        # Work in progress lives on the outbox's filesystem so that publishing is a rename.
        return self.outbox / ".tmp"


@dataclass(frozen=True)
class WatchConfig:
    mode: WatchMode = "auto"
    poll_interval_s: float = 2.0
    stable_window_s: float = 5.0
    rescan_interval_s: float = 60.0
    incomplete_after_s: float = 3600.0


@dataclass(frozen=True)
class JobsConfig:
    sidecar: Policy = "optional"
    ready_marker: Policy = "optional"
    redo_finished: Redo = "skip"
    after_success: AfterSuccess = "archive"
    max_attempts: int = 3
    lease_s: float = 900.0
    min_free_mb: int = 1024
    max_input_mb: int = 2048
    max_sidecar_kb: int = 64
    max_image_pixels: int = 40_000_000


@dataclass(frozen=True)
class EngineConfig:
    models_dir: Path
    files: Mapping[str, str] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    preset: str = "lightx2v"
    lora_strength: float = 1.0
    memory_mode: str = "auto"
    fast: bool = True
    fp8: bool = False
    attention: str = "auto"
    cache_dir: Path | None = None
    warm_buckets: tuple[tuple[int, int], ...] = WARM_BUCKETS  # (h, w)

    def options(self) -> EngineOptions:
        return EngineOptions(
            models_dir=self.models_dir,
            files=dict(self.files),
            device=self.device,
            dtype=self.dtype,
            preset=self.preset,
            lora_strength=self.lora_strength,
            cache_dir=self.cache_dir,
            fast=self.fast,
            fp8=self.fp8,
            attention=self.attention,
            memory_mode=self.memory_mode,
            warm_buckets=self.warm_buckets,
        )


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class WebConfig:
    """``infinitetalkd web``: the page and HTTP API (daemon/web/). Off unless that command runs."""

    host: str = "127.0.0.1"
    port: int = 8787
    token_file: Path | None = None  # a file holding the bearer token (wins over token_env)
    token_env: str = "INFINITETALKD_WEB_TOKEN"  # else the environment variable holding it
    max_upload_mb: int = 2048  # one submission (all its files) at most this big


@dataclass(frozen=True)
class Config:
    source: Path  # the config file (or "<memory>")
    paths: PathsConfig
    watch: WatchConfig
    jobs: JobsConfig
    engine: EngineConfig
    render: Mapping[str, object]  # defaults for every job, same keys as a sidecar
    logging: LoggingConfig
    metrics: MetricsConfig
    web: WebConfig = WebConfig()


# --------------------------------------------------------------------------------------------
# Typed readers: each takes the section mapping, the key and the dotted prefix for messages.
# --------------------------------------------------------------------------------------------


class _Section:
    """One mapping of config.yaml; reads typed values and rejects unknown keys."""

    def __init__(self, where: str, name: str, raw: object, known: tuple[str, ...]) -> None:
        self.where = where
        self.name = name
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise self.error(name, "must be a mapping of key: value lines")
        self.raw: dict[str, object] = raw
        for key in raw:
            if key not in known:
                raise self.error(f"{name}.{key}", "unknown key; known keys: " + ", ".join(known))

    def error(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {what}")

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def number(self, key: str, default: float, *, minimum: float = 0.0, strict_min: bool = True) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(self._key(key), f"must be a number (got {value!r})")
        if value < minimum or (strict_min and value == minimum):
            cmp = ">" if strict_min else ">="
            raise self.error(self._key(key), f"must be {cmp} {minimum:g} (got {value!r})")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(self._key(key), f"must be a whole number (got {value!r})")
        if value < minimum or (maximum is not None and value > maximum):
            hi = f" and <= {maximum}" if maximum is not None else ""
            raise self.error(self._key(key), f"must be >= {minimum}{hi} (got {value!r})")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.error(self._key(key), f"must be true or false (got {value!r})")
        return value

    def text(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(self._key(key), f"must be a non-empty text (got {value!r})")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw.get(key, default)
        if value not in choices:
            raise self.error(self._key(key), f"must be one of {', '.join(choices)} (got {value!r})")
        return str(value)

    def path(self, key: str, default: str | None, base: Path) -> Path:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(self._key(key), f"must be a path (got {value!r})")
        p = Path(value).expanduser()
        return (p if p.is_absolute() else base / p).resolve()


_TOP = ("paths", "watch", "jobs", "engine", "render", "logging", "metrics", "web")
_FILE_ROLES = ("dit", "text_encoder", "patch_single", "patch_multi", "audio_encoder", "vae", "lora", "clip_vision")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def parse_config(raw: object, *, base: Path, where: str = "config.yaml") -> Config:
    """Validate a parsed config.yaml document. ``base`` anchors relative paths."""
    top = _Section(where, "", raw, _TOP)

    p = _Section(where, "paths", top.raw.get("paths"), ("inbox", "outbox", "failed", "archive", "state"))
    outbox = p.path("outbox", "./outbox", base)
    paths = PathsConfig(
        inbox=p.path("inbox", "./inbox", base),
        outbox=outbox,
        failed=p.path("failed", str(outbox / "failed"), base),
        archive=p.path("archive", str(outbox / "archive"), base),
        state=p.path("state", "./state", base),
    )
    if paths.inbox in (paths.outbox, paths.failed, paths.archive) or paths.outbox == paths.state:
        raise p.error("paths", "inbox, outbox, failed, archive and state must be different folders")

    w = _Section(where, "watch", top.raw.get("watch"),
                 ("mode", "poll_interval_s", "stable_window_s", "rescan_interval_s", "incomplete_after_s"))
    watch = WatchConfig(
        mode=cast(WatchMode, w.choice("mode", "auto", ("auto", "inotify", "poll"))),
        poll_interval_s=w.number("poll_interval_s", 2.0),
        stable_window_s=w.number("stable_window_s", 5.0, strict_min=False),
        rescan_interval_s=w.number("rescan_interval_s", 60.0),
        incomplete_after_s=w.number("incomplete_after_s", 3600.0, strict_min=False),
    )

    j = _Section(where, "jobs", top.raw.get("jobs"),
                 ("sidecar", "ready_marker", "redo_finished", "after_success", "max_attempts", "lease_s",
                  "min_free_mb", "max_input_mb", "max_sidecar_kb", "max_image_pixels"))
    jobs = JobsConfig(
        sidecar=cast(Policy, j.choice("sidecar", "optional", ("optional", "required"))),
        ready_marker=cast(Policy, j.choice("ready_marker", "optional", ("optional", "required"))),
        redo_finished=cast(Redo, j.choice("redo_finished", "skip", ("skip", "render"))),
        after_success=cast(AfterSuccess, j.choice("after_success", "archive", ("archive", "delete"))),
        max_attempts=j.integer("max_attempts", 3, minimum=1, maximum=100),
        lease_s=j.number("lease_s", 900.0),
        min_free_mb=j.integer("min_free_mb", 1024),
        max_input_mb=j.integer("max_input_mb", 2048, minimum=1),
        max_sidecar_kb=j.integer("max_sidecar_kb", 64, minimum=1, maximum=1024),
        max_image_pixels=j.integer("max_image_pixels", 40_000_000, minimum=256),
    )

    e = _Section(where, "engine", top.raw.get("engine"),
                 ("models_dir", "files", "device", "dtype", "preset", "lora_strength", "memory_mode", "fast",
                  "fp8", "attention", "cache_dir", "warm_buckets"))
    files_raw = e.raw.get("files") or {}
    if not isinstance(files_raw, dict):
        raise e.error("engine.files", "must be a mapping of role: file name")
    files: dict[str, str] = {}
    for role, name in files_raw.items():
        if role not in _FILE_ROLES:
            raise e.error(f"engine.files.{role}", "unknown role; known roles: " + ", ".join(_FILE_ROLES))
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            raise e.error(f"engine.files.{role}", f"must be a bare file name (got {name!r})")
        files[str(role)] = name
    device = e.text("device", "auto")
    if not _DEVICE_RE.match(device):
        raise e.error("engine.device", f"must be auto, cpu, cuda or cuda:N (got {device!r})")
    cache_raw = e.raw.get("cache_dir")
    engine = EngineConfig(
        models_dir=e.path("models_dir", "./models", base),
        files=files,
        device=device,
        dtype=e.choice("dtype", "auto", ("auto", "bfloat16", "float16", "float32")),
        preset=e.choice("preset", "lightx2v", tuple(PRESETS)),
        lora_strength=e.number("lora_strength", 1.0, strict_min=False),
        memory_mode=e.choice("memory_mode", "auto", ("auto", "resident", "low")),
        fast=e.boolean("fast", True),
        fp8=e.boolean("fp8", False),
        attention=e.choice("attention", "auto", ("auto", "sdpa", "fa3")),
        cache_dir=None if cache_raw is None else e.path("cache_dir", None, base),
        warm_buckets=_warm_buckets(e),
    )

    render_raw = top.raw.get("render") or {}
    if not isinstance(render_raw, dict):
        raise top.error("render", "must be a mapping of setting: value")
    for key in render_raw:
        if key in _PER_JOB_ONLY:
            raise top.error(f"render.{key}", "is a per-job setting; put it in the job's sidecar YAML")
    try:
        # Validate the defaults with the same code that validates sidecars (dummy input paths).
        request_from_settings({}, audio=Path("a.wav"), image=Path("a.png"), defaults=render_raw)
    except InputError as exc:
        raise top.error("render", str(exc)) from None
    # The engine loads with or without the step-distill LoRA (engine.preset); jobs must agree. Without a
    # render.preset the jobs default to the engine's; a render.preset of the other policy would fail every job.
    if "preset" not in render_raw:
        render_raw = {**render_raw, "preset": engine.preset}
    elif PRESETS[str(render_raw["preset"])].use_lora != PRESETS[engine.preset].use_lora:
        raise top.error("render.preset", f"{render_raw['preset']!r} and engine.preset {engine.preset!r} disagree on "
                        "the step-distill LoRA (quality renders without it, lightx2v and fast1 with it), so every "
                        "job would fail; make them agree")

    lg = _Section(where, "logging", top.raw.get("logging"), ("level", "format"))
    logging_cfg = LoggingConfig(
        level=lg.choice("level", "info", ("debug", "info", "warning", "error")),
        format=cast(LogFormat, lg.choice("format", "auto", ("auto", "json", "console"))),
    )

    m = _Section(where, "metrics", top.raw.get("metrics"), ("enabled", "host", "port"))
    metrics = MetricsConfig(
        enabled=m.boolean("enabled", False),
        host=m.text("host", "127.0.0.1"),
        port=m.integer("port", 9464, minimum=1, maximum=65535),
    )
    wb = _Section(where, "web", top.raw.get("web"), ("host", "port", "token_file", "token_env", "max_upload_mb"))
    web = WebConfig(
        host=wb.text("host", "127.0.0.1"),
        port=wb.integer("port", 8787, minimum=1, maximum=65535),
        token_file=None if wb.raw.get("token_file") is None else wb.path("token_file", None, base),
        token_env=wb.text("token_env", "INFINITETALKD_WEB_TOKEN"),
        max_upload_mb=wb.integer("max_upload_mb", 2048, minimum=1),
    )
    return Config(source=Path(where), paths=paths, watch=watch, jobs=jobs, engine=engine,
                  render=dict(render_raw), logging=logging_cfg, metrics=metrics, web=web)


def _warm_buckets(e: _Section) -> tuple[tuple[int, int], ...]:
    """engine.warm_buckets: a list of [width, height] bucket sizes (like render.size); returned as (h, w)."""
    raw = e.raw.get("warm_buckets")
    if raw is None:
        return WARM_BUCKETS
    known = {hw for table in BUCKET_TABLES.values() for _, hw in table}
    sizes = "; ".join(f"{family}: " + ", ".join(f"[{w}, {h}]" for _, (h, w) in table)
                      for family, table in BUCKET_TABLES.items())
    if not isinstance(raw, list):
        raise e.error("engine.warm_buckets", "must be a list of [width, height] bucket sizes, e.g. [[896, 448]]")
    out: list[tuple[int, int]] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise e.error("engine.warm_buckets", f"each entry must be [width, height] in pixels (got {item!r})")
        w, h = item
        if (h, w) not in known:
            raise e.error("engine.warm_buckets",
                          f"[{w}, {h}] is not a resolution bucket; the buckets ([width, height]) are {sizes}")
        if (h, w) not in out:
            out.append((h, w))
    return tuple(out)


def load_config(path: Path) -> Config:
    """Read and validate ``path``. Raises ConfigError with the file and key in the message."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    cfg = parse_config(raw, base=path.resolve().parent, where=str(path))
    return Config(source=path.resolve(), paths=cfg.paths, watch=cfg.watch, jobs=cfg.jobs, engine=cfg.engine,
                  render=cfg.render, logging=cfg.logging, metrics=cfg.metrics, web=cfg.web)
