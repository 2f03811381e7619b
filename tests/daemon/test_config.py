"""config.yaml parsing: documented defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from daemon.config import ConfigError, JobsConfig, LoggingConfig, MetricsConfig, WatchConfig, load_config
from engine.recipes import WARM_BUCKETS
from tests.daemon.conftest import REPO


def write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return p


def test_repository_config_parses_and_documents_the_code_defaults() -> None:
    cfg = load_config(REPO / "config.yaml")
    assert cfg.paths.inbox == REPO / "inbox"
    assert cfg.paths.outbox == REPO / "outbox"
    assert cfg.paths.state == REPO / "state"
    assert cfg.paths.database == REPO / "state" / "jobs.db"
    assert cfg.engine.models_dir == REPO / "models"
    # The values written in config.yaml are the defaults of the dataclasses (no drift).
    assert cfg.watch == WatchConfig()
    assert cfg.jobs == JobsConfig()
    assert cfg.logging == LoggingConfig()
    assert cfg.metrics == MetricsConfig()
    assert cfg.engine.options().models_dir == REPO / "models"
    assert cfg.engine.warm_buckets == WARM_BUCKETS
    assert cfg.engine.attention == "auto" and cfg.engine.options().attention == "auto"


def test_empty_config_gives_defaults_relative_to_its_folder(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.paths.inbox == tmp_path / "inbox"
    assert cfg.paths.failed == tmp_path / "outbox" / "failed"
    assert cfg.watch.mode == "auto"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"watch": {"pol_interval_s": 1}}, "watch.pol_interval_s: unknown key"),
        ({"wach": {}}, "wach: unknown key"),
        ({"watch": {"poll_interval_s": "fast"}}, "watch.poll_interval_s: must be a number"),
        ({"watch": {"poll_interval_s": 0}}, "watch.poll_interval_s: must be > 0"),
        ({"watch": {"mode": "fanotify"}}, "watch.mode: must be one of auto, inotify, poll"),
        ({"jobs": {"max_attempts": 1.5}}, "jobs.max_attempts: must be a whole number"),
        ({"jobs": {"redo_finished": "maybe"}}, "jobs.redo_finished: must be one of skip, render"),
        ({"jobs": {"sidecar": True}}, "jobs.sidecar: must be one of"),
        ({"engine": {"device": "gpu"}}, "engine.device: must be auto, cpu, cuda or cuda:N"),
        ({"engine": {"files": {"ditt": "x.safetensors"}}}, "engine.files.ditt: unknown role"),
        ({"engine": {"files": {"dit": "../x.safetensors"}}}, "engine.files.dit: must be a bare file name"),
        ({"engine": {"fast": "yes"}}, "engine.fast: must be true or false"),
        ({"engine": {"attention": "flash"}}, "engine.attention: must be one of auto, sdpa, fa3"),
        ({"engine": {"warm_buckets": "896x448"}}, "engine.warm_buckets: must be a list of [width, height]"),
        ({"engine": {"warm_buckets": [[896, 448, 1]]}}, "each entry must be [width, height]"),
        ({"engine": {"warm_buckets": [[True, 448]]}}, "each entry must be [width, height]"),
        ({"engine": {"warm_buckets": [[500, 500]]}},
         "[500, 500] is not a resolution bucket; the buckets ([width, height]) are 480p: [1216, 320], [1024, 384]"),
        ({"render": {"sed": 1}}, "render: unknown setting 'sed'"),
        ({"render": {"seed": "x"}}, "render: setting 'seed': must be a whole number"),
        ({"render": {"audio2": "b.wav"}}, "render.audio2: is a per-job setting"),
        ({"metrics": {"port": 70000}}, "metrics.port: must be >= 1 and <= 65535"),
        ({"engine": {"preset": "quality"}, "render": {"preset": "fast1"}},
         "render.preset: 'fast1' and engine.preset 'quality' disagree on the step-distill LoRA"),
        ({"paths": {"inbox": "./x", "outbox": "./x"}}, "must be different folders"),
        ({"paths": "inbox"}, "paths: must be a mapping"),
        ("watch: [1, 2", "not valid YAML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, doc: object, message: str) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_warm_buckets_are_width_height_pairs(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).engine.options().warm_buckets == ((448, 896),)  # 16:9 landscape
    doc = {"engine": {"warm_buckets": [[448, 832], [896, 448], [448, 832], [960, 960]]}}
    # stored as (h, w) like the engine's tables; duplicates dropped; a 720p bucket is fine
    assert load_config(write(tmp_path, doc)).engine.options().warm_buckets == ((832, 448), (448, 896), (960, 960))
    assert load_config(write(tmp_path, {"engine": {"warm_buckets": []}})).engine.options().warm_buckets == ()


def test_jobs_default_to_the_engines_preset(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).render["preset"] == "lightx2v"
    assert load_config(write(tmp_path, {"engine": {"preset": "quality"}})).render["preset"] == "quality"
    both = load_config(write(tmp_path, {"engine": {"preset": "lightx2v"}, "render": {"preset": "fast1"}}))
    assert both.render["preset"] == "fast1"  # same LoRA policy: fine


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")
