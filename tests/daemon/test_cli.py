"""The infinitetalkd command line: status, cancel, retry, doctor, run's model check, render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import update

from daemon import cli
from daemon.jobs import JobRow, JobStatus
from daemon.store import SCHEMA_VERSION
from engine.api import EngineOptions, Renderer
from tests.daemon.conftest import Env, write_png, write_wav
from tests.daemon.fake_renderer import FakeRenderer

_JOBS = JobRow.__table__


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_errors_exit_78_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("jobs:\n  max_attempts: lots\n")
    for command in (["status"], ["run"], ["cancel", "1"], ["doctor"]):
        code, _, err = run_cli(capsys, *command, "--config", str(bad))
        assert code == 78 and "jobs.max_attempts: must be a whole number" in err


def test_status_json_shows_progress(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    s = env.store
    s.add(fingerprint="a", stem="alice", inputs=[], params={}, identity="x", max_attempts=3)
    s.add(fingerprint="b", stem="bob", inputs=[], params={}, identity="x", max_attempts=3)
    job = s.claim("h:1", 60)
    assert job is not None
    s.heartbeat(job, "h:1", 60, 0.5, "denoise chunk 1/2 step 2/4 (50%)")
    code, out, _ = run_cli(capsys, "status", "--json", "--config", str(env.config_path))
    doc = json.loads(out)
    assert code == 0 and doc["counts"]["running"] == 1 and doc["counts"]["queued"] == 1
    assert doc["running"][0]["stem"] == "alice" and doc["running"][0]["progress"] == 0.5
    assert doc["running"][0]["progress_text"] == "denoise chunk 1/2 step 2/4 (50%)"
    code, out, _ = run_cli(capsys, "status", "--config", str(env.config_path))
    assert "running  #1 alice: denoise chunk 1/2 step 2/4 (50%)" in out and "queued   #2 bob" in out


def test_status_estimates_the_queue_from_recent_jobs(env: Env, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    s = env.store
    for stem in ("a", "b", "c", "d"):
        s.add(fingerprint=stem, stem=stem, inputs=[], params={}, identity="x", max_attempts=3)
    cfg = str(env.config_path)
    code, out, _ = run_cli(capsys, "status", "--config", cfg)
    assert code == 0 and "queue    about" not in out  # nothing finished yet: no estimate
    for span in (60.0, 120.0):  # two jobs done, 60 s and 120 s from start to finish
        job = s.claim("h:1", 600)
        assert job is not None
        s.finish(job, "h:1", JobStatus.DONE, outputs={"mp4": f"{job.stem}.mp4"})
        with s.engine.begin() as conn:  # the store stamps times from the database clock: backdate the start
            conn.execute(update(_JOBS).where(_JOBS.c.id == job.id).values(started_at=_JOBS.c.finished_at - span))
    code, out, _ = run_cli(capsys, "status", "--config", cfg)
    assert "queue    about 3 min 00 s of rendering at the recent average of 1 min 30 s per job" in out, out
    doc = json.loads(run_cli(capsys, "status", "--json", "--config", cfg)[1])
    assert doc["recent_render_s"] == 90.0 and doc["queue_estimate_s"] == 180.0


def test_status_without_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text("")
    code, _, err = run_cli(capsys, "status", "--config", str(tmp_path / "config.yaml"))
    assert code == 1 and "no job database" in err


def test_cancel_and_retry(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    s = env.store
    cfg = str(env.config_path)
    s.add(fingerprint="a", stem="alice", inputs=[{"role": "audio", "name": "alice.wav"}], params={}, identity="x",
          max_attempts=3)
    code, out, _ = run_cli(capsys, "cancel", "alice", "--config", cfg)
    assert code == 0 and "cancel requested" in out
    assert s.find("alice").cancel_requested  # type: ignore[union-attr]
    code, _, err = run_cli(capsys, "retry", "alice", "--config", cfg)
    assert code == 1 and "only failed or cancelled jobs" in err
    # a failed job whose inputs sit in failed/alice/: retry moves them back and queues the job
    job = s.claim("h:1", 60)
    assert job is None  # a job with a cancel request is never claimed
    job = s.find("alice")
    assert job is not None
    folder = env.failed / "alice"
    folder.mkdir(parents=True)
    write_wav(folder / "alice.wav")
    (folder / "error.txt").write_text("boom\n")
    s.cancel_queued(job, error="cancelled", failed_dir=str(folder))
    code, out, _ = run_cli(capsys, "retry", str(job.id), "--config", cfg)
    assert code == 0 and "queued again" in out
    assert (env.inbox / "alice.wav").exists() and not (folder / "alice.wav").exists()
    assert s.get(job.id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    code, _, err = run_cli(capsys, "cancel", "nobody", "--config", cfg)
    assert code == 1 and "no job 'nobody'" in err


def test_retry_of_a_refused_drop_hands_it_back_to_the_scanner(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    folder = env.failed / "bad"
    folder.mkdir(parents=True)
    write_png(folder / "bad.png")
    job = env.store.add_rejected(stem="bad", inputs=[{"role": "input", "name": "bad.png"}], error="x")
    env.store.set_failed_dir(job.id, str(folder))
    code, out, _ = run_cli(capsys, "retry", "bad", "--config", str(env.config_path))
    assert code == 0 and "new scan" in out
    assert (env.inbox / "bad.png").exists() and env.store.get(job.id) is None


def test_run_refuses_to_start_without_models(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    code, _, err = run_cli(capsys, "run", "--config", str(env.config_path))
    assert code == 78
    assert "model files missing" in err and "does not exist" in err
    (env.root / "models").mkdir()
    code, _, err = run_cli(capsys, "run", "--config", str(env.config_path))
    assert code == 78 and "MISSING" in err and "diffusion_models/" in err  # the file and where it goes
    code, out, _ = run_cli(capsys, "doctor", "--models-dir", str(env.root / "models"))
    assert code == 1 and "MISSING" in out


def test_doctor_reports_folders_filesystems_database(env: Env, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_models_doctor", lambda d, f, need_lora: (True, [f"ok dit {d}/diffusion_models/x"]))
    code, out, _ = run_cli(capsys, "doctor", "--config", str(env.config_path))
    assert code == 0, out
    assert "inbox filesystem" in out and "watcher poll (watch.mode = poll)" in out
    assert "database" in out and f"schema {SCHEMA_VERSION}" in out
    assert "engine.device = cpu" in out
    env.config_path.write_text(env.config_path.read_text().replace(str(env.root / "state"), "/proc/nope"))
    code, out, _ = run_cli(capsys, "doctor", "--config", str(env.config_path))
    assert code == 1 and "BAD  state" in out


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(options: EngineOptions) -> Renderer:
        r = FakeRenderer(options, steps=3, step_s=0.0)
        r.warmup()
        return r

    monkeypatch.setattr(cli, "_load_engine", load)
    monkeypatch.setattr(cli, "_models_doctor", lambda d, f, need_lora: (True, []))


def test_render_one_job(tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_engine: None) -> None:
    img, wav = write_png(tmp_path / "me.png"), write_wav(tmp_path / "me.wav")
    code, out, err = run_cli(capsys, "render", str(img), str(wav), "-o", str(tmp_path / "out" / "me.mp4"),
                             "--set", "seed=7", "--set", "prompt=hello there")
    assert code == 0, err
    assert (tmp_path / "out" / "me.mp4").stat().st_size > 0 and "wrote" in out
    assert "denoise" in err  # plain progress lines when stderr is not a terminal
    assert not list((tmp_path / "out").glob(".*"))  # the partial file is gone


def test_render_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 fake_engine: None) -> None:
    img, wav = write_png(tmp_path / "me.png"), write_wav(tmp_path / "me.wav")
    code, _, err = run_cli(capsys, "render", str(img), str(wav), "-o", str(tmp_path / "o.mp4"), "--set", "sed=1")
    assert code == 2 and "unknown setting 'sed'" in err and err.count("\n") == 1
    (tmp_path / "bad.png").write_text("not an image")
    code, _, err = run_cli(capsys, "render", str(tmp_path / "bad.png"), str(wav), "-o", str(tmp_path / "o.mp4"))
    assert code == 2 and "bad.png cannot be decoded" in err
    sidecar = tmp_path / "job.yaml"
    sidecar.write_text("audio2: other.wav\n")
    code, _, err = run_cli(capsys, "render", str(img), str(wav), "-o", str(tmp_path / "o.mp4"), "--sidecar",
                           str(sidecar))
    assert code == 2 and "other.wav: no such file" in err


def test_doctor_gpu_lines_say_what_the_fast_path_gets(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """On a (pretended) GPU: name, memory, compute capability, fp8 and FA3 support, cuDNN version per device."""
    import types

    import torch

    from engine import attention, fast

    props = [types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0),
             types.SimpleNamespace(name="NVIDIA A100-SXM4-40GB", total_memory=40 * 2**30, major=8, minor=0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(fast, "supports_fp8", lambda i: props[i].major * 10 + props[i].minor >= 89)
    monkeypatch.setattr(attention, "flash3_available", lambda device: False)
    assert cli._doctor_gpu("cuda") == 0
    out = capsys.readouterr().out
    assert ("cuda:0 NVIDIA H100 80GB HBM3, 80 GiB, compute 9.0, fp8 GEMMs available, no FlashAttention-3 (optional: "
            "build flash-attention's hopper/ folder, README 'Speed'), cuDNN") in out
    assert ("cuda:1 NVIDIA A100-SXM4-40GB, 40 GiB, compute 8.0, no fp8 GEMMs (engine.fp8 needs compute 8.9+), SDPA "
            "attention (FlashAttention-3 is Hopper-only), cuDNN") in out
    monkeypatch.setattr(attention, "flash3_available", lambda device: device == "cuda:0")
    assert cli._doctor_gpu("cuda") == 0
    assert "compute 9.0, fp8 GEMMs available, FlashAttention-3 installed, cuDNN" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"infinitetalkd {importlib.metadata.version('infinitetalkd')}"


def test_help_lists_exit_codes_and_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.worker import EXIT_DEVICE_FAULT
    from engine.settings import JobSettings

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in (0, 1, 2, EXIT_DEVICE_FAULT, 78, 130):
        assert f"\n  {code:<4}" in out, code
    with pytest.raises(SystemExit):
        cli.main(["render", "--help"])
    out = capsys.readouterr().out
    for key in JobSettings.model_fields:
        assert f"\n  {key:<20}" in out, key
    assert "seed                int [0..2^63-1]; default 42. random seed" in out
    with pytest.raises(SystemExit):
        cli.main(["tiny-models", "--help"])
    out = capsys.readouterr().out
    assert "tiny random models folder" in out and "the folder to write" in out and "random seed of the weights" in out


def test_doctor_json_and_the_tokenizer(env: Env, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_models_doctor", lambda d, f, need_lora: (True, [f"ok dit {d}/diffusion_models/x"]))
    code, out, _ = run_cli(capsys, "doctor", "--json", "--config", str(env.config_path))
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["problems"] == 0
    names = [c["name"] for c in doc["checks"]]
    assert names[:6] == ["config", "inbox", "outbox", "failed", "archive", "state"] and "database" in names
    models = next(c for c in doc["checks"] if c["name"] == "models")
    assert models["status"] == "ok" and models["details"] == [f"ok dit {env.root / 'models'}/diffusion_models/x"]
    # engine.files.tokenizer: resolved against the config's folder, named by doctor, checked to exist
    env.write_config({"engine": {"files": {"tokenizer": "umt5/spiece.model"}}})
    tok = env.root / "umt5" / "spiece.model"
    code, out, _ = run_cli(capsys, "doctor", "--config", str(env.config_path))
    assert code == 1 and "BAD  models" in out and f"MISSING  tokenizer     {tok}" in out
    code, out, _ = run_cli(capsys, "doctor", "--json", "--config", str(env.config_path))
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["problems"] == 1
    tok.parent.mkdir()
    tok.write_bytes(b"\x0a\x00")
    code, out, _ = run_cli(capsys, "doctor", "--config", str(env.config_path))
    assert code == 0 and f"ok       tokenizer     {tok}  (engine.files.tokenizer)" in out, out
    code, out, _ = run_cli(capsys, "doctor", "--json", "--models-dir", str(env.root / "models"))
    assert code == 0 and json.loads(out)["checks"][0]["name"] == "models"


def test_render_says_the_output_size_and_warns_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          fake_engine: None) -> None:
    img, wav = write_png(tmp_path / "me.png", size=(1000, 500)), write_wav(tmp_path / "me.wav")
    out_mp4 = str(tmp_path / "me.mp4")
    (tmp_path / "config.yaml").write_text("engine:\n  device: cpu\n")
    cpu = ("--config", str(tmp_path / "config.yaml"))
    code, _, err = run_cli(capsys, "render", str(img), str(wav), "-o", out_mp4, *cpu, "--set", "seed=1")
    assert code == 0, err
    lines = err.splitlines()
    # plain lines, not "infinitetalkd render: ..." (that prefix is for the one error line)
    assert lines[0] == "output 896x448 (the 480p bucket for a 1000x500 portrait), 25 fps, on the CPU"
    assert lines[1].startswith("note: on the CPU") and "very slow" in lines[1] and "--set size=[128,128]" in lines[1]
    code, _, err = run_cli(capsys, "render", str(img), str(wav), "-o", out_mp4, *cpu, "--set", "size=[128,128]")
    assert code == 0 and "output 128x128 (the size setting)" in err and "very slow" not in err
