"""Wan 2.1 VAE (engine/vae.py): keys, config detection, agreement with diffusers, causality.

All fp32 on CPU at the TINY size (dim=8: 8/16/32/32 channels) on 9 frames of 32x32, except the
meta-device key check of the released size.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from engine.vae import (
    LATENT_MEAN,
    LATENT_STD,
    RELEASED,
    TINY,
    CausalCache,
    VAEConfig,
    WanVAE,
    build,
    config_from_shapes,
)

MANIFEST = Path(__file__).parents[1] / "fixtures" / "manifests" / "vae.tsv"
TOL = 1e-4  # max abs error between fp32 implementations (observed ~1e-6)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _tiny_vae(seed: int = 0) -> WanVAE:
    """TINY VAE with random weights; gammas perturbed away from 1 so that every tensor matters."""
    torch.manual_seed(seed)
    vae = WanVAE(TINY).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return vae


def _video(t: int = 9, hw: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, hw, hw, generator=g) * 2 - 1


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


# --------------------------------------------------------------------------- 1. keys


def test_released_keys_match_manifest() -> None:
    with torch.device("meta"):
        vae = WanVAE(RELEASED)
    expected = {}
    for line in MANIFEST.read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = tuple(int(n) for n in shape.split("x"))
    assert _shapes(vae) == expected
    assert len(expected) == 194
    assert sum(math.prod(s) for s in expected.values()) == 126_892_531
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert not list(vae.buffers())  # mean/std are constants, not state


# --------------------------------------------------------------------------- 2. config detection


@pytest.mark.parametrize("cfg", [RELEASED, TINY], ids=["released", "tiny"])
def test_config_from_shapes_round_trip(cfg: VAEConfig) -> None:
    with torch.device("meta"):
        shapes = _shapes(WanVAE(cfg))
    assert config_from_shapes(shapes) == cfg


def test_config_from_shapes_names_bad_keys() -> None:
    with torch.device("meta"):
        shapes = _shapes(WanVAE(TINY))
    dropped = dict(shapes)
    del dropped["decoder.upsamples.4.shortcut.weight"]
    with pytest.raises(ValueError, match=re.escape("missing: decoder.upsamples.4.shortcut.weight")):
        config_from_shapes(dropped)
    with pytest.raises(ValueError, match="missing encoder.conv1.weight"):
        config_from_shapes({k: v for k, v in shapes.items() if k != "encoder.conv1.weight"})
    reshaped = dict(shapes, **{"decoder.head.2.weight": (4, 8, 3, 3, 3)})
    with pytest.raises(ValueError, match=re.escape("wrong shape: decoder.head.2.weight (4, 8, 3, 3, 3)")):
        config_from_shapes(reshaped)
    with pytest.raises(ValueError, match="unexpected: extra.weight"):
        config_from_shapes(dict(shapes, **{"extra.weight": (1,)}))


# --------------------------------------------------------------------------- 3. diffusers


def _diffusers_to_wan(sd: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """Rename diffusers AutoencoderKLWan keys to the original Wan keys (written for this test).

    diffusers nests the decoder as up_blocks.i.{resnets.j, upsamplers.0}; Wan flattens it into
    upsamples.N with num_res_blocks + 1 residual blocks and one resample per stage.
    """
    per_stage = num_res_blocks + 2  # residual blocks + the upsampler
    # Inside residual blocks (diffusers names "conv1"/"conv2" only there; its top-level convs are
    # conv_in/conv_out/quant_conv/post_quant_conv, so these cannot clash). Applied first.
    inner = [("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"), ("conv2", "residual.6"),
             ("conv_shortcut", "shortcut")]  # fmt: skip
    outer = [
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ]
    out = {}
    for key, value in sd.items():
        k = key
        for a, b in inner:
            k = re.sub(rf"\.{a}\.(weight|bias|gamma)$", rf".{b}.\1", k)
        for a, b in outer:
            k = re.sub(a, b, k)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)", k)
        if m:
            i, j, rest = int(m.group(1)), m.group(2), m.group(3)
            n = i * per_stage + (int(j) if j is not None else num_res_blocks + 1)
            k = f"decoder.upsamples.{n}.{rest}"
        out[k] = value
    return out


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, WanVAE]:
    """A random TINY diffusers AutoencoderKLWan and our WanVAE loaded strictly from its converted weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(
        base_dim=TINY.dim,
        z_dim=TINY.z_dim,
        dim_mult=list(TINY.dim_mult),
        num_res_blocks=TINY.num_res_blocks,
        temperal_downsample=list(TINY.temperal_downsample),
    ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    vae = WanVAE(TINY).eval()
    vae.load_state_dict(_diffusers_to_wan(ref.state_dict(), TINY.num_res_blocks), strict=True)
    return ref, vae


def test_encode_matches_diffusers(pair: tuple[torch.nn.Module, WanVAE]) -> None:
    # diffusers' encode returns the raw posterior; its latents_mean/std live in the config and are
    # applied by the pipelines, so we normalise its mu here: ours = (mu - mean) / std.
    ref, vae = pair
    video = _video()
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mean  # [1, 16, 3, 4, 4]
    mean, std = _stats()
    ours = vae.encode(video)
    assert ours.shape == (1, 16, 3, 4, 4) and ours.dtype == torch.float32
    assert (ours - (mu - mean) / std).abs().max().item() < TOL
    assert mu.std().item() > 0.1  # not a degenerate comparison


def test_decode_matches_diffusers(pair: tuple[torch.nn.Module, WanVAE]) -> None:
    # diffusers' decode takes the raw latent (so we de-normalise) and clamps to [-1, 1] like ours.
    ref, vae = pair
    z = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    mean, std = _stats()
    with torch.no_grad():
        expected = ref.decode(z * std + mean).sample
    ours = vae.decode(z)
    assert ours.shape == (1, 3, 9, 32, 32) and ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() < TOL
    assert (expected.abs() < 0.99).float().mean().item() > 0.5  # mostly not clipped: comparison is informative


# --------------------------------------------------------------------------- 4. chunking and causality


def test_decode_iter_streams_the_decode() -> None:
    vae = _tiny_vae()
    z = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    chunks = list(vae.decode_iter(z))
    assert [c.shape for c in chunks] == [(2, 3, 1, 32, 32), (2, 3, 4, 32, 32), (2, 3, 4, 32, 32)]
    whole = vae.decode(z)
    assert torch.equal(torch.cat(chunks, dim=2), whole)
    # One decoder pass over all latents with a fresh cache (no chunking) gives the same video:
    # the cache carries exactly the context the chunks need.
    mean, std = _stats()
    with torch.no_grad():
        single = vae.decoder(vae.conv2(z * std + mean), CausalCache()).clamp(-1, 1)
    assert (single - whole).abs().max().item() < 1e-5
    # Causality: decoding only the first 2 latents gives the first 5 frames of the full decode.
    assert (vae.decode(z[:, :, :2]) - whole[:, :, :5]).abs().max().item() < 1e-6


def test_encode_is_causal_and_chunking_is_exact() -> None:
    vae = _tiny_vae()
    video = _video()
    full = vae.encode(video)
    assert full.shape == (1, 16, 3, 4, 4)
    # The first 5 frames alone give the first 2 latents of the 9-frame encode.
    head = vae.encode(video[:, :, :5])
    assert head.shape == (1, 16, 2, 4, 4)
    assert (head - full[:, :, :2]).abs().max().item() < 1e-6
    # Changing a later frame leaves earlier latents untouched.
    changed = video.clone()
    changed[:, :, 6] = 0.0
    other = vae.encode(changed)
    assert torch.equal(other[:, :, :2], full[:, :, :2]) and not torch.allclose(other[:, :, 2], full[:, :, 2])
    # One encoder pass over all 9 frames with a fresh cache equals the chunked (1, 4, 4) encode.
    mean, std = _stats()
    with torch.no_grad():
        h = vae.encoder(video, CausalCache())
        single = (vae.conv1(h)[:, :16] - mean) / std
    assert (single - full).abs().max().item() < 1e-5


def test_single_image_and_input_checks() -> None:
    vae = _tiny_vae()
    z = vae.encode(_video(t=1))
    assert z.shape == (1, 16, 1, 4, 4)
    assert vae.decode(z).shape == (1, 3, 1, 32, 32)
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        vae.encode(_video(t=8))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(hw=20))
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))


def test_bf16_runs_close_to_fp32() -> None:
    vae = _tiny_vae()
    video = _video(t=5)
    z32 = vae.encode(video)
    x32 = vae.decode(z32)
    vae16 = _tiny_vae().to(torch.bfloat16)
    z16 = vae16.encode(video)
    x16 = vae16.decode(z32)
    assert z16.dtype == x16.dtype == torch.float32
    assert (z16 - z32).abs().max().item() < 0.1
    assert (x16 - x32).abs().max().item() < 0.1


def test_builds_on_meta() -> None:
    vae = build(RELEASED, "cpu")
    assert all(p.is_meta and not p.requires_grad for p in vae.parameters()) and not vae.training
    with pytest.raises(ValueError, match="z_dim"):
        VAEConfig(z_dim=4)
