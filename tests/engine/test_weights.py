"""Tests for engine/weights.py: small safetensors files written into tmp_path, values checked by hand."""

from __future__ import annotations

import inspect
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine import lora as L
from engine import weights as W
from engine.lora import lora_deltas, merge_lora
from engine.weights import (
    WeightsError,
    detect_prefix,
    extra_tensor,
    file_identity,
    iter_fp8_weights,
    iter_tensors,
    load_module,
    load_network,
    logical_shapes,
    read_header,
    write_scaled_fp8,
)

F8 = torch.float8_e4m3fn


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def blob(obj: object) -> torch.Tensor:
    """A U8 tensor holding UTF-8 JSON, as ComfyUI stores `.comfy_quant`."""
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def load_all(info: W.FileInfo, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(info, dtype=dtype, device="cpu"))


class Tiny(nn.Module):
    """A real two-layer module at tiny size: Linear(in -> out) and LayerNorm(in)."""

    def __init__(self, d_in: int = 3, d_out: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_in)


def tiny_on_meta(d_in: int = 3, d_out: int = 2) -> Tiny:
    with torch.device("meta"):
        return Tiny(d_in, d_out)


def tiny_state() -> dict[str, torch.Tensor]:
    return {
        "proj.weight": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
        "proj.bias": torch.tensor([10.0, 20.0]),
        "norm.weight": torch.tensor([1.0, 1.0, 1.0]),
        "norm.bias": torch.tensor([0.0, 0.0, 0.0]),
    }


# ------------------------------------------------------------------------------------------------ header


def test_header_parsing(tmp_path: Path) -> None:
    p = save(
        tmp_path / "m.safetensors",
        {"a.weight": torch.zeros(4, 3, dtype=torch.bfloat16), "a.bias": torch.zeros(4), "s": torch.tensor(1.0)},
        metadata={"format": "pt"},
    )
    info = read_header(p)
    assert info.path == p and info.size == p.stat().st_size
    assert info.metadata == {"format": "pt"}
    assert info.tensors["a.weight"] == W.TensorInfo("BF16", (4, 3), 24)
    assert info.tensors["a.bias"] == W.TensorInfo("F32", (4,), 16)
    assert info.tensors["s"] == W.TensorInfo("F32", (), 4)
    assert (info.prefix, info.quant, info.fp8_gemm_allowed, info.main_dtype) == ("", "none", False, "BF16")
    assert logical_shapes(info) == {"a.weight": (4, 3), "a.bias": (4,), "s": ()}


def test_truncated_file_names_file(tmp_path: Path) -> None:
    p = save(tmp_path / "cut.safetensors", {"x": torch.ones(64)})
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(WeightsError, match=r"cut\.safetensors.*truncated"):
        read_header(p)


def test_not_safetensors_empty_missing_dir(tmp_path: Path) -> None:
    pickle = tmp_path / "model.safetensors"
    torch.save({"x": torch.ones(3)}, pickle)  # a zip/pickle renamed: first 8 bytes are no sane header length
    with pytest.raises(WeightsError, match=r"model\.safetensors.*not a safetensors file"):
        read_header(pickle)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty\.safetensors.*empty"):
        read_header(empty)
    with pytest.raises(WeightsError, match=r"nope\.safetensors.*not found"):
        read_header(tmp_path / "nope.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(WeightsError, match=r"dir\.safetensors.*not a regular file"):
        read_header(tmp_path / "dir.safetensors")


def test_bad_json_and_absurd_length(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    body = b'{"x": {"dtype": "F32", '
    bad.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 16)
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*not valid JSON"):
        read_header(bad)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(WeightsError, match=r"huge\.safetensors.*header length"):
        read_header(huge)


def test_size_mismatch_is_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "c.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(WeightsError, match=r"c\.safetensors.*'x'.*corrupt"):
        read_header(p)


# ------------------------------------------------------------------------------------------------ prefixes


@pytest.mark.parametrize(
    "prefix", ["model.diffusion_model.", "diffusion_model.", "model.model.", "net.", "model.", "wav2vec2.", ""]
)
def test_prefix_stripping(tmp_path: Path, prefix: str) -> None:
    state = tiny_state()
    p = save(tmp_path / "p.safetensors", {prefix + k: v for k, v in state.items()})
    info = read_header(p)
    assert info.prefix == prefix
    assert logical_shapes(info) == {k: tuple(v.shape) for k, v in state.items()}
    got = load_all(info)
    assert set(got) == set(state)
    assert torch.equal(got["proj.weight"], state["proj.weight"])


def test_detect_prefix_rules() -> None:
    wan = [f"blocks.{i}.self_attn.q.weight" for i in range(20)]
    assert detect_prefix(wan) == ""
    # a couple of stray "model.*" keys in a bare file: ComfyUI's ">5 keys" would not fire either; ours needs 90 %
    assert detect_prefix(wan + ["model.a", "model.b"]) == ""
    # the marker does not count against the share
    assert detect_prefix(["model.diffusion_model." + k for k in wan] + ["scaled_fp8"]) == "model.diffusion_model."
    # wav2vec2 pre-training file: prefixed encoder plus a few bare heads (<10 %) -> stripped, heads kept raw
    w2v = [f"wav2vec2.encoder.layers.{i}.attention.q_proj.weight" for i in range(20)] + ["project_q.weight"]
    assert detect_prefix(w2v) == "wav2vec2."
    # 8 of 10 keys prefixed (80 %) is not "nearly all": keep the names, let the strict load complain
    assert detect_prefix([f"model.k{i}" for i in range(8)] + ["a", "b"]) == ""
    assert detect_prefix([f"model.k{i}" for i in range(9)] + ["a"]) == "model."
    assert detect_prefix([]) == ""


def test_unprefixed_heads_keep_raw_names(tmp_path: Path) -> None:
    t = {f"wav2vec2.l{i}.weight": torch.ones(2) for i in range(12)}
    t["project_q.weight"] = torch.ones(3)
    info = read_header(save(tmp_path / "w.safetensors", t))
    assert info.prefix == "wav2vec2."
    assert set(logical_shapes(info)) == {f"l{i}.weight" for i in range(12)} | {"project_q.weight"}


# ------------------------------------------------------------------------------------------------ fp8

# Every value is exactly representable in float8_e4m3fn (3 mantissa bits): 1, -1.5, 2, 0.25, 448, -0.5.
STORED = [[1.0, -1.5, 2.0], [0.25, 448.0, -0.5]]
# ... times scale 0.5, by hand:
DEQUANT_HALF = [[0.5, -0.75, 1.0], [0.125, 224.0, -0.25]]


@pytest.mark.parametrize("spelling", ["scale_weight", "weight_scale"])
def test_scaled_fp8_dequantisation(tmp_path: Path, spelling: str) -> None:
    p = save(
        tmp_path / "s.safetensors",
        {
            "lin.weight": torch.tensor(STORED).to(F8),
            f"lin.{spelling}": torch.tensor(0.5),
            "lin.scale_input": torch.tensor(1.0),
            "lin.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "scaled_fp8": torch.zeros(0, dtype=F8),
        },
    )
    info = read_header(p)
    assert info.quant == "scaled_fp8" and info.fp8_gemm_allowed and info.main_dtype == "F8_E4M3"
    assert logical_shapes(info) == {"lin.weight": (2, 3), "lin.bias": (2,)}  # companions and marker dropped
    got = load_all(info)
    assert got["lin.weight"].dtype == torch.float32
    assert got["lin.weight"].tolist() == DEQUANT_HALF
    assert got["lin.bias"].tolist() == [1.5, -2.0]
    # bf16 output: the dequantised values are exact in bf16 too
    assert load_all(info, torch.bfloat16)["lin.weight"].float().tolist() == DEQUANT_HALF


def test_marker_with_two_elements_disallows_fp8_gemm(tmp_path: Path) -> None:
    p = save(
        tmp_path / "fp.safetensors",
        {
            "lin.weight": torch.tensor(STORED).to(F8),
            "lin.scale_weight": torch.tensor(0.5),
            "scaled_fp8": torch.zeros(2, dtype=F8),
        },
    )
    info = read_header(p)
    assert info.quant == "scaled_fp8" and not info.fp8_gemm_allowed
    assert load_all(info)["lin.weight"].tolist() == DEQUANT_HALF


def test_scales_without_marker_still_dequantise(tmp_path: Path) -> None:
    p = save(
        tmp_path / "kj.safetensors", {"lin.weight": torch.tensor(STORED).to(F8), "lin.weight_scale": torch.tensor(0.5)}
    )
    info = read_header(p)
    assert info.quant == "scaled_fp8" and not info.fp8_gemm_allowed
    assert load_all(info)["lin.weight"].tolist() == DEQUANT_HALF


def test_comfy_quant_per_layer_json(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.tensor(STORED).to(F8),
        "a.weight_scale": torch.tensor(0.25),
        "a.comfy_quant": blob({"format": "float8_e4m3fn"}),
        "b.weight": torch.tensor(STORED).to(F8),
        "b.weight_scale": torch.tensor(2.0),
        "b.input_scale": torch.tensor(1.0),
        "b.comfy_quant": blob({"format": "float8_e4m3fn"}),
        "c.weight": torch.ones(2, 2, dtype=torch.float16),
    }
    info = read_header(save(tmp_path / "cq.safetensors", tensors))
    assert info.quant == "comfy_quant" and info.fp8_gemm_allowed
    assert info.layer_quant == {"a": {"format": "float8_e4m3fn"}, "b": {"format": "float8_e4m3fn"}}
    assert set(logical_shapes(info)) == {"a.weight", "b.weight", "c.weight"}
    got = load_all(info)
    assert got["a.weight"].tolist() == [[0.25, -0.375, 0.5], [0.0625, 112.0, -0.125]]
    assert got["b.weight"].tolist() == [[2.0, -3.0, 4.0], [0.5, 896.0, -1.0]]
    assert got["c.weight"].tolist() == [[1.0, 1.0], [1.0, 1.0]]

    tensors["b.comfy_quant"] = blob({"format": "float8_e4m3fn", "full_precision_matrix_mult": True})
    assert not read_header(save(tmp_path / "cq2.safetensors", tensors)).fp8_gemm_allowed


def test_iter_fp8_weights_gives_the_stored_payload(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.tensor(STORED).to(F8),
        "a.weight_scale": torch.tensor(0.25),
        "a.comfy_quant": blob({"format": "float8_e4m3fn"}),
        "r.weight": torch.tensor(STORED).to(F8),  # per-row scale
        "r.weight_scale": torch.tensor([0.5, 2.0]),
        "r.comfy_quant": blob({"format": "float8_e4m3fn"}),
        "u.weight": torch.tensor(STORED).to(F8),  # no scale at all: 1
        "c.weight": torch.ones(2, 2, dtype=torch.float16),
    }
    info = read_header(save(tmp_path / "cq.safetensors", tensors))
    got = dict(iter_fp8_weights(info, ["a.weight", "r.weight", "u.weight", "c.weight", "absent.weight"],
                                device="cpu"))
    assert list(got) == ["a.weight", "r.weight", "u.weight"]  # the fp16 and the absent key are skipped
    for key, (w, scale) in got.items():
        assert w.dtype == F8 and torch.equal(w.view(torch.uint8), tensors[key].view(torch.uint8))
        assert scale.dtype == torch.float32
    assert got["a.weight"][1].item() == 0.25 and got["a.weight"][1].shape == ()
    assert got["r.weight"][1].tolist() == [0.5, 2.0] and got["u.weight"][1].item() == 1.0
    # the payload times its scale is what iter_tensors dequantises
    full = load_all(info)
    for key, (w, scale) in got.items():
        assert torch.equal(w.float() * (scale if scale.ndim == 0 else scale[:, None]), full[key])
    assert list(iter_fp8_weights(info, ["c.weight"], device="cpu")) == []

    tensors["r.weight_scale"] = torch.tensor([0.5, 2.0, 3.0])
    bad = read_header(save(tmp_path / "bad.safetensors", tensors))
    with pytest.raises(WeightsError, match="does not fit weight"):
        dict(iter_fp8_weights(bad, ["r.weight"], device="cpu"))


def test_file_level_quantization_metadata(tmp_path: Path) -> None:
    # ComfyUI's own files name layers with the full (prefixed) key; the loader strips the prefix.
    pre = "model.diffusion_model."
    meta = {
        "_quantization_metadata": json.dumps(
            {"format_version": "1.0", "layers": {pre + "lin": {"format": "float8_e4m3fn"}}}
        )
    }
    p = save(
        tmp_path / "qm.safetensors",
        {
            pre + "lin.weight": torch.tensor(STORED).to(F8),
            pre + "lin.weight_scale": torch.tensor(0.5),
            pre + "lin.bias": torch.zeros(2),
        },
        metadata=meta,
    )
    info = read_header(p)
    assert (info.prefix, info.quant, info.fp8_gemm_allowed) == (pre, "comfy_quant", True)
    assert info.layer_quant == {"lin": {"format": "float8_e4m3fn"}}
    assert load_all(info)["lin.weight"].tolist() == DEQUANT_HALF


def test_unsupported_quant_format_is_refused(tmp_path: Path) -> None:
    p = save(
        tmp_path / "nv.safetensors",
        {"lin.weight": torch.zeros(2, 4, dtype=torch.uint8), "lin.comfy_quant": blob({"format": "nvfp4"})},
    )
    info = read_header(p)
    assert not info.fp8_gemm_allowed
    with pytest.raises(WeightsError, match=r"nv\.safetensors.*'lin'.*nvfp4"):
        load_all(info)


def test_unscaled_fp8(tmp_path: Path) -> None:
    info = read_header(save(tmp_path / "u.safetensors", {"lin.weight": torch.tensor(STORED).to(F8)}))
    assert info.quant == "fp8_unscaled" and not info.fp8_gemm_allowed
    assert load_all(info)["lin.weight"].tolist() == STORED


def test_write_scaled_fp8_roundtrip(tmp_path: Path) -> None:
    # absmax 224 -> scale 224/448 = 0.5; W/scale = [448, -224, 112, 2, ...], all exact in e4m3 -> exact roundtrip
    w = torch.tensor([[224.0, -112.0, 56.0], [1.0, 0.5, -0.25]])
    src = {"lin.weight": w, "lin.bias": torch.tensor([3.0, 4.0]), "other.weight": torch.ones(2)}
    p = tmp_path / "w.safetensors"
    write_scaled_fp8(
        p,
        src,
        fp8_keys={"lin.weight"},
        prefix="model.diffusion_model.",
        marker_elems=2,
        metadata={"note": "tiny"},
        scale_suffix="weight_scale",
    )
    info = read_header(p)
    raw = info.tensors
    assert raw["model.diffusion_model.lin.weight"].dtype == "F8_E4M3"
    assert raw["model.diffusion_model.lin.weight_scale"] == W.TensorInfo("F32", (), 4)
    assert raw["model.diffusion_model.scaled_fp8"].shape == (2,)
    assert raw["model.diffusion_model.other.weight"].dtype == "F32"
    assert info.metadata == {"note": "tiny"} and info.quant == "scaled_fp8" and not info.fp8_gemm_allowed
    got = load_all(info)
    assert torch.equal(got["lin.weight"], w) and torch.equal(got["lin.bias"], src["lin.bias"])
    # the default spelling and a callable chooser; a marker of [0] allows fp8 GEMMs
    write_scaled_fp8(p, src, fp8_keys=lambda k: k == "lin.weight")
    info = read_header(p)
    assert "lin.scale_weight" in info.tensors and info.fp8_gemm_allowed
    with pytest.raises(ValueError, match="lin.bias"):
        write_scaled_fp8(p, src, fp8_keys={"lin.bias"})


def test_extra_tensor_spiece_model(tmp_path: Path) -> None:
    proto = torch.tensor([1, 2, 3, 250], dtype=torch.uint8)
    info = read_header(save(tmp_path / "t5.safetensors", {"shared.weight": torch.ones(4, 2), "spiece_model": proto}))
    assert "spiece_model" not in logical_shapes(info)
    got = extra_tensor(info, "spiece_model")
    assert got is not None and torch.equal(got, proto)
    assert extra_tensor(info, "nothing") is None


# ------------------------------------------------------------------------------------------------ laziness


def test_iter_tensors_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = read_header(save(tmp_path / "l.safetensors", {f"k{i}": torch.full((2,), float(i)) for i in range(5)}))
    calls: list[str] = []

    class Counting:
        """Wraps safetensors.safe_open and records every tensor read."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            self.inner: Any = safe_open(*a, **kw)

        def __enter__(self) -> Counting:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            calls.append(name)
            t: torch.Tensor = self.inner.get_tensor(name)
            return t

    monkeypatch.setattr("engine.weights.safe_open", Counting)
    it = iter_tensors(info, dtype=torch.float32, device="cpu", keys=["k3", "k1"])
    is_generator = inspect.isgenerator(it)
    assert is_generator
    assert calls == []  # nothing read before the first item is asked for
    key, t = next(it)
    assert (key, t.tolist(), calls) == ("k3", [3.0, 3.0], ["k3"])
    assert [k for k, _ in it] == ["k1"] and calls == ["k3", "k1"]
    with pytest.raises(WeightsError, match="'zz'"):
        iter_tensors(info, dtype=torch.float32, device="cpu", keys=["zz"])


# ------------------------------------------------------------------------------------------------ strict load


def test_strict_load_ok(tmp_path: Path) -> None:
    info = read_header(save(tmp_path / "ok.safetensors", tiny_state()))
    m = tiny_on_meta()
    load_module(m, iter_tensors(info, dtype=torch.float32, device="cpu"), source=str(info.path))
    assert m.proj.weight.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert isinstance(m.proj.weight, nn.Parameter)
    assert not any(p.is_meta for p in m.parameters())


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.pop("proj.bias"), r"1 missing: proj\.bias \[2\]"),
        (lambda s: s.update({"proj.extra": torch.ones(7)}), r"1 unexpected: proj\.extra \[7\]"),
        (lambda s: s.update({"norm.weight": torch.ones(5)}), r"1 mis-shaped: norm\.weight file \[5\] vs network \[3\]"),
    ],
)
def test_strict_load_errors_name_file_and_key(
    tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], object], pattern: str
) -> None:
    state = tiny_state()
    edit(state)
    info = read_header(save(tmp_path / "bad_fit.safetensors", state))
    with pytest.raises(WeightsError, match=r"bad_fit\.safetensors.*" + pattern):
        load_module(tiny_on_meta(), iter_tensors(info, dtype=torch.float32, device="cpu"), source=str(info.path))


def test_allow_missing_and_meta_check() -> None:
    state = tiny_state()
    state.pop("norm.bias")
    with pytest.raises(WeightsError, match=r"src.*still on the meta device: norm\.bias"):
        load_module(tiny_on_meta(), state.items(), source="src", allow_missing=["norm.*"])
    m = Tiny()  # real (CPU) module: an allowed missing key keeps its initialised value
    load_module(m, state.items(), source="src", allow_missing=["norm.bias"])
    assert m.norm.bias.tolist() == [0.0, 0.0, 0.0] and m.proj.bias.tolist() == [10.0, 20.0]


def test_load_network_with_normalize_and_config(tmp_path: Path) -> None:
    # the file uses an older spelling "lin.*" that the network's normalize_keys renames to "proj.*"
    state = {k.replace("proj.", "lin."): v for k, v in tiny_state().items()}
    info = read_header(save(tmp_path / "n.safetensors", {"model." + k: v for k, v in state.items()}))

    def normalize(d: dict[str, Any]) -> dict[str, Any]:
        return {k.replace("lin.", "proj."): v for k, v in d.items()}

    def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        out, d_in = shapes["proj.weight"]
        return d_in, out

    built: list[torch.device] = []

    def build(cfg: tuple[int, int], device: torch.device) -> nn.Module:
        # the build contract: parameters on meta; `device` is where non-persistent buffers would go
        built.append(device)
        with torch.device("meta"):
            return Tiny(*cfg)

    m, cfg = load_network(
        info,
        config_from_shapes=config_from_shapes,
        build=build,
        normalize_keys=normalize,
        dtype=torch.bfloat16,
        device="cpu",
    )
    assert cfg == (3, 2) and built == [torch.device("cpu")]
    assert isinstance(m, Tiny)
    assert m.proj.weight.dtype == torch.bfloat16 and m.proj.bias.tolist() == [10.0, 20.0]


# Two files making one network (the DiT base + InfiniteTalk patch), their overlap and the strict check, and a LoRA
# merged at load are tested on the one loading pipeline the engine uses: tests/engine/test_models_dir.py (load_dit).


# ------------------------------------------------------------------------------------------------ LoRA

# Hand-computed: W = [[1,2,3],[4,5,6]], up [2,r=2] = [[1,2],[3,0]], down [2,3] = [[1,0,1],[0,1,0]]
# up @ down = [[1,2,1],[3,0,3]].
UP = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
DOWN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
W_HALF = [[1.5, 3.0, 3.5], [5.5, 5.0, 7.5]]  # W + 0.5 * up@down
W_HALF_ALPHA1 = [[1.25, 2.5, 3.25], [4.75, 5.0, 6.75]]  # W + 0.5 * (1/2) * up@down


def merged(
    tmp_path: Path, lora_tensors: dict[str, torch.Tensor], strength: float = 0.5, base: Path | None = None
) -> tuple[dict[str, torch.Tensor], L.LoraReport]:
    base_info = read_header(base or save(tmp_path / "base.safetensors", tiny_state()))
    lora = read_header(save(tmp_path / "lora.safetensors", lora_tensors))
    stream, report = merge_lora(
        iter_tensors(base_info, dtype=torch.float32, device="cpu"), lora, strength, logical_shapes(base_info)
    )
    return dict(stream), report


@pytest.mark.parametrize(
    ("names", "alpha", "expected"),
    [
        (("diffusion_model.proj.lora_down.weight", "diffusion_model.proj.lora_up.weight"), None, W_HALF),
        (("diffusion_model.proj.lora_down.weight", "diffusion_model.proj.lora_up.weight"), 1.0, W_HALF_ALPHA1),
        (("diffusion_model.proj.lora_down.weight", "diffusion_model.proj.lora_up.weight"), 2.0, W_HALF),  # alpha=r
        (("proj.lora_A.weight", "proj.lora_B.weight"), None, W_HALF),
        (
            ("model.diffusion_model.proj.lora_A.default.weight", "model.diffusion_model.proj.lora_B.default.weight"),
            None,
            W_HALF,
        ),
        (("lora_unet_proj.lora_down.weight", "lora_unet_proj.lora_up.weight"), 1.0, W_HALF_ALPHA1),
    ],
)
def test_lora_pair_merge(
    tmp_path: Path, names: tuple[str, str], alpha: float | None, expected: list[list[float]]
) -> None:
    t = {names[0]: DOWN, names[1]: UP}
    if alpha is not None:
        t[names[0].split(".lora_")[0] + ".alpha"] = torch.tensor(alpha)
    got, report = merged(tmp_path, t)
    assert got["proj.weight"].tolist() == expected
    assert got["proj.bias"].tolist() == [10.0, 20.0]  # untouched
    assert report == L.LoraReport(applied=1, skipped_inert=[], unknown=[])


def test_lora_diff_diff_b_inert_unknown(tmp_path: Path) -> None:
    t = {
        "diffusion_model.norm.diff": torch.tensor([2.0, -4.0, 6.0]),
        "diffusion_model.proj.diff_b": torch.tensor([2.0, 4.0]),
        "diffusion_model.diff_m": torch.ones(3),
        "diffusion_model.proj.lora_mid.weight": torch.ones(1),
    }
    got, report = merged(tmp_path, t)
    assert got["norm.weight"].tolist() == [2.0, -1.0, 4.0]  # [1,1,1] + 0.5*[2,-4,6]
    assert got["proj.bias"].tolist() == [11.0, 22.0]  # [10,20] + 0.5*[2,4]
    assert got["proj.weight"].tolist() == tiny_state()["proj.weight"].tolist()
    assert report.applied == 2
    assert report.skipped_inert == ["diffusion_model.diff_m"]
    assert report.unknown == ["diffusion_model.proj.lora_mid.weight"]


def test_lora_into_fp8_dequantised_weight(tmp_path: Path) -> None:
    # stored fp8 = 2*W (all exact in e4m3), scale 0.5 -> dequantised W; then the LoRA merges on top
    state = tiny_state()
    base = save(
        tmp_path / "base8.safetensors",
        {
            **state,
            "proj.weight": (state["proj.weight"] * 2).to(F8),
            "proj.scale_weight": torch.tensor(0.5),
            "scaled_fp8": torch.zeros(0, dtype=F8),
        },
    )
    got, _ = merged(tmp_path, {"proj.lora_down.weight": DOWN, "proj.lora_up.weight": UP}, base=base)
    assert got["proj.weight"].tolist() == W_HALF


def test_lora_merge_casts_back_and_strength(tmp_path: Path) -> None:
    base = read_header(save(tmp_path / "b.safetensors", tiny_state()))
    lora = read_header(save(tmp_path / "l.safetensors", {"proj.lora_down.weight": DOWN, "proj.lora_up.weight": UP}))
    stream, _ = merge_lora(iter_tensors(base, dtype=torch.bfloat16, device="cpu"), lora, 1.0, set(logical_shapes(base)))
    w = dict(stream)["proj.weight"]
    assert w.dtype == torch.bfloat16 and w.float().tolist() == [[2.0, 4.0, 4.0], [7.0, 5.0, 9.0]]


def test_lora_errors_name_lora_file(tmp_path: Path) -> None:
    base = read_header(save(tmp_path / "b.safetensors", tiny_state()))
    shapes = logical_shapes(base)
    bad_target = read_header(save(tmp_path / "wrong.safetensors", {"x.lora_down.weight": DOWN, "x.lora_up.weight": UP}))
    with pytest.raises(WeightsError, match=r"wrong\.safetensors.*x\.weight"):
        lora_deltas(bad_target, shapes)
    bad_shape = read_header(
        save(tmp_path / "shape.safetensors", {"proj.lora_down.weight": torch.ones(2, 5), "proj.lora_up.weight": UP})
    )
    with pytest.raises(WeightsError, match=r"shape\.safetensors.*proj"):
        lora_deltas(bad_shape, shapes)
    half = read_header(save(tmp_path / "half.safetensors", {"proj.lora_up.weight": UP}))
    with pytest.raises(WeightsError, match=r"half\.safetensors.*only lora_up"):
        lora_deltas(half, shapes)
    # with only key names (no shapes) a mis-shaped delta is caught when the key streams by
    stream, _ = merge_lora(
        iter_tensors(base, dtype=torch.float32, device="cpu"),
        read_header(save(tmp_path / "late.safetensors", {"norm.diff": torch.ones(4)})),
        1.0,
        set(shapes),
    )
    with pytest.raises(WeightsError, match=r"late\.safetensors.*norm\.diff"):
        dict(stream)


# ------------------------------------------------------------------------------------------------ identity


def test_file_identity(tmp_path: Path) -> None:
    p = save(tmp_path / "id.safetensors", {"a": torch.arange(8, dtype=torch.float32)})
    ident = file_identity(p)
    assert ident.startswith(f"id.safetensors:{p.stat().st_size}:") and ident == file_identity(p)
    copy = tmp_path / "sub"
    copy.mkdir()
    shutil.copy(p, copy / "id.safetensors")  # a copy (new mtime) keeps the identity
    assert file_identity(copy / "id.safetensors") == ident
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # same header, same size, one data byte changed
    p.write_bytes(bytes(data))
    assert file_identity(p) != ident
    with pytest.raises(WeightsError, match="missing"):
        file_identity(tmp_path / "missing.safetensors")
