"""config.yaml: one declarative schema (pydantic v2 models), validated once, with errors that name the key.

Each key is a field with its type, range, default and help text; the README's configuration table is
generated from these fields (daemon/readme.py) and a test fails when the two disagree. The per-job keys
of the ``render:`` section are the same schema as a job's sidecar (engine/settings.py). pydantic is also
what FastAPI validates the web API with, so every setting, wherever it enters, is checked by one library.

Relative paths are resolved against the folder that holds the config file, so ``./inbox`` in the
repository's config.yaml means ``<repo>/inbox`` whatever the current directory is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from engine.api import MAX_IMAGE_PIXELS, EngineOptions, InputError
from engine.recipes import BUCKET_TABLES, PRESETS, WARM_BUCKETS, PresetName
from engine.schema import SCHEMA_CONFIG, doc, fail, problems
from engine.settings import PER_JOB_ONLY, check_settings

__all__ = [
    "EX_CONFIG",
    "ConfigError",
    "Config",
    "PathsConfig",
    "WatchConfig",
    "JobsConfig",
    "EngineFiles",
    "EngineConfig",
    "LoggingConfig",
    "MetricsConfig",
    "StoreConfig",
    "WorkerConfig",
    "WebConfig",
    "load_config",
    "parse_config",
]

EX_CONFIG = 78  # sysexits.h: configuration error (systemd's RestartPreventExitStatus)


class ConfigError(ValueError):
    """config.yaml is wrong. The message names the file and the key."""


# -- value types ------------------------------------------------------------------------------


def _path_text(value: object) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise fail("must be a path")
    return Path(value)


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Relative to the config file's folder (the validation context's ``base``), absolute, ~ expanded."""
    base = info.context.get("base") if isinstance(info.context, dict) else None
    p = path.expanduser()
    return (p if p.is_absolute() else Path(base or Path.cwd()) / p).resolve()


def _bare_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise fail("must be a bare file name")
    return name


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise fail("must be auto, cpu, cuda or cuda:N")
    return value


def _warm_buckets(raw: object) -> object:
    """A list of [width, height] bucket sizes (like render.size) -> a tuple of (h, w), as the engine's tables."""
    if isinstance(raw, tuple):  # the default, already (h, w)
        return raw
    known = {hw for table in BUCKET_TABLES.values() for _, hw in table}
    if not isinstance(raw, list):
        raise fail("must be a list of [width, height] bucket sizes, e.g. [[896, 448]]")
    out: list[tuple[int, int]] = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise fail(f"each entry must be [width, height] in pixels (got {item!r})", show_value=False)
        w, h = item
        if (h, w) not in known:
            sizes = "; ".join(f"{family}: " + ", ".join(f"[{bw}, {bh}]" for _, (bh, bw) in table)
                              for family, table in BUCKET_TABLES.items())
            raise fail(f"[{w}, {h}] is not a resolution bucket; the buckets ([width, height]) are {sizes}",
                       show_value=False)
        if (h, w) not in out:
            out.append((h, w))
    return tuple(out)


ConfigPath = Annotated[Path, BeforeValidator(_path_text), AfterValidator(_resolve)]
BareName = Annotated[str, AfterValidator(_bare_name)]
Text = Annotated[str, Field(min_length=1)]
Port = Annotated[int, Field(ge=1, le=65535)]


# -- sections -----------------------------------------------------------------------------------


class PathsConfig(BaseModel):
    """Where jobs come from and go to."""

    model_config = SCHEMA_CONFIG

    inbox: ConfigPath = Field(Path("inbox"), description="drop jobs here: `<stem>.png` + `<stem>.wav` "
                              "(+ `<stem>.yaml`, + `<stem>.ready`)")
    outbox: ConfigPath = Field(Path("outbox"), description="results: `<stem>.mp4`, `.json`, `.log`; "
                               "`outbox/.tmp` holds work in progress")
    failed: ConfigPath = Field(Path("outbox/failed"), description="refused or failed jobs: `failed/<stem>/` with "
                               "the inputs, `error.txt` and the log", json_schema_extra=doc(
                                   doc_default="`<outbox>/failed`"))
    archive: ConfigPath = Field(Path("outbox/archive"), description="inputs of finished jobs "
                                "(`jobs.after_success: archive`)", json_schema_extra=doc(
                                    doc_default="`<outbox>/archive`"))
    state: ConfigPath = Field(Path("state"), description="`jobs.db` (SQLite), the lock file, `inbox.json`; "
                              "**a local disk, never a share**")

    @model_validator(mode="before")
    @classmethod
    def _under_outbox(cls, data: Any) -> Any:
        """failed/ and archive/ default to folders inside the outbox, wherever it is."""
        if isinstance(data, dict):
            outbox = data.get("outbox", "outbox")
            if isinstance(outbox, str) and outbox:
                data = {"failed": f"{outbox}/failed", "archive": f"{outbox}/archive", **data}
        return data

    @model_validator(mode="after")
    def _distinct(self) -> PathsConfig:
        if self.inbox in (self.outbox, self.failed, self.archive) or self.outbox == self.state:
            raise fail("inbox, outbox, failed, archive and state must be different folders", show_value=False)
        return self

    @property
    def database(self) -> Path:
        return self.state / "jobs.db"

    @property
    def tmp(self) -> Path:
        # Work in progress lives on the outbox's filesystem so that publishing is a rename.
        return self.outbox / ".tmp"

    @property
    def settled(self) -> tuple[Path, Path]:
        """Where a job's inputs end up (archive/, failed/): daemon/files.py looks there before moving
        a job's inputs, so they are settled once."""
        return self.archive, self.failed


class WatchConfig(BaseModel):
    """How the inbox is watched."""

    model_config = SCHEMA_CONFIG

    mode: Literal["auto", "inotify", "poll"] = Field("auto", description="`auto` polls when the inbox is on a "
                                                     "network filesystem (nfs, cifs/smb3, sshfs and other FUSE, "
                                                     "9p, ...), where inotify misses remote writes")
    poll_interval_s: float = Field(2.0, gt=0, description="how often settling files are re-checked; in poll "
                                   "mode, how often the inbox is listed")
    stable_window_s: float = Field(5.0, ge=0, description="files must keep their size and mtime this long "
                                   "before a job starts; on a share, longer than the attribute cache")
    rescan_interval_s: float = Field(60.0, gt=0, description="a full rescan at least this often, even when no "
                                     "event arrived")
    incomplete_after_s: float = Field(3600.0, ge=0, description="a stem whose files are stable but incomplete "
                                      "(no speech, say) fails after this long (at once with `<stem>.ready`)")


class JobsConfig(BaseModel):
    """What makes a job, limits on its inputs, retries."""

    model_config = SCHEMA_CONFIG

    sidecar: Literal["optional", "required"] = Field("optional", description="whether every job needs "
                                                     "`<stem>.yaml`")
    ready_marker: Literal["optional", "required"] = Field("optional", description="`required`: wait for "
                                                          "`<stem>.ready`; a present marker always commits the "
                                                          "job at once, without the stable window")
    redo_finished: Literal["skip", "render"] = Field("skip", description="inputs dropped again after they were "
                                                     "rendered are archived with a log line (`skip`) or rendered "
                                                     "once more (`render`)")
    after_success: Literal["archive", "delete"] = Field("archive", description="what happens to the inputs of "
                                                        "a finished job")
    max_attempts: int = Field(3, ge=1, le=100, description="renders interrupted by a crash (or a device fault) "
                              "this often make the job fail")
    lease_s: float = Field(900.0, gt=0, description="a running job's claim lasts this long without a heartbeat "
                           "(progress renews it)")
    min_free_mb: int = Field(1024, ge=0, description="no job starts while the outbox filesystem has less free "
                             "space than this")
    max_input_mb: int = Field(2048, ge=1, description="larger input files are refused")
    max_sidecar_kb: int = Field(64, ge=1, le=1024, description="larger sidecars are refused (YAML is parsed "
                                "with aliases disabled)")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=256, le=MAX_IMAGE_PIXELS, description="larger images are "
                                  "refused before they are decoded (pixel bombs); at most the engine's own limit")
    keep_checkpoints_h: float = Field(0.0, ge=0, description="a published job's checkpoints (every chunk's) and "
                                      "segments are kept this many hours, for `infinitetalkd redo` (0: removed "
                                      "when the job ends)")


_ROLE_DOC = doc(doc_type="bare file name", doc_default="[the models table](#the-models-folder)")


class EngineFiles(BaseModel):
    """File names per role, each inside its ComfyUI sub-folder (the README's models table)."""

    model_config = ConfigDict(**SCHEMA_CONFIG, title="role")

    dit: BareName | None = Field(None, description="Wan 2.1 I2V 14B DiT", json_schema_extra=_ROLE_DOC)
    patch_single: BareName | None = Field(None, description="InfiniteTalk single-speaker patch",
                                          json_schema_extra=_ROLE_DOC)
    patch_multi: BareName | None = Field(None, description="InfiniteTalk two-speaker patch",
                                         json_schema_extra=_ROLE_DOC)
    text_encoder: BareName | None = Field(None, description="umT5-XXL encoder", json_schema_extra=_ROLE_DOC)
    audio_encoder: BareName | None = Field(None, description="chinese-wav2vec2-base", json_schema_extra=_ROLE_DOC)
    vae: BareName | None = Field(None, description="Wan 2.1 VAE", json_schema_extra=_ROLE_DOC)
    lora: BareName | None = Field(None, description="lightx2v step-distill LoRA", json_schema_extra=_ROLE_DOC)
    clip_vision: BareName | None = Field(None, description="CLIP ViT-H/14 vision tower",
                                         json_schema_extra=_ROLE_DOC)
    tokenizer: ConfigPath | None = Field(None, description="a `spiece.model` of google/umt5-xxl, for a "
                                         "text-encoder file without the `spiece_model` tensor: a path, relative "
                                         "to the config file's folder")

    def mapping(self) -> dict[str, str]:
        """The roles that are set, as EngineOptions.files (the tokenizer as an absolute path)."""
        return {k: str(v) for k, v in self.model_dump().items() if v is not None}


class EngineConfig(BaseModel):
    """Which model files, on which device, how (EngineOptions)."""

    model_config = SCHEMA_CONFIG

    models_dir: ConfigPath = Field(Path("models"), description="your ComfyUI `models/` folder "
                                   "(`diffusion_models/`, `vae/`, `loras/`, ...)")
    files: EngineFiles = Field(default_factory=EngineFiles, description="role: file name, to override the "
                               "default file names (roles: " + ", ".join(EngineFiles.model_fields) + ")",
                               json_schema_extra=doc(doc_type="mapping", doc_default="`{}`"))
    device: Annotated[str, AfterValidator(_device)] = Field(
        "auto", description="where the models run", json_schema_extra=doc(
            doc_type="`auto` \\| `cpu` \\| `cuda` \\| `cuda:N`", expects="auto, cpu, cuda or cuda:N"))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="`auto`: bf16 on a GPU, "
                                                                     "fp32 on the CPU")
    preset: PresetName = Field("lightx2v", description="LoRA policy at load: `lightx2v` and `fast1` merge the "
                               "step-distill LoRA, `quality` renders without it")
    lora_strength: float = Field(1.0, ge=0, le=4, description="strength of the step-distill LoRA merged at load")
    memory_mode: Literal["auto", "resident", "low"] = Field("auto", description="`low` streams the DiT blocks "
                                                            "from host memory (small GPUs); `auto` picks by free "
                                                            "GPU memory")
    fast: bool = Field(True, description="on a GPU: compiled DiT blocks and the fastest attention kernel "
                       "(compiled at start)")
    fp8: bool = Field(False, description="fp8 GEMMs in the DiT: faster, opt-in until shown close enough "
                      "(bench/RESULTS.md)")
    attention: Literal["auto", "sdpa", "fa3"] = Field("auto", description="DiT self-attention kernel: `auto` = "
                                                      "FlashAttention-3 where installed on a Hopper GPU, else SDPA; "
                                                      "`fa3` makes its absence an error (README 'Speed')")
    cache_dir: ConfigPath | None = Field(None, description="prompt-embedding cache on disk (none: in memory "
                                         "only)")
    warm_buckets: Annotated[tuple[tuple[int, int], ...], BeforeValidator(_warm_buckets)] = Field(
        WARM_BUCKETS, description="`[width, height]` bucket sizes the DiT compiles for at start when `fast`; "
        "other sizes compile during their first job (once per process, and the log says so). 9:16 portraits: "
        "`[448, 832]`", json_schema_extra=doc(doc_type="list of `[width, height]`", doc_default="`[[896, 448]]`",
                                               expects="a list of [width, height] bucket sizes"))

    def options(self) -> EngineOptions:
        return EngineOptions(
            models_dir=self.models_dir,
            files=self.files.mapping(),
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


class LoggingConfig(BaseModel):
    """Log lines on stdout (the journal under systemd)."""

    model_config = SCHEMA_CONFIG

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe level logged")
    format: Literal["auto", "json", "console"] = Field("auto", description="`auto`: JSON when stdout is not a "
                                                       "terminal (systemd), readable lines on a terminal")


class MetricsConfig(BaseModel):
    """Prometheus metrics over HTTP."""

    model_config = SCHEMA_CONFIG

    enabled: bool = Field(False, description="serve `/metrics`")
    host: Text = Field("127.0.0.1", description="listen address")
    port: Port = Field(9464, description="listen port")


class StoreConfig(BaseModel):
    """The job database."""

    model_config = SCHEMA_CONFIG

    url: Text | None = Field(None, description="a SQLAlchemy URL such as "
                             "`postgresql+psycopg://user@host/db`; none: SQLite in `<paths.state>/jobs.db`")
    password_env: Text | None = Field(None, description="environment variable holding the database password")
    password_file: ConfigPath | None = Field(None, description="file holding the database password (e.g. a "
                                             "systemd credential)")
    connect_timeout_s: float = Field(10.0, gt=0, description="give up connecting after this long")
    statement_timeout_s: float = Field(30.0, gt=0, description="longest a statement may run (PostgreSQL)")
    lock_timeout_s: float = Field(10.0, gt=0, description="longest a statement waits for a lock (PostgreSQL)")
    busy_timeout_s: float = Field(10.0, gt=0, description="longest a statement waits for the database lock "
                                  "(SQLite)")


class WorkerConfig(BaseModel):
    """This process as one worker among several sharing a store."""

    model_config = SCHEMA_CONFIG

    name: Text | None = Field(None, description="the worker's name in the store and logs (none: "
                              "`<host>/<device>`)")
    ingest: Literal["auto", "never"] = Field("auto", description="`never`: render only, leave the inbox to "
                                             "other workers")
    heartbeat_s: float = Field(5.0, gt=0, description="how often the worker renews its claim and says it is alive")


class WebConfig(BaseModel):
    """The web page and HTTP API (`infinitetalkd web`)."""

    model_config = SCHEMA_CONFIG

    host: Text = Field("127.0.0.1", description="listen address")
    port: Port = Field(8787, description="listen port")
    token_file: ConfigPath | None = Field(None, description="file holding the API token")
    token_env: Text = Field("INFINITETALKD_WEB_TOKEN", description="environment variable holding the API token "
                            "(when `token_file` is not set)")
    max_upload_mb: int = Field(2048, ge=1, description="larger uploads are refused")


class Config(BaseModel):
    """The whole config.yaml; every section and key is optional."""

    model_config = SCHEMA_CONFIG

    paths: PathsConfig = Field(default_factory=PathsConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    render: dict[str, Any] = Field(default_factory=dict, description="defaults for every job: any sidecar key "
                                   "except " + ", ".join(PER_JOB_ONLY))
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    web: WebConfig = Field(default_factory=WebConfig)

    _source: Path = PrivateAttr(default=Path("<memory>"))

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """An empty file, or ``section:`` with nothing under it, means the defaults. Absent sections are
        validated as empty ones, so their relative paths resolve against the config file's folder too."""
        if data is None:
            data = {}
        if isinstance(data, dict):
            given = {k: ({} if v is None and k in cls.model_fields else v) for k, v in data.items()}
            return {**{k: {} for k in cls.model_fields}, **given}
        return data

    @property
    def source(self) -> Path:
        """The config file (or ``<memory>``)."""
        return self._source


# -- loading -------------------------------------------------------------------------------------


def _dotted(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def _render_defaults(cfg: Config, where: str) -> dict[str, object]:
    """config.yaml's ``render:``: the sidecar schema, minus per-job keys, agreeing with the engine's LoRA."""
    render_raw = dict(cfg.render)
    for key in render_raw:
        if key in PER_JOB_ONLY:
            raise ConfigError(f"{where}: render.{key}: is a per-job setting; put it in the job's sidecar YAML")
    try:
        check_settings(render_raw)
    except InputError as exc:
        raise ConfigError(f"{where}: render: {exc}") from None
    engine_preset = cfg.engine.preset
    # The engine loads with or without the step-distill LoRA (engine.preset); jobs must agree. Without a
    # render.preset the jobs default to the engine's; a render.preset of the other policy would fail every job.
    if "preset" not in render_raw:
        render_raw["preset"] = engine_preset
    elif PRESETS[str(render_raw["preset"])].use_lora != PRESETS[engine_preset].use_lora:
        raise ConfigError(f"{where}: render.preset: {render_raw['preset']!r} and engine.preset {engine_preset!r} "
                          "disagree on the step-distill LoRA (quality renders without it, lightx2v and fast1 with "
                          "it), so every job would fail; make them agree")
    return render_raw


def parse_config(raw: object, *, base: Path, where: str = "config.yaml") -> Config:
    """Validate a parsed config.yaml document. ``base`` anchors relative paths."""
    try:
        cfg = Config.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        first = problems(Config, exc)[0]
        if not first.loc:
            raise ConfigError(f"{where}: the file must be a mapping of section: key lines") from None
        raise ConfigError(f"{where}: {_dotted(first.loc)}: {first.message}") from None
    cfg = cfg.model_copy(update={"render": _render_defaults(cfg, where)})
    cfg._source = Path(where)
    return cfg


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
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    cfg = parse_config(raw, base=path.resolve().parent, where=str(path))
    cfg._source = path.resolve()
    return cfg
