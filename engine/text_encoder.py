"""umT5-XXL text encoder (Wan 2.1's prompt encoder) on top of transformers' UMT5 stack.

The network is transformers' ``UMT5Stack`` plus the token embedding ``shared``, held by composition in
:class:`UMT5TextEncoder` so that the module's state-dict names equal the ComfyUI file's keys
(docs/formats.md §8.1: ``shared.weight``, ``encoder.block.N.layer.{0,1}...``, ``encoder.final_layer_norm.weight``).

How it matches the official Wan ``T5EncoderModel`` (docs/model.md §12, Wan ``wan/modules/t5.py``):

- umT5 has a relative position bias in **every** block (32 buckets, bidirectional, max distance 128);
  no attention scaling; T5 RMS norm eps 1e-6; gated GELU(tanh) FFN (``wi_0`` is the GELU branch).
- The tokenizer cleans whitespace and HTML entities, appends EOS (id 1), pads with 0 to ``text_len``
  and truncates to ``text_len`` tokens with the EOS kept last (the official HF tokenizer call with
  ``truncation=True, max_length=512, add_special_tokens=True``).
- :func:`encode_text` runs with the padding mask and trims each output to its real length (incl. EOS);
  the DiT zero-pads back to 512 itself.

Deviation: the official cleaning also runs ``ftfy.fix_text``; ftfy is not a dependency here (it repairs
mojibake, which a typed prompt does not have).
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn
from transformers import UMT5Config

if TYPE_CHECKING:
    import sentencepiece

__all__ = [
    "UMT5TextEncoder",
    "Tokenizer",
    "clean_text",
    "TINY_CONFIG",
    "PAD_ID",
    "EOS_ID",
    "UNK_ID",
    "config_from_shapes",
    "normalize_keys",
    "build",
    "encode_text",
    "make_tiny_spiece",
]

T = TypeVar("T")

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # umT5's SentencePiece ids (no BOS)
TEXT_LEN = 512  # the DiT's text context length


def _make_config(
    *,
    vocab_size: int,
    d_model: int,
    d_kv: int,
    d_ff: int,
    num_layers: int,
    num_heads: int,
    relative_attention_num_buckets: int = 32,
    feed_forward_proj: str = "gated-gelu",
) -> UMT5Config:
    """The one place that fixes the non-derivable facts, so TINY and released configs agree on them."""
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=128,  # not in the weights; umT5 / Wan use 128
        feed_forward_proj=feed_forward_proj,  # "gated-gelu" -> gelu_new (tanh) on wi_0, times wi_1
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )


# The tiny test model. vocab_size must equal make_tiny_spiece()'s default vocabulary (256).
TINY_CONFIG: UMT5Config = _make_config(vocab_size=256, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)


# --------------------------------------------------------------------------------------------------------
# The network


class UMT5TextEncoder(nn.Module):
    """``shared`` (token embedding [vocab, d_model]) + transformers' ``UMT5Stack`` as ``encoder``.

    transformers ties ``encoder.embed_tokens`` to ``shared``; here the stack has no embedding of its own
    (``embed_tokens`` is None) and receives ``inputs_embeds`` from ``shared``. So the state dict holds the
    embedding once, as the ComfyUI file does, and an ``assign=True`` load cannot break a tie.
    """

    def __init__(self, shared: nn.Embedding, encoder: nn.Module, config: UMT5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = shared
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [B, L] int64, attention_mask [B, L] (1 = real token) -> [B, L, d_model]."""
        embeds = self.shared(input_ids)  # [B, L, d_model]
        out = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask)
        return out[0]  # last_hidden_state (after final_layer_norm)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> UMT5Config:
    """Read the config from tensor shapes (keys as :func:`normalize_keys` returns them).

    ``relative_attention_bias`` is [buckets, heads], so it gives the head count; d_kv = q rows / heads.
    """

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"umT5 weights: missing key {key!r}; is this a umT5/T5 encoder file?")
        return tuple(shapes[key])

    vocab, d_model = need("shared.weight")
    buckets, heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]  # heads * d_kv
    if inner % heads:
        raise ValueError(f"umT5 weights: q rows {inner} not divisible by {heads} heads")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = need(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
    num_layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
    need("encoder.final_layer_norm.weight")
    return _make_config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


_DROP_EXACT = ("spiece_model", "scaled_fp8", "lm_head.weight")
_DROP_PREFIX = ("decoder.",)


def normalize_keys(sd: dict[str, T]) -> dict[str, T]:
    """ComfyUI / HF spelling -> this module's state-dict names; works on tensors and on shape tuples.

    - ``encoder.embed_tokens.weight`` is HF's tied copy of ``shared.weight``: dropped, or renamed to
      ``shared.weight`` when a file stores only that spelling.
    - ``spiece_model`` (the tokenizer proto), the ``scaled_fp8`` marker and a decoder (full T5 files)
      are not encoder weights: dropped.
    """
    out: dict[str, T] = {}
    for k, v in sd.items():
        if k in _DROP_EXACT or k.startswith(_DROP_PREFIX):
            continue
        if k == "encoder.embed_tokens.weight":
            if "shared.weight" not in sd:
                out["shared.weight"] = v
            continue
        out[k] = v
    return out


def build(cfg: UMT5Config, device: torch.device | str) -> UMT5TextEncoder:
    """The encoder with every parameter on the meta device (a strict ``assign=True`` load fills it).

    The umT5 stack has no buffers, so ``device`` has nothing to hold; it is accepted for the common
    ``build(cfg, device)`` contract.
    """
    from transformers import UMT5EncoderModel  # heavy import, only when a model is built

    with torch.device("meta"):
        hf = UMT5EncoderModel(cfg)
    encoder = hf.encoder
    encoder.embed_tokens = None  # the embedding lives in ``shared`` only (see UMT5TextEncoder)
    model = UMT5TextEncoder(hf.shared, encoder, hf.config)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # a transformers upgrade added state build() does not know how to place
        raise RuntimeError(f"umT5: unexpected buffers {buffers}; build() must create them on {device}")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------
# Tokenizer

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The official ``clean='whitespace'`` path minus ftfy: unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class Tokenizer:
    """umT5 tokenizer over a SentencePiece model (pad 0, EOS 1, unk 2, no BOS)."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor) -> None:
        self.sp = processor
        self.vocab_size: int = processor.get_piece_size()
        if processor.pad_id() != PAD_ID or processor.eos_id() != EOS_ID:
            raise ValueError(
                f"SentencePiece model has pad id {processor.pad_id()} and EOS id {processor.eos_id()}; "
                f"umT5 needs pad {PAD_ID} and EOS {EOS_ID}"
            )

    @classmethod
    def from_proto(cls, data: bytes) -> Tokenizer:
        """From a serialized ModelProto, e.g. the ``spiece_model`` U8 tensor of the ComfyUI file."""
        import sentencepiece

        return cls(sentencepiece.SentencePieceProcessor(model_proto=bytes(data)))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """From a ``spiece.model`` file (e.g. HF ``google/umt5-xxl``)."""
        return cls.from_proto(Path(path).read_bytes())

    def encode(self, text: str) -> list[int]:
        """Cleaned text -> piece ids, without EOS."""
        return list(self.sp.encode(clean_text(text), out_type=int))

    def __call__(self, texts: list[str], text_len: int = TEXT_LEN) -> tuple[Tensor, Tensor]:
        """-> (ids [B, text_len] int64 padded with 0, lengths [B] int64 incl. EOS).

        Like the HF tokenizer with ``truncation=True``: a long text keeps its first ``text_len - 1``
        pieces and still ends in EOS.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings")
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        ids = torch.full((len(texts), text_len), PAD_ID, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            pieces = self.encode(text)[: text_len - 1] + [EOS_ID]
            ids[i, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
            lengths[i] = len(pieces)
        return ids, lengths


# A few paragraphs of plain English for the tiny tokenizer: prompt-like and negative-prompt-like text.
_TINY_CORPUS = """\
A woman with short dark hair sits at a wooden desk and talks to the camera.
She smiles, nods and explains how the new garden was planted during the spring.
Behind her a window shows green trees, a blue sky and a few white clouds moving slowly.
The light is soft and warm, the room is quiet, and the recording is clear.
A man in a grey jacket stands next to a bookshelf and reads a short story aloud.
His voice is calm; his hands move while he speaks about the river, the mountains and the old bridge.
He describes the small village where he grew up, the market square and the bakery on the corner.
Children laugh in the distance while the camera stays still and the picture stays sharp.
Two friends sit on a bench in a park and share a conversation about music, books and travel.
Bright colors, overexposed, static, blurred details, subtitles, style, works, paintings, images,
still picture, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete,
extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs,
fused fingers, still picture, messy background, three legs, many people in the background,
walking backwards.
"""


def make_tiny_spiece(vocab_size: int = 256) -> bytes:
    """Train a deterministic SentencePiece BPE model on a built-in paragraph; return the serialized proto.

    Ids as in umT5: pad 0, EOS 1, unk 2, no BOS. Single-threaded training on fixed text gives identical
    bytes on every call (takes a few milliseconds).
    """
    import sentencepiece

    lines = [line.strip() for line in _TINY_CORPUS.splitlines() if line.strip()]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",  # the unigram trainer cannot reach 256 pieces on this little text
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,  # no log output
    )
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Runtime


def encode_text(model: nn.Module, tokenizer: Tokenizer, texts: list[str], text_len: int = TEXT_LEN) -> list[Tensor]:
    """Encode prompts: one tensor [L_i, d_model] per text, trimmed to its real token count (incl. EOS).

    Runs with the padding mask (padded keys are masked in every layer), in the model's dtype, on the
    model's device. Output dtype is the model's dtype, like the official encoder's.
    """
    ids, lengths = tokenizer(texts, text_len)
    # Only the longest real length is run: with the padding mask, umT5's outputs at real positions do not depend
    # on how many padded positions follow (relative position bias, masked keys), so the 512-token pad of the
    # official code is pure waste here (a typical prompt has ~30-80 tokens).
    run_len = max(1, int(lengths.max()))
    device = next(model.parameters()).device
    ids = ids[:, :run_len].to(device)
    mask = (torch.arange(run_len).unsqueeze(0) < lengths.unsqueeze(1)).to(device=device, dtype=torch.long)
    with torch.inference_mode():
        out = model(ids, mask)  # [B, run_len, d_model]
    return [out[i, : int(n)] for i, n in enumerate(lengths)]
