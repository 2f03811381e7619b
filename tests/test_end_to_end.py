"""The product as a user runs it: the console command, the real tiny engine, the real daemon process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_portrait, speech_like, write_wav


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `infinitetalkd ARGS` (the console script when installed, else `python -m daemon`)."""
    script = Path(sys.executable).with_name("infinitetalkd")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "daemon"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def test_tiny_models_then_doctor(tmp_path: Path) -> None:
    models = tmp_path / "m"
    made = cli("tiny-models", str(models))
    assert made.returncode == 0, made.stderr
    ok = cli("doctor", "--models-dir", str(models))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    vae = models / "vae" / "Wan2_1_VAE_bf16.safetensors"
    vae.write_bytes(vae.read_bytes()[:1000])  # a truncated download
    bad = cli("doctor", "--models-dir", str(models))
    assert bad.returncode != 0
    assert "Wan2_1_VAE_bf16.safetensors" in bad.stdout + bad.stderr

    vae.unlink()
    (models / "clip_vision" / "clip_vision_h.safetensors").rename(models / "clip_vision" / "other.safetensors")
    missing = cli("doctor", "--models-dir", str(models))
    assert missing.returncode != 0 and "Wan2_1_VAE_bf16.safetensors" in missing.stdout + missing.stderr


def test_render_command(tiny_models: Path, tmp_path: Path) -> None:
    img = make_portrait(tmp_path / "face.png")
    wav = write_wav(tmp_path / "face.wav", speech_like(1.2))
    out = tmp_path / "face.mp4"
    done = cli("render", str(img), str(wav), "-o", str(out), "--models-dir", str(tiny_models),
               "--set", "size=[64, 64]", "--set", "seed=3")
    assert done.returncode == 0, done.stdout + done.stderr
    from engine.media import probe

    info = probe(out)
    assert info["frames"] == 30 and info["audio_codec"] == "aac"

    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio\n")
    bad = cli("render", str(img), str(fake), "-o", str(tmp_path / "x.mp4"), "--models-dir", str(tiny_models),
              "--set", "size=[64, 64]")
    assert bad.returncode == 2
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("infinitetalkd render:")]
    assert len(errors) == 1 and "notes.wav" in errors[0], bad.stderr  # one line naming the file
    assert bad.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "x.mp4").exists()


def test_render_command_loads_the_engine_for_the_jobs_preset(tiny_models: Path, tmp_path: Path) -> None:
    """A one-shot render of a `quality` job (no LoRA) works without a config saying engine.preset: quality."""
    img = make_portrait(tmp_path / "face.png")
    wav = write_wav(tmp_path / "face.wav", speech_like(0.5))
    out = tmp_path / "face.mp4"
    done = cli("render", str(img), str(wav), "-o", str(out), "--models-dir", str(tiny_models),
               "--set", "size=[64, 64]", "--set", "preset=quality", "--set", "steps=2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.stat().st_size > 0


def test_daemon_process_with_the_real_engine(tiny_models: Path, tmp_path: Path) -> None:
    cfg = {
        "paths": {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
                  "state": str(tmp_path / "state")},
        "watch": {"mode": "auto", "poll_interval_s": 0.2, "stable_window_s": 0.5, "rescan_interval_s": 5},
        "engine": {"models_dir": str(tiny_models), "device": "cpu", "preset": "lightx2v"},
        "render": {"size": [64, 64]},
        "logging": {"format": "json"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = Path(sys.executable).with_name("infinitetalkd")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "daemon"]
    proc = subprocess.Popen([*cmd, "run", "--config", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "NOTIFY_SOCKET": ""})
    try:
        (tmp_path / "inbox").mkdir(exist_ok=True)
        make_portrait(tmp_path / "inbox" / "bob.png")
        write_wav(tmp_path / "inbox" / "bob.wav", speech_like(2.0, 22050), rate=22050)
        (tmp_path / "inbox" / "bob.yaml").write_text("seed: 11\nprompt: a person talking\n")
        deadline = time.monotonic() + 240
        outbox = tmp_path / "outbox"
        failed = tmp_path / "outbox" / "failed"
        # The outbox publishes json, then log, then the mp4 last: wait for the mp4, not the json
        # (waiting for the json raced with the final rename and failed CI once).
        while time.monotonic() < deadline and not (outbox / "bob.mp4").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert not failed.exists() or not any(failed.iterdir()), sorted(failed.rglob("*"))
            time.sleep(0.3)
        assert (outbox / "bob.mp4").exists() and (outbox / "bob.log").exists() and (outbox / "bob.json").exists()
        result = json.loads((outbox / "bob.json").read_text())
        assert result["seed"] == 11 if "seed" in result else result["params"]["seed"] == 11
        assert not (tmp_path / "inbox" / "bob.png").exists()  # archived
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the daemon did not stop on SIGTERM within 60 s")
    assert code == 0
    events = []
    for line in (proc.stdout.read() if proc.stdout else "").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    ready = [e for e in events if e.get("event") == "engine.ready"]
    # the start-up cost is reported in two parts: loading the files and the warm-up (the compile on a GPU)
    assert len(ready) == 1 and ready[0]["load_s"] >= 0 and ready[0]["warmup_s"] >= 0, ready
