"""The schema, key by key: defaults, bounds, wrong types, unknown keys; and the README generated from it.

The tables below are written out by hand on purpose: they are what the schema must say. A key added to the
schema without a row here fails ``test_*_table_covers_every_key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from daemon import readme
from daemon.config import Config, ConfigError, load_config
from engine.api import MAX_IMAGE_PIXELS, InputError, short_identity
from engine.recipes import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, PRESETS, PresetName
from engine.settings import JobSettings, check_settings, parse_set_option, request_from_settings
from tests.daemon.conftest import REPO

HUGE = 10**400  # more digits than a float holds: must be a clean error, never OverflowError

# key: (default, accepted values, refused values). Refused values cover a wrong type and each bound.
CONFIG_KEYS: dict[str, tuple[Any, list[Any], list[Any]]] = {
    "paths.inbox": ("inbox", ["in", "/abs/in"], [1, "", None, ["a"]]),
    "paths.outbox": ("outbox", ["out"], [2, ""]),
    "paths.failed": ("outbox/failed", ["f"], [True]),
    "paths.archive": ("outbox/archive", ["a"], [3.5]),
    "paths.state": ("state", ["s"], [{}]),
    "watch.mode": ("auto", ["inotify", "poll", "auto"], ["fanotify", 1, None]),
    "watch.poll_interval_s": (2.0, [0.01, 5], [0, -1, "fast", True, float("inf"), HUGE]),
    "watch.stable_window_s": (5.0, [0, 30], [-0.1, "5", False]),
    "watch.rescan_interval_s": (60.0, [1], [0, "x"]),
    "watch.incomplete_after_s": (3600.0, [0, 10], [-1, []]),
    "jobs.sidecar": ("optional", ["required"], ["maybe", True]),
    "jobs.ready_marker": ("optional", ["required"], ["yes", 0]),
    "jobs.redo_finished": ("skip", ["render"], ["again", None]),
    "jobs.after_success": ("archive", ["delete"], ["keep", 1]),
    "jobs.max_attempts": (3, [1, 100], [0, 101, 1.5, True, "3", HUGE]),
    "jobs.lease_s": (900.0, [1], [0, "long"]),
    "jobs.min_free_mb": (1024, [0], [-1, 1.0]),
    "jobs.max_input_mb": (2048, [1], [0, "big"]),
    "jobs.max_sidecar_kb": (64, [1, 1024], [0, 1025]),
    "jobs.max_image_pixels": (MAX_IMAGE_PIXELS, [256, MAX_IMAGE_PIXELS], [255, MAX_IMAGE_PIXELS + 1, "many"]),
    "jobs.keep_checkpoints_h": (0.0, [0, 24.5], [-1, "day"]),
    "engine.models_dir": ("models", ["/srv/models"], [5, ""]),
    "engine.files": ({}, [{"dit": "x.safetensors"}, {}], ["x", ["dit"]]),
    "engine.files.dit": (None, ["my.safetensors"], ["../x.safetensors", "a/b", 1]),
    "engine.files.patch_single": (None, ["p.safetensors"], ["/abs/p"]),
    "engine.files.patch_multi": (None, ["p.safetensors"], [".."]),
    "engine.files.text_encoder": (None, ["t.safetensors"], ["a\\b"]),
    "engine.files.audio_encoder": (None, ["w.safetensors"], [""]),
    "engine.files.vae": (None, ["v.safetensors"], [True]),
    "engine.files.lora": (None, ["l.safetensors"], [["l"]]),
    "engine.files.clip_vision": (None, ["c.safetensors"], ["."]),
    "engine.files.tokenizer": (None, ["spiece.model", "/abs/spiece.model"], ["", 7]),
    "engine.device": ("auto", ["cpu", "cuda", "cuda:1"], ["gpu", "cuda:x", 0]),
    "engine.dtype": ("auto", ["bfloat16", "float16", "float32"], ["fp8", None]),
    "engine.preset": ("lightx2v", ["fast1"], ["turbo", 1]),
    "engine.lora_strength": (1.0, [0, 4], [-0.1, 4.1, "strong"]),
    "engine.memory_mode": ("auto", ["resident", "low"], ["tiny"]),
    "engine.fast": (True, [False], ["yes", 1]),
    "engine.fp8": (False, [True], ["no", 0]),
    "engine.attention": ("auto", ["sdpa", "fa3"], ["flash", None]),
    "engine.cache_dir": (None, ["cache"], [3, ""]),
    "engine.warm_buckets": (((448, 896),), [[[896, 448]], []], ["896x448", [[896]], [[500, 500]]]),
    "render": ({"preset": "lightx2v"}, [{"seed": 3}], [{"sed": 1}, {"audio2": "b.wav"}, "seed"]),
    "logging.level": ("info", ["debug", "error"], ["verbose", 1]),
    "logging.format": ("auto", ["json", "console"], ["xml"]),
    "metrics.enabled": (False, [True], ["on"]),
    "metrics.host": ("127.0.0.1", ["0.0.0.0"], ["", 1]),
    "metrics.port": (9464, [1, 65535], [0, 65536, "http"]),
    "store.url": (None, ["postgresql+psycopg://u@h/db"], ["", 5]),
    "store.password_env": (None, ["PGPASSWORD"], ["", 1]),
    "store.password_file": (None, ["secret"], ["", 1]),
    "store.connect_timeout_s": (10.0, [0.5], [0, "x"]),
    "store.statement_timeout_s": (30.0, [1], [0, -5]),
    "store.lock_timeout_s": (10.0, [1], [0, None]),
    "store.busy_timeout_s": (10.0, [1], [0, True]),
    "worker.name": (None, ["gpu-box/cuda:0"], ["", 3]),
    "worker.ingest": ("auto", ["never"], ["always", False]),
    "worker.heartbeat_s": (5.0, [0.5], [0, "often"]),
    "web.host": ("127.0.0.1", ["::1"], ["", 0]),
    "web.port": (8787, [1, 65535], [0, 70000, "80"]),
    "web.token_file": (None, ["token"], ["", 2]),
    "web.token_env": ("INFINITETALKD_WEB_TOKEN", ["MY_TOKEN"], ["", None]),
    "web.max_upload_mb": (2048, [1], [0, 2.5]),
}
PATH_KEYS = {k for k, (d, _, _) in CONFIG_KEYS.items() if k.startswith("paths.") or k in (
    "engine.models_dir", "engine.cache_dir", "engine.files.tokenizer", "store.password_file", "web.token_file")}


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(prefix + name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys |= _schema_keys(sub, f"{prefix}{name}.")
    return keys


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    doc: Any = value
    for part in reversed(dotted.split(".")):
        doc = {part: doc}
    return doc  # type: ignore[no-any-return]


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _load(tmp_path: Path, doc: Any) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc) if doc is not None else "", encoding="utf-8")
    return load_config(path)


def _expected(tmp_path: Path, key: str, value: Any) -> Any:
    if key in PATH_KEYS and isinstance(value, str):
        return (tmp_path / value).resolve()
    if key == "engine.files":
        return value
    return value


def test_config_table_covers_every_key() -> None:
    schema = _schema_keys(Config)
    sections = {k for k in schema if "." not in k} - {"render"}
    assert set(CONFIG_KEYS) == schema - sections


@pytest.mark.parametrize("key", sorted(CONFIG_KEYS))
def test_config_key(tmp_path: Path, key: str) -> None:
    default, good, bad = CONFIG_KEYS[key]
    got = _get(_load(tmp_path, None), key)
    if key == "engine.files":
        got = got.mapping()
    assert got == _expected(tmp_path, key, default), key
    for value in good:
        cfg = _load(tmp_path, _nest(key, value))
        got = _get(cfg, key)
        if key == "engine.files":
            assert got.mapping() == value
        elif key == "engine.warm_buckets":
            assert got == tuple((h, w) for w, h in value)
        elif key == "render":
            assert got == {"preset": "lightx2v", **value}
        else:
            assert got == _expected(tmp_path, key, value), (key, value)
    for value in bad:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(_nest(key, value)), encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert key.split(".")[0] in message, message  # names the key (render errors name the setting)
        if key != "render":
            assert f"{key}:" in message or f"{key}." in message, message


@pytest.mark.parametrize("section", ["paths", "watch", "jobs", "engine", "logging", "metrics", "store", "worker",
                                     "web"])
def test_unknown_key_in_every_section(tmp_path: Path, section: str) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.colour: unknown key; known keys: "):
        _load(tmp_path, {section: {"colour": 1}})


def test_config_errors_about_sections_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the file must be a mapping of section: key lines"):
        _load(tmp_path, ["paths"])
    with pytest.raises(ConfigError, match=r"engine.files.ditt: unknown role; known roles: dit, .*tokenizer"):
        _load(tmp_path, {"engine": {"files": {"ditt": "x"}}})
    assert _load(tmp_path, {"watch": None, "engine": None}).watch.mode == "auto"  # "watch:" with nothing under it


def test_an_integer_too_long_for_python_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("jobs:\n  max_attempts: " + "9" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_repository_config_yaml_documents_every_key_with_its_default() -> None:
    text = (REPO / "config.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    for key in CONFIG_KEYS:
        if key.startswith("engine.files.") or key == "render":
            assert key.rsplit(".", 1)[-1] in text, key  # roles are listed in a comment
            continue
        section, name = key.split(".", 1)
        assert name in doc[section], f"config.yaml does not show {key}"
        if key not in PATH_KEYS and key not in ("engine.warm_buckets", "engine.files"):
            assert doc[section][name] == CONFIG_KEYS[key][0], key


def test_tokenizer_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"engine": {"files": {"tokenizer": "tok/spiece.model", "dit": "d.safetensors"}}})
    files = cfg.engine.options().files
    assert files["tokenizer"] == str(tmp_path / "tok" / "spiece.model") and Path(files["tokenizer"]).is_absolute()
    assert files["dit"] == "d.safetensors"  # the other roles stay bare names inside models_dir
    cfg = _load(tmp_path, {"engine": {"files": {"tokenizer": "/models/umt5/spiece.model"}}})
    assert cfg.engine.options().files == {"tokenizer": "/models/umt5/spiece.model"}


# -- per-job settings ---------------------------------------------------------------------------------

SETTING_KEYS: dict[str, tuple[Any, list[Any], list[Any]]] = {
    "audio2": (None, ["b.wav"], [1, ["b.wav"]]),
    "audio_mode": ("para", ["add"], ["both", 1]),
    "masks": (None, [["l.png", "r.png"]], ["l.png", [1]]),
    "boxes": (None, [[[0, 0, 10, 10], [10, 0, 20, 10]]],
              [[[0, 0, 10]], [[5, 0, 1, 1]], [[0, 0, 1.5, 2]], "x", [[0, 0, HUGE, 10]]]),
    "prompt": (DEFAULT_PROMPT, ["hi", "x" * 4000], [1, "x" * 4001]),
    "negative_prompt": (DEFAULT_NEGATIVE_PROMPT, ["blur"], [["a"], "y" * 4001]),
    "seed": (42, [0, 2**63 - 1], [-1, 2**63, HUGE, -HUGE, 1.5, "7", True]),
    "preset": ("lightx2v", ["fast1", "quality"], ["turbo", 2]),
    "steps": (4, [1, 200], [0, 201, 2.0, HUGE]),
    "shift": (7.0, [0.1, 100], [0.09, 101, "x", HUGE, float("nan")]),
    "text_guidance": (1.0, [0, 30], [-1, 31, HUGE]),
    "audio_guidance": (2.0, [0, 30], [-0.5, 30.5, -HUGE]),
    "resolution": ("480p", ["720p"], ["1080p", 480]),
    "size": (None, [[16, 16], [2048, 2048]], [[17, 16], [0, 16], [2064, 16], [16], "16x16", [True, 16]]),
    "frame_window": (81, [13, 201, 45], [1, 205, 80, 81.0]),
    "motion_frames": (9, [1, 33], [0, 37, 8, "9"]),
    "color_correction": (1.0, [0, 1], [-0.1, 1.1, HUGE]),
    "apg": (False, [True], ["yes", 1]),
    "lora_strength": (None, [0, 4], [-1, 4.5]),
    "max_duration_s": (600.0, [0.1, 86400], [0.05, 86401, HUGE, float("inf")]),
    "crf": (18, [0, 51], [-1, 52, 18.5]),
    "loudness_normalize": (True, [False], ["false", 0]),
    "teacache": (0.0, [0, 2], [-0.1, 2.1, False]),
}


def _request(settings: dict[str, Any]) -> Any:
    return request_from_settings(settings, audio=Path("/in/a.wav"), image=Path("/in/a.png"),
                                 resolve=lambda _k, name: Path("/in") / name)


def test_settings_table_covers_every_key() -> None:
    assert set(SETTING_KEYS) == set(JobSettings.model_fields)


@pytest.mark.parametrize("key", sorted(SETTING_KEYS))
def test_setting_key(key: str) -> None:
    default, good, bad = SETTING_KEYS[key]
    req = _request({})
    if key == "audio2":
        assert req.audio == (Path("/in/a.wav"),)
    elif key in ("masks", "boxes", "size"):
        assert getattr(req, key) in ((), None)
    else:
        assert getattr(req, key) == default, key
    for value in good:
        check_settings({key: value})
    for value in bad:
        with pytest.raises(InputError) as err:
            check_settings({key: value})
        assert f"setting '{key}': " in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert len(str(err.value)) < 400  # a 400-digit number is not printed whole


def test_settings_values_reach_the_request() -> None:
    req = _request({"audio2": "b.wav", "boxes": [[0, 0, 10, 10], [10, 0, 20, 10]], "size": [32, 48], "seed": 7,
                    "preset": "quality", "shift": 5, "teacache": 0.2})
    assert req.audio == (Path("/in/a.wav"), Path("/in/b.wav"))
    assert req.boxes == ((0, 0, 10, 10), (10, 0, 20, 10)) and req.size == (32, 48) and req.seed == 7
    q = PRESETS["quality"]
    assert (req.steps, req.shift, req.text_guidance, req.audio_guidance) == (q.steps, 5.0, q.text_guidance,
                                                                             q.audio_guidance)
    assert isinstance(req.shift, float) and req.teacache == 0.2
    req = _request({"masks": ["l.png", "r.png"], "audio2": "b.wav"})
    assert req.masks == (Path("/in/l.png"), Path("/in/r.png"))


def test_settings_layers_and_unknown_keys() -> None:
    defaults = {"seed": 5, "crf": 20}
    req = request_from_settings({"seed": 9, "steps": None}, audio=Path("a.wav"), image=Path("a.png"),
                                defaults=defaults)
    assert (req.seed, req.crf, req.steps) == (9, 20, 4)  # None = not given: the preset's steps
    with pytest.raises(InputError, match=r"^unknown setting 'colour'; known settings: apg, audio2, "):
        check_settings({"colour": "red"})
    with pytest.raises(InputError, match=r"setting 'motion_frames': must be 4n\+1 and smaller than frame_window"):
        check_settings({"frame_window": 9, "motion_frames": 9})


def test_set_option_with_a_huge_number_is_an_input_error() -> None:
    key, value = parse_set_option("seed=" + "1" * 400)
    with pytest.raises(InputError, match="setting 'seed': must be >= 0 and <= 9223372036854775807"):
        check_settings({key: value})
    key, value = parse_set_option("seed=" + "1" * 5000)  # past Python's int parsing limit: kept as text
    with pytest.raises(InputError, match="setting 'seed': must be a whole number"):
        check_settings({key: value})


def test_preset_names_match_the_presets() -> None:
    from typing import get_args

    assert tuple(PRESETS) == get_args(PresetName)


# -- README ------------------------------------------------------------------------------------------


def test_readme_tables_agree_with_the_schema() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.update(text) == text, "README.md differs from the schema: run `make readme`"
    for key in JobSettings.model_fields:
        assert f"| `{key}` |" in text
    assert "| `max_image_pixels` | int [256..40000000] |" in text


def test_readme_check_fails_on_a_stale_table(tmp_path: Path) -> None:
    stale = (REPO / "README.md").read_text(encoding="utf-8").replace("| `crf` | int [0..51] |", "| `crf` | int |")
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert readme.main(["--check", str(path)]) == 1
    assert readme.main([str(path)]) == 0 and readme.main(["--check", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == (REPO / "README.md").read_text(encoding="utf-8")


def test_short_identity_keeps_console_lines_short() -> None:
    ident = "infinitetalkd-engine=0.1.0;" + ";".join(f"role{i}=file{i}.safetensors:sha256:{'ab' * 32}"
                                                     for i in range(8))
    short = short_identity(ident)
    assert len(ident) > 600 and len(short) < 120
    assert short.startswith("infinitetalkd-engine=0.1.0 (+8 parts, sha256 ")
    assert short_identity(ident + "x") != short and short_identity("engine=1") == "engine=1"


def test_numbers_of_any_size_get_the_range_in_the_message() -> None:
    for key, rng in (("max_duration_s", ">= 0.1 and <= 86400"), ("seed", ">= 0 and <= 9223372036854775807"),
                     ("shift", ">= 0.1 and <= 100")):
        for value in (HUGE, -HUGE):
            with pytest.raises(InputError) as err:
                check_settings({key: value})
            assert str(err.value) == f"setting '{key}': must be {rng} (got a number of {len(str(abs(value)))} digits)"
