"""``infinitetalkd tiny-models DIR``: a complete models folder in the real layout, at toy size.

Same sub-folders, file names, key names and storage formats as the files users download (the DiT
and umT5 in the legacy ComfyUI fp8-scaled format, the umT5 tokenizer inside its file as
``spiece_model``, the adapter and wav2vec2 in fp16, the VAE in bf16, a LoRA in the kijai
lora_down/lora_up form with alpha), filled with seeded random weights. Tests and ``make demo``
load it through exactly the code path a real folder takes. It renders noise, not a face.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine import weights as wt
from engine.models_dir import ROLE_BY_NAME, _is_adapter_key

LORA_RANK = 4
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


def _random_like(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights with sane scales: norms near 1, biases small, matrices ~ 1/sqrt(fan_in).

    Drawn on the generator's device and returned in bf16 on the CPU when the generator is on a GPU
    (the full-size benchmark folder), in fp32 otherwise.
    """
    out = {}
    dev = gen.device
    for key, shape in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        is_norm = any(s in key for s in ("norm", "gamma", "ln_", "layernorm")) or leaf in ("gamma", "weight_g")
        if is_norm and leaf in ("weight", "gamma", "weight_g"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=dev)
        elif len(shape) <= 1:
            t = 0.02 * torch.randn(shape, generator=gen, device=dev)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen, device=dev) / math.sqrt(max(1, fan_in))
        out[key] = t.contiguous() if dev.type == "cpu" else t.to(torch.bfloat16).cpu()
    return out


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _path(out_dir: Path, role: str) -> Path:
    r = ROLE_BY_NAME[role]
    p = out_dir / r.folders[0] / r.default
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_tiny_models(out_dir: Path, seed: int = 0) -> None:
    """Write the tiny models folder into ``out_dir`` (created; existing files are replaced)."""
    write_models(out_dir, seed=seed)


def write_models(out_dir: Path, *, seed: int = 0, full_size: bool = False, device: str = "cpu") -> None:
    """Write a random-weight models folder: tiny configs, or the released sizes (for GPU benchmarks of
    cold start and whole renders; ~31 GB, draw the numbers on a GPU with ``device="cuda"``)."""
    from engine import audio, dit, image_encoder, text_encoder, vae

    gen = torch.Generator(device=device).manual_seed(seed)
    out_dir = Path(out_dir)
    cfg_dit = dit.RELEASED if full_size else dit.TINY
    cfg_vae = vae.RELEASED if full_size else vae.TINY
    cfg_te = _released_encoder(text_encoder) if full_size else text_encoder.TINY_CONFIG
    cfg_w2v = _released_encoder(audio) if full_size else audio.TINY_CONFIG
    cfg_clip = _released_encoder(image_encoder) if full_size else image_encoder.TINY_CONFIG

    # DiT base in scaled fp8 (block Linears in fp8, as the KJ file's size implies), adapters in fp16.
    full = _random_like(_shapes(dit.build(cfg_dit, "meta")), gen)
    base = {k: v for k, v in full.items() if not _is_adapter_key(k)}
    fp8 = {k for k, v in base.items() if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2}
    wt.write_scaled_fp8(_path(out_dir, "dit"), _cast(base, torch.bfloat16), fp8_keys=fp8)
    wt.save_tensors(_path(out_dir, "patch_single"),
                    _cast({k: v for k, v in full.items() if _is_adapter_key(k)}, torch.float16))
    multi = _random_like({k: tuple(v.shape) for k, v in full.items() if _is_adapter_key(k)}, gen)
    wt.save_tensors(_path(out_dir, "patch_multi"), _cast(multi, torch.float16))

    # The step-distill LoRA: lora_down/lora_up + alpha for every block Linear, a bias delta, in bf16.
    lora: dict[str, torch.Tensor] = {}
    rank = 64 if full_size else LORA_RANK
    for i in range(cfg_dit.num_layers):
        for target in LORA_TARGETS:
            w = base[f"blocks.{i}.{target}.weight"]
            stem = f"diffusion_model.blocks.{i}.{target}"
            lora[f"{stem}.lora_down.weight"] = 0.1 * torch.randn(rank, w.shape[1], generator=gen, device=device).cpu()
            lora[f"{stem}.lora_up.weight"] = 0.1 * torch.randn(w.shape[0], rank, generator=gen, device=device).cpu()
            lora[f"{stem}.alpha"] = torch.tensor(float(rank))
        lora[f"diffusion_model.blocks.{i}.ffn.0.diff_b"] = 0.01 * torch.randn(
            cfg_dit.ffn_dim, generator=gen, device=device).cpu()
    wt.save_tensors(_path(out_dir, "lora"), _cast(lora, torch.bfloat16))

    vae_sd = _random_like(_shapes(vae.build(cfg_vae, "meta")), gen)
    wt.save_tensors(_path(out_dir, "vae"), _cast(vae_sd, torch.bfloat16))

    # umT5 in scaled fp8 with its SentencePiece model inside, as the ComfyUI file carries it.
    proto = text_encoder.make_tiny_spiece(text_encoder.TINY_CONFIG.vocab_size)
    te = _file_spelling(_random_like(_shapes(text_encoder.build(cfg_te, "cpu")), gen))
    te_fp8 = {k for k, v in te.items() if k.startswith("encoder.block.") and v.ndim == 2
              and "relative_attention_bias" not in k}
    te = _cast(te, torch.bfloat16)
    te["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    wt.write_scaled_fp8(_path(out_dir, "text_encoder"), te, fp8_keys=te_fp8)

    w2v = _random_like(_shapes(audio.build(cfg_w2v, "cpu")), gen)
    wt.save_tensors(_path(out_dir, "audio_encoder"), _cast(_file_spelling(w2v), torch.float16))
    clip = _random_like(_shapes(image_encoder.build(cfg_clip, "cpu")), gen)
    wt.save_tensors(_path(out_dir, "clip_vision"), _cast(_file_spelling(clip), torch.float16))


def _released_encoder(net):  # type: ignore[no-untyped-def]
    """The released config of a transformers-backed encoder, read back from its key manifest's shapes."""
    manifest = {"engine.text_encoder": "umt5_xxl", "engine.audio": "wav2vec2",
                "engine.image_encoder": "clip_vision_h"}[net.__name__]
    path = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "manifests" / f"{manifest}.tsv"
    shapes = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = tuple(int(v) for v in shape.split("x")) if shape not in ("", "-") else ()
    return net.config_from_shapes(net.normalize_keys(shapes))


def _file_spelling(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module state-dict names -> the spelling of the released files (docs/formats.md §7, §8)."""
    out = {}
    for k, v in sd.items():
        if k == "encoder.embed_tokens.weight":
            continue  # umT5: tied to shared.weight, not stored
        k = k.replace("conv.parametrizations.weight.original0", "conv.weight_g")
        k = k.replace("conv.parametrizations.weight.original1", "conv.weight_v")
        out[k] = v
    return out
