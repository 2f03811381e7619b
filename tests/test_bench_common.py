"""bench/common.py, the helpers every benchmark shares, on the CPU: the real-weights path (the benchmarks' DiT is
the one the engine loads from the same folder), timing, closeness, sizes, and the one result format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench import common as c
from bench.common import bench_dit, folder_dit
from engine.api import EngineOptions
from engine.models_dir import load_models


def test_folder_dit_is_the_engines_dit(tiny_models: Path) -> None:
    mine = folder_dit(tiny_models, "cpu", torch.float32)
    engine = load_models(EngineOptions(models_dir=tiny_models, device="cpu", dtype="float32", preset="quality")).dit
    a, b = mine.state_dict(), engine.state_dict()
    assert a.keys() == b.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in mine.parameters()) and not mine.training
    assert bench_dit(tiny_models, "cpu", torch.float32).cfg == mine.cfg


def test_folder_without_the_patch_is_named(tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(tiny_models, copy, symlinks=True)
    for p in copy.rglob("*infiniteTalk_single*"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="no patch_single file"):
        folder_dit(copy, "cpu", torch.float32)


def test_teacache_schedule_reads_the_dits_own_modulations(tiny_models: Path) -> None:
    from bench.teacache_schedule import modulations
    from engine import sampling

    base = tiny_models / "diffusion_models" / "Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors"
    e0s = modulations(base, steps=6, shift=7.0)
    model = folder_dit(tiny_models, "cpu", torch.float32)
    for t, e0 in zip(sampling.timesteps(6, 7.0), e0s, strict=False):
        torch.testing.assert_close(e0, model.embed_time(torch.tensor([t]), 1)[1], rtol=1e-5, atol=1e-6)


def test_round_to_file_fp8_makes_the_weights_a_files_and_feeds_enable_fp8() -> None:
    from bench.common import round_to_file_fp8
    from engine import dit, fast

    torch.manual_seed(0)
    model = dit.WanInfiniteTalk(dit.TINY).eval().requires_grad_(False)
    targets = fast.fp8_targets(adapter_swap=True)
    stored = round_to_file_fp8(model, targets)
    assert len(stored) == len(targets) * len(model.blocks)
    q, scale = stored["blocks.1.ffn.0"]
    assert q.dtype == torch.float8_e4m3fn and scale.ndim == 0
    assert torch.equal(model.blocks[1].ffn[0].weight, q.float() * scale)  # fp32 model: the dequantised file
    assert q.float().abs().max() == fast.FP8_MAX  # the per-tensor absmax maps to 448
    assert fast.enable_fp8(model, targets=targets, weights_fp8=stored) == len(stored)
    layer = model.blocks[1].ffn[0]
    assert isinstance(layer, fast.Fp8Linear) and torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))


def test_folder_fp8_payload_is_the_files_bytes(tiny_models: Path) -> None:
    from safetensors import safe_open

    from bench.common import folder_fp8_payload
    from engine import fast

    stored = folder_fp8_payload(tiny_models, 2, fast.FP8_TARGETS, "cpu")
    assert len(stored) == 2 * 12 and "blocks.1.audio_cross_attn.q_linear" not in stored  # adapter: the patch's
    base = tiny_models / "diffusion_models" / "Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors"
    with safe_open(str(base), "pt") as f:
        raw = f.get_tensor("blocks.1.self_attn.o.weight")
    assert torch.equal(stored["blocks.1.self_attn.o"][0].view(torch.uint8), raw.view(torch.uint8))


def test_timed_runs_warmup_then_repeat_and_returns_the_last_result() -> None:
    calls: list[int] = []

    def fn() -> int:
        calls.append(len(calls))
        return len(calls)

    sec, out = c.timed(fn, 3, warmup=2)
    assert len(calls) == 5 and out == 5 and sec >= 0
    sec, out = c.wall_once(fn)
    assert out == 6 and sec >= 0
    assert c.mean_call_s(fn, iters=4) >= 0 and len(calls) == 6 + 2 + 4


def test_closeness() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert c.closeness(ref, ref) == {"rel_l2": 0.0, "cos": pytest.approx(1.0)}
    off = c.closeness(torch.tensor([3.0, 4.5]), ref)
    assert off["rel_l2"] == pytest.approx(0.1) and off["cos"] < 1
    assert c.closeness(-ref, ref)["cos"] == pytest.approx(-1.0)


def test_sizes_buckets_and_tokens() -> None:
    assert c.tokens(448, 896, 81) == 32928 and c.tokens(960, 960, 81) == 75600  # docs/model.md §7
    assert c.FULL.tokens == 32928
    assert c.parse_bucket("448x896") == (448, 896)
    with pytest.raises(ValueError, match="HxW"):
        c.parse_bucket("448")
    assert c.pick_size("auto", "cpu") is c.TINY and c.pick_size("full", "cpu") is c.FULL
    with pytest.raises(ValueError, match="auto, full or tiny"):
        c.pick_size("huge", "cpu")


def test_dit_inputs_fit_the_tiny_dit() -> None:
    from engine import dit

    model = c.random_dit(dit.TINY, "cpu", torch.float32)
    kw = c.dit_inputs(dit.TINY, 32, 64, 9, "cpu", torch.float32)
    with torch.no_grad():
        out = c.dit_forward(model, kw)
    assert out.shape == kw["x"].shape and torch.isfinite(out).all()
    assert torch.equal(c.dit_inputs(dit.TINY, 32, 64, 9, "cpu", torch.float32)["x"], kw["x"])  # seeded


def test_fp32_forward_restores_the_dtype_and_matches_a_float_copy() -> None:
    import copy

    from engine import dit

    model = c.random_dit(dit.TINY, "cpu", torch.bfloat16)
    kw = c.dit_inputs(dit.TINY, 32, 64, 9, "cpu", torch.bfloat16)
    with torch.no_grad():
        out = c.fp32_forward(model, kw)
        want = c.dit_forward(copy.deepcopy(model).float(),
                             {k: v.float() if v.is_floating_point() else v for k, v in kw.items()})
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert c.closeness(out, want)["rel_l2"] < 1e-2


def test_case_turns_an_exception_into_an_error_row() -> None:
    report = c.Report("x", "cmd", {})
    with c.case(report, "x", "works", "s") as row:
        row.seconds = 1.0
    with c.case(report, "x", "fails") as row:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    assert [r.case for r in report.rows] == ["works", "fails"]
    assert report.rows[0].error is None
    assert report.rows[1].error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"


def test_report_round_trip_and_schema_errors(tmp_path: Path) -> None:
    report = c.Report("forward", "python -m bench.forward", c.environment("cpu"))
    report.add(c.Row("forward", "eager", 1.25, "s/forward", None, {"rel_l2": 0.01, "runs": [1, 2]}), echo=False)
    path = report.write(tmp_path)
    assert path == tmp_path / "forward.json"
    back = c.load_report(path)
    assert back == report and back.schema == c.SCHEMA and back.env["torch"] == torch.__version__
    doc = json.loads(path.read_text())
    doc["schema"] = "other/1"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="forward.json: not a bench result"):
        c.load_report(path)
    doc["schema"] = c.SCHEMA
    del doc["rows"][0]["unit"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="row 0"):
        c.load_report(path)


def test_format_table_one_line_per_row() -> None:
    rows = [c.Row("forward", "eager", 1.23456, "s/forward", 38.8, {"rel_l2": 0.0123456, "runs": [1, 2], "a|b": "x"}),
            c.Row("lowmem", "streamed, 16 GiB cap", error="OutOfMemoryError: no")]
    table = c.format_table(rows).splitlines()
    assert len(table) == 4 and table[0].startswith("| bench | case |")
    assert table[2] == "| forward | eager | 1.235 | s/forward | 38.8 | rel_l2=0.01235, a/b=x |"
    assert "error: OutOfMemoryError: no" in table[3] and table[3].count("|") == 7
