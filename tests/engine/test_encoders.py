"""The three encoders (umT5, CLIP vision, wav2vec2) built from transformers modules.

Released key sets are checked against manifests enumerated independently from docs/formats.md
(tests/fixtures/manifests/make_encoder_manifests.py); runtime functions are checked against references
written out here from the library's own forward passes and the official formulas.
"""

from __future__ import annotations

import importlib.util
import inspect
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, UMT5Config, Wav2Vec2Config

from engine import audio, image_encoder, text_encoder

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures" / "manifests"
MODULES = {"umt5_xxl": text_encoder, "clip_vision_h": image_encoder, "wav2vec2": audio}


# --------------------------------------------------------------------------------------------------------
# helpers


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (MANIFESTS / f"{name}.tsv").read_text(encoding="utf-8").splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(n) for n in shape.split("x"))
    return out


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def released_spelling(sd: dict) -> dict:
    """Module names -> the released files' names (only wav2vec2's weight norm differs)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("conv.parametrizations.weight.original0", "conv.weight_g")
        k = k.replace("conv.parametrizations.weight.original1", "conv.weight_v")
        out[k] = v
    return out


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(s, generator=gen) for k, s in shapes_of(module).items()}


def materialize(mod, cfg, seed: int = 0, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """build() + a strict assign load of random weights, the way the loader does it."""
    model = mod.build(cfg, device)
    sd = random_state(model, seed)
    model.load_state_dict(sd, strict=True, assign=True)
    return model, sd


def released_configs():
    return {
        "umt5_xxl": UMT5Config(
            vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
        ),
        "clip_vision_h": CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
        ),
        "wav2vec2": Wav2Vec2Config(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
            conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False,
            num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
    }


ARCH_FIELDS = {
    "umt5_xxl": ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj",
                 "dense_act_fn", "is_gated_act", "layer_norm_epsilon"],
    "clip_vision_h": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "image_size", "patch_size", "projection_dim", "num_channels", "hidden_act", "layer_norm_eps"],
    "wav2vec2": ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                 "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
                 "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "hidden_act", "layer_norm_eps"],
}


# --------------------------------------------------------------------------------------------------------
# 1. manifests and 2. configs


def test_manifest_files_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_encoder_manifests", MANIFESTS / "make_encoder_manifests.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, make in gen.MANIFESTS.items():
        assert (MANIFESTS / f"{name}.tsv").read_text(encoding="utf-8") == gen.render(make()), name
    # sizes stated in docs/formats.md / docs/model.md
    assert len(read_manifest("wav2vec2")) == 211
    assert sum(np.prod(s) for s in read_manifest("clip_vision_h").values()) == 632_076_800


@pytest.mark.parametrize("name", list(MODULES))
def test_released_build_matches_manifest(name):
    mod = MODULES[name]
    model = mod.build(released_configs()[name], "meta")
    assert released_spelling(shapes_of(model)) == read_manifest(name)
    assert all(p.is_meta for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("name", list(MODULES))
def test_config_from_released_shapes(name):
    mod = MODULES[name]
    cfg = mod.config_from_shapes(mod.normalize_keys(read_manifest(name)))
    ref = released_configs()[name]
    for field in ARCH_FIELDS[name]:
        got, want = getattr(cfg, field), getattr(ref, field)
        if isinstance(want, (list, tuple)):
            got, want = list(got), list(want)
        assert got == want, field
    # and the config rebuilds exactly the released key set
    assert released_spelling(shapes_of(mod.build(cfg, "meta"))) == read_manifest(name)


@pytest.mark.parametrize("mod", [text_encoder, image_encoder, audio], ids=["umt5", "clip", "wav2vec2"])
def test_config_from_tiny_shapes_round_trips(mod):
    shapes = shapes_of(mod.build(mod.TINY_CONFIG, "meta"))
    assert mod.config_from_shapes(shapes).to_dict() == mod.TINY_CONFIG.to_dict()
    # released spelling goes through normalize_keys to the same config
    cfg = mod.config_from_shapes(mod.normalize_keys(released_spelling(shapes)))
    assert cfg.to_dict() == mod.TINY_CONFIG.to_dict()


@pytest.mark.parametrize(
    "mod,key",
    [
        (text_encoder, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        (image_encoder, "visual_projection.weight"),
        (audio, "feature_projection.projection.weight"),
    ],
    ids=["umt5", "clip", "wav2vec2"],
)
def test_config_from_shapes_names_a_missing_key(mod, key):
    shapes = shapes_of(mod.build(mod.TINY_CONFIG, "meta"))
    del shapes[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        mod.config_from_shapes(shapes)


def test_tiny_configs_as_specified():
    t, c, w = text_encoder.TINY_CONFIG, image_encoder.TINY_CONFIG, audio.TINY_CONFIG
    assert (t.d_model, t.d_kv, t.num_heads, t.d_ff, t.num_layers) == (64, 32, 2, 128, 2)
    assert (t.relative_attention_num_buckets, t.relative_attention_max_distance) == (32, 128)
    assert t.is_gated_act and t.dense_act_fn == "gelu_new"
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.intermediate_size) == (80, 1, 3, 160)
    assert (c.image_size, c.patch_size, c.projection_dim, c.hidden_act) == (28, 14, 16, "gelu")
    assert tuple(w.conv_dim) == (32,) * 7 and np.prod(w.conv_stride) == 320
    assert (w.hidden_size, w.num_hidden_layers, w.num_attention_heads, w.intermediate_size) == (32, 2, 1, 64)
    assert (w.num_conv_pos_embeddings, w.num_conv_pos_embedding_groups) == (128, 16)
    assert (w.feat_extract_norm, w.do_stable_layer_norm) == ("group", False)


# --------------------------------------------------------------------------------------------------------
# build placement


def test_clip_position_ids_real_on_device_and_restored_after_meta_build():
    model = image_encoder.build(image_encoder.TINY_CONFIG, "cpu")
    assert all(p.is_meta for p in model.parameters())
    ids = model.vision_model.embeddings.position_ids
    assert ids.device.type == "cpu" and ids.tolist() == [[0, 1, 2, 3, 4]]

    # a module built on meta (as a loader may do) gets real position_ids from the load itself
    model = image_encoder.build(image_encoder.TINY_CONFIG, "meta")
    model.load_state_dict(random_state(model, 0), strict=True, assign=True)
    ids = model.vision_model.embeddings.position_ids
    assert not ids.is_meta and ids.tolist() == [[0, 1, 2, 3, 4]]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_wav2vec2_build_puts_every_parameter_on_meta():
    model = audio.build(audio.TINY_CONFIG, "cpu")
    assert "masked_spec_embed" in dict(model.named_parameters())
    assert all(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------------------------------------
# 3. tokenizer


@pytest.fixture(scope="module")
def proto() -> bytes:
    return text_encoder.make_tiny_spiece()


def test_make_tiny_spiece_deterministic_fast_and_umt5_ids(proto):
    import sentencepiece

    t0 = time.perf_counter()
    again = text_encoder.make_tiny_spiece()
    assert time.perf_counter() - t0 < 5.0
    assert again == proto
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == 256 == text_encoder.TINY_CONFIG.vocab_size
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


def test_tokenizer_eos_pad_lengths_and_cleaning(proto):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tok = text_encoder.Tokenizer.from_proto(proto)
    texts = ["a woman talks", "  the   man\n reads &amp;amp; smiles  "]
    ids, lengths = tok(texts, text_len=24)
    assert ids.dtype == torch.long and ids.shape == (2, 24) and lengths.dtype == torch.long
    for i, clean in enumerate(["a woman talks", "the man reads & smiles"]):
        pieces = sp.encode(clean)
        n = len(pieces) + 1
        assert lengths[i] == n
        assert ids[i, : n - 1].tolist() == pieces
        assert ids[i, n - 1] == 1  # EOS
        assert (ids[i, n:] == 0).all()  # pad
    assert text_encoder.clean_text("  x &amp;lt;  y\t\n z ") == "x < y z"


def test_tokenizer_truncates_keeping_eos(proto):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tok = text_encoder.Tokenizer.from_proto(proto)
    long = "the camera does not move while the man reads a short story aloud " * 5
    pieces = sp.encode(long.strip())
    assert len(pieces) > 8
    ids, lengths = tok([long, "hi"], text_len=8)
    assert lengths.tolist()[0] == 8
    assert ids[0].tolist() == pieces[:7] + [1]
    # exactly fitting: no truncation
    n = len(sp.encode("a woman talks")) + 1
    ids, lengths = tok(["a woman talks"], text_len=n)
    assert lengths.tolist() == [n] and ids[0, -1] == 1


def test_tokenizer_proto_and_file_round_trip(proto, tmp_path):
    texts = ["a woman with short dark hair", "blurry, low quality"]
    a = text_encoder.Tokenizer.from_proto(proto)(texts, 32)
    # as the loader gets it: a U8 tensor inside the safetensors file
    blob = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    b = text_encoder.Tokenizer.from_proto(blob.numpy().tobytes())(texts, 32)
    path = tmp_path / "spiece.model"
    path.write_bytes(proto)
    c = text_encoder.Tokenizer.from_file(path)(texts, 32)
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


def test_tokenizer_rejects_non_umt5_ids():
    import io

    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g", "h i j k"]), model_writer=buf, vocab_size=20,
        model_type="char", num_threads=1, minloglevel=2,
    )  # default ids: unk 0, bos 1, eos 2
    with pytest.raises(ValueError, match="pad"):
        text_encoder.Tokenizer.from_proto(buf.getvalue())


# --------------------------------------------------------------------------------------------------------
# umT5: tie, strict load, encode_text


def _hf_umt5_reference(sd: dict[str, torch.Tensor]):
    from transformers import UMT5EncoderModel

    ref = UMT5EncoderModel(text_encoder.TINY_CONFIG).eval()
    ref.load_state_dict({**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}, strict=True)
    return ref


def test_umt5_strict_load_with_the_tied_embedding(proto):
    model = text_encoder.build(text_encoder.TINY_CONFIG, "cpu")
    sd = random_state(model, 3)
    assert "encoder.embed_tokens.weight" not in sd  # the module holds the embedding once
    # the ComfyUI file: shared.weight plus the tokenizer blob and the fp8 marker
    file = {**sd, "spiece_model": torch.zeros(10, dtype=torch.uint8), "scaled_fp8": torch.zeros(0)}
    # an HF export additionally stores the tied copy
    hf_export = {**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}
    # a file that stores only the encoder's spelling of the embedding
    only_tied = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in sd.items()}
    for variant in (file, hf_export, only_tied):
        normalized = text_encoder.normalize_keys(variant)
        assert set(normalized) == set(sd)
        assert set(text_encoder.normalize_keys({k: tuple(v.shape) for k, v in variant.items()})) == set(sd)
        m = text_encoder.build(text_encoder.TINY_CONFIG, "cpu")
        m.load_state_dict(normalized, strict=True, assign=True)
        assert m.shared.weight.data_ptr() == normalized["shared.weight"].data_ptr()  # assigned, not copied

    # the encoder embeds with the loaded ``shared``: same output as transformers' own tied model
    m = text_encoder.build(text_encoder.TINY_CONFIG, "cpu")
    m.load_state_dict(text_encoder.normalize_keys(file), strict=True, assign=True)
    ids, lengths = text_encoder.Tokenizer.from_proto(proto)(["a woman talks to the camera", "hi"], 16)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    with torch.no_grad():
        want = _hf_umt5_reference(sd)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(m(ids, mask), want)


def test_encode_text_trims_and_masks(proto):
    model, sd = materialize(text_encoder, text_encoder.TINY_CONFIG, seed=5)
    tok = text_encoder.Tokenizer.from_proto(proto)
    texts = ["hi", "a man in a grey jacket reads a short story aloud to the children"]
    out = text_encoder.encode_text(model, tok, texts, text_len=32)
    _, lengths = tok(texts, 32)
    assert [tuple(o.shape) for o in out] == [(int(n), 64) for n in lengths]
    # padding and the other batch entries do not leak into a text's features (the mask works)
    alone = text_encoder.encode_text(model, tok, texts[:1], text_len=8)
    torch.testing.assert_close(out[0], alone[0], rtol=1e-5, atol=1e-5)
    # and equal transformers' UMT5EncoderModel, trimmed
    ids, lengths = tok(texts, 32)
    mask = (torch.arange(32)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = _hf_umt5_reference(sd)(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[i], ref[i, :n])


# --------------------------------------------------------------------------------------------------------
# 4. CLIP


def _clip_reference_pixels(frames: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(frames, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def test_encode_image_is_penultimate_block_without_post_norm():
    model, _ = materialize(image_encoder, image_encoder.TINY_CONFIG, seed=7)
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 48, 72, generator=gen) * 2 - 1  # a wide frame: resized whole, not cropped
    out = image_encoder.encode_image(model, frames)
    assert out.shape == (2, 5, 80) and out.dtype == torch.float32

    pixels = _clip_reference_pixels(frames, 28)
    with torch.no_grad():
        full = model(pixel_values=pixels, output_hidden_states=True)
        vm = model.vision_model
        # written out: embeddings -> pre-LN -> blocks 1..N-1, no post-LN
        h = vm.pre_layrnorm(vm.embeddings(pixels))
        for layer in vm.encoder.layers[:-1]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
    assert len(full.hidden_states) == 1 + 3
    torch.testing.assert_close(out, full.hidden_states[-2])
    torch.testing.assert_close(out, h)
    assert not torch.allclose(out, full.hidden_states[-1], atol=1e-3)  # not the last block
    with torch.no_grad():
        assert not torch.allclose(out, vm.post_layernorm(full.hidden_states[-2]), atol=1e-3)  # not post-normed
        assert not torch.allclose(out[:, 0], vm.post_layernorm(full.hidden_states[-1][:, 0]), atol=1e-3)


def test_encode_image_resizing():
    model, _ = materialize(image_encoder, image_encoder.TINY_CONFIG, seed=8)
    gen = torch.Generator().manual_seed(1)
    native = torch.rand(1, 3, 28, 28, generator=gen) * 2 - 1
    with torch.no_grad():
        want = model(pixel_values=((native + 1) / 2 - torch.tensor(image_encoder.CLIP_MEAN).view(1, 3, 1, 1))
                     / torch.tensor(image_encoder.CLIP_STD).view(1, 3, 1, 1), output_hidden_states=True)
    torch.testing.assert_close(image_encoder.encode_image(model, native), want.hidden_states[-2])

    # a frame twice the size in one axis only: stretched to the square, so both halves stay visible
    tall = torch.cat([torch.ones(1, 3, 28, 28), -torch.ones(1, 3, 28, 28)], dim=2)  # [1, 3, 56, 28]
    with torch.no_grad():
        ref = model(pixel_values=_clip_reference_pixels(tall, 28), output_hidden_states=True).hidden_states[-2]
        crop = model(pixel_values=_clip_reference_pixels(tall[:, :, 14:42], 28), output_hidden_states=True)
    got = image_encoder.encode_image(model, tall)
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, crop.hidden_states[-2], atol=1e-3)
    with pytest.raises(ValueError):
        image_encoder.encode_image(model, torch.zeros(3, 28, 28))


def test_clip_open_clip_spelling_converts():
    model, sd = materialize(image_encoder, image_encoder.TINY_CONFIG, seed=9)
    layers = image_encoder.TINY_CONFIG.num_hidden_layers
    oc = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "logit_scale": torch.tensor(1.0),
        "token_embedding.weight": torch.zeros(4, 8),  # text tower of a full open_clip file
    }
    for p in ("weight", "bias"):
        oc[f"visual.ln_pre.{p}"] = sd[f"vision_model.pre_layrnorm.{p}"]
        oc[f"visual.ln_post.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
        for n in range(layers):
            hf, o = f"vision_model.encoder.layers.{n}.", f"visual.transformer.resblocks.{n}."
            oc[f"{o}attn.in_proj_{p}"] = torch.cat([sd[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"])
            oc[f"{o}attn.out_proj.{p}"] = sd[f"{hf}self_attn.out_proj.{p}"]
            oc[f"{o}ln_1.{p}"] = sd[f"{hf}layer_norm1.{p}"]
            oc[f"{o}ln_2.{p}"] = sd[f"{hf}layer_norm2.{p}"]
            oc[f"{o}mlp.c_fc.{p}"] = sd[f"{hf}mlp.fc1.{p}"]
            oc[f"{o}mlp.c_proj.{p}"] = sd[f"{hf}mlp.fc2.{p}"]
    converted = image_encoder.normalize_keys(oc)
    assert set(converted) == set(sd)
    for k, v in sd.items():
        assert torch.equal(converted[k], v), k
    shapes = image_encoder.normalize_keys({k: tuple(v.shape) for k, v in oc.items()})
    assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
    # HF spelling passes through; inert keys are dropped
    extra = {**sd, "vision_model.embeddings.position_ids": torch.arange(5)[None], "text_projection.weight": 0}
    assert image_encoder.normalize_keys(extra).keys() == sd.keys()


# --------------------------------------------------------------------------------------------------------
# 5. wav2vec2 features


def _lerp_align_corners(x: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation along the last axis with align_corners=True, written out: output i samples
    input position i * (T - 1) / (n - 1)."""
    t = x.shape[-1]
    pos = torch.arange(n, dtype=torch.float64) * ((t - 1) / (n - 1)) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=t - 1)
    hi = (lo + 1).clamp(max=t - 1)
    frac = (pos - lo).to(x.dtype)
    return x[..., lo] * (1 - frac) + x[..., hi] * frac


def _features_step_by_step(model, wave: np.ndarray, n: int) -> torch.Tensor:
    with torch.no_grad():
        conv = model.feature_extractor(torch.from_numpy(wave)[None])  # [1, C, T50]
        conv = _lerp_align_corners(conv, n)  # [1, C, n]
        h, _ = model.feature_projection(conv.transpose(1, 2))
        enc = model.encoder
        h = enc.layer_norm(h + enc.pos_conv_embed(h))
        outs = []
        for layer in enc.layers:
            h = layer(h, attention_mask=None)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h[0])
    return torch.stack(outs, dim=1)  # [n, L, H]


def _features_library_forward(model, wave: np.ndarray, n: int) -> torch.Tensor:
    """The official wrapper's path: transformers' whole forward with the conv features interpolated."""

    def interpolate(module, inputs, output):
        return F.interpolate(output, size=n, mode="linear", align_corners=True)

    hook = model.feature_extractor.register_forward_hook(interpolate)
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(wave)[None], output_hidden_states=True)
    finally:
        hook.remove()
    assert len(out.hidden_states) == 1 + model.config.num_hidden_layers
    emb = torch.stack(out.hidden_states[1:], dim=1).squeeze(0)  # [L, n, H]
    return emb.permute(1, 0, 2)  # official rearrange "b s d -> s b d": [n, L, H]


@pytest.fixture(scope="module")
def w2v():
    model, _ = materialize(audio, audio.TINY_CONFIG, seed=11)
    return model


def test_audio_features_match_references(w2v):
    gen = np.random.default_rng(0)
    wave = (0.1 * gen.standard_normal(16000)).astype(np.float32)  # 1 s
    assert audio.frames_for_duration(len(wave)) == 25
    feats = audio.audio_features(w2v, wave, audio.frames_for_duration(len(wave)))
    assert feats.shape == (25, 2, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, _features_step_by_step(w2v, wave, 25))
    torch.testing.assert_close(feats, _features_library_forward(w2v, wave, 25))
    # default frame count from the duration
    torch.testing.assert_close(audio.audio_features(w2v, wave), feats)
    # down- and up-sampling of the 49 conv frames
    for n in (10, 80):
        got = audio.audio_features(w2v, wave, n)
        assert got.shape == (n, 2, 32)
        torch.testing.assert_close(got, _features_library_forward(w2v, wave, n))
    # one token per video frame *before* the transformer: not the 50 Hz result resampled afterwards
    at50 = _features_library_forward(w2v, wave, 49)
    after = F.interpolate(at50.permute(1, 2, 0), size=25, mode="linear", align_corners=True).permute(2, 0, 1)
    assert not torch.allclose(feats, after, atol=1e-3)


def test_audio_features_normalize_flag(w2v):
    assert inspect.signature(audio.audio_features).parameters["normalize"].default is False
    gen = np.random.default_rng(1)
    # The base model's first conv layer is followed by a per-channel GroupNorm, which removes the waveform's
    # scale and offset up to its eps; a quiet waveform makes the normalisation visible through that eps.
    wave = (1e-3 * gen.standard_normal(8000) + 2e-4).astype(np.float32)
    normed = ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)
    got = audio.audio_features(w2v, wave, 12, normalize=True)
    torch.testing.assert_close(got, _features_library_forward(w2v, normed, 12))
    assert not torch.allclose(got, audio.audio_features(w2v, wave, 12), atol=1e-3)
    # float64 input (pyloudnorm's output) is cast to float32 like the feature extractor does
    torch.testing.assert_close(audio.audio_features(w2v, wave.astype(np.float64), 12),
                               audio.audio_features(w2v, wave, 12))


def test_audio_features_rejects_bad_input(w2v):
    with pytest.raises(ValueError, match="400"):
        audio.audio_features(w2v, np.zeros(399, np.float32), 1)
    with pytest.raises(ValueError):
        audio.audio_features(w2v, np.zeros((2, 16000), np.float32), 25)
    with pytest.raises(ValueError):
        audio.audio_features(w2v, np.zeros(16000, np.float32), 0)


def test_frames_for_duration_rounds_like_upstream():
    assert audio.frames_for_duration(16000) == 25
    assert audio.frames_for_duration(51840) == 81  # 3.24 s
    assert audio.frames_for_duration(15999) == 24  # int() truncates
    assert audio.frames_for_duration(48000, 48000, 30) == 30
    for n in (1, 639, 640, 12345, 999_999):
        assert audio.frames_for_duration(n) == int(n / 16000 * 25)


# --------------------------------------------------------------------------------------------------------
# 6. wav2vec2 key spellings


def test_wav2vec2_normalize_keys_round_trip():
    model, sd = materialize(audio, audio.TINY_CONFIG, seed=12)
    released = released_spelling(sd)
    assert "encoder.pos_conv_embed.conv.weight_g" in released
    assert "encoder.pos_conv_embed.conv.weight_v" in released
    # kijai's prefix plus pre-training heads that Wav2Vec2Model does not have
    kijai = {f"wav2vec2.{k}": v for k, v in released.items()}
    kijai.update({"quantizer.codevectors": torch.zeros(1, 4, 8), "project_q.weight": torch.zeros(4, 8),
                  "project_hid.weight": torch.zeros(4, 32), "project_hid.bias": torch.zeros(4)})
    for variant in (released, kijai, sd):
        normalized = audio.normalize_keys(variant)
        assert normalized.keys() == sd.keys()
        for k, v in sd.items():
            assert normalized[k] is v, k
        shapes = audio.normalize_keys({k: tuple(v.shape) for k, v in variant.items()})
        assert shapes == {k: tuple(v.shape) for k, v in sd.items()}
    fresh = audio.build(audio.TINY_CONFIG, "cpu")
    fresh.load_state_dict(audio.normalize_keys(kijai), strict=True, assign=True)
    conv = fresh.encoder.pos_conv_embed.conv
    g, v = released["encoder.pos_conv_embed.conv.weight_g"], released["encoder.pos_conv_embed.conv.weight_v"]
    # weight = g * v / ||v|| with the norm over every dim but the kernel axis (weight_norm dim=2)
    want = g * v / v.norm(dim=(0, 1), keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(conv.weight, want)
