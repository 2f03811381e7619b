"""The Wan 2.1 causal video VAE: 3x8x8 pixels -> 16 latent channels, 4x temporal, 8x spatial.

Attribute paths equal the keys of the released file (``Wan2.1_VAE.pth`` /
``Wan2_1_VAE_bf16.safetensors``, docs/formats.md §6), so a state dict loads with
``strict=True`` and no rename table. The maths follows ``Wan-Video/Wan2.1``
``wan/modules/vae.py`` (read, not copied); docs/model.md §11 summarises it.

Shapes (released config, dim=96):
    encode: video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latent [B, 16, 1 + k, H/8, W/8]
    decode: normalised latent [B, 16, F, h, w]   -> video [B, 3, 1 + 4(F - 1), 8h, 8w] in [-1, 1]

Everything is causal in time, so a clip can be processed in chunks: the encoder sees frame 0
alone and then 4 frames at a time, the decoder one latent at a time. What a chunk needs from
earlier chunks (the last 2 input frames of every 3-tap causal conv, the last frame before each
temporal downsample, whether a temporal upsample has seen the first frame) lives in a
:class:`CausalCache` created per encode/decode call and passed down explicitly.

Deviations from upstream, all numerically neutral in fp32:
- The cache is an object keyed by module instead of ``feat_cache`` (a list) + ``feat_idx=[0]``
  (a mutable default counter); modules never hold per-call state.
- The "first frame is special" rule of the temporal resamplers is applied to the first frame of
  the stream rather than to the first *call*, so one pass over a whole clip with a fresh cache
  equals the chunked pass (the tests use that as a check of the cache).
- RMS norm accumulates the channel norm in fp32, so bf16/fp16 activations neither lose precision
  nor overflow (an fp16 sum of squares over 384 channels can exceed 65504).
- Nearest 2x upsampling runs in the activation dtype; upstream upcasts to fp32 as a workaround
  for old torch versions. Nearest with an integer factor only copies values, so this is exact.
- ``encode`` computes only the mu half of ``conv1`` (logvar is never used) and returns fp32;
  ``decode`` returns fp32. Dropout (index 5 of each residual branch) is an Identity.
- The latent normalisation ``(mu - mean) / std`` is part of encode/decode here; upstream keeps
  it in the ``WanVAE`` wrapper (and ComfyUI in ``latent_formats.Wan21``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import attention

__all__ = [
    "VAEConfig",
    "RELEASED",
    "TINY",
    "LATENT_MEAN",
    "LATENT_STD",
    "config_from_shapes",
    "CausalCache",
    "WanVAE",
    "build",
]


@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of the Wan 2.1 VAE (upstream ``_video_vae``; attn_scales is always [])."""

    dim: int = 96  # base channel count; encoder stages use dim * dim_mult[i]
    z_dim: int = 16  # latent channels (the encoder head emits 2 * z_dim: mu and logvar)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder stage; the decoder uses num_res_blocks + 1
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # spelling as upstream; decoder reverses it

    def __post_init__(self) -> None:
        if self.z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(LATENT_MEAN)} (the latent mean/std have that many entries)")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temperal_downsample needs one entry per stage transition (len(dim_mult) - 1)")
        if self.dim <= 0 or self.num_res_blocks <= 0 or not self.dim_mult:
            raise ValueError(f"invalid VAE config {self}")

    @property
    def temporal_factor(self) -> int:
        return 1 << sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 1 << (len(self.dim_mult) - 1)


# Per-channel statistics of mu over Wan's training data (upstream WanVAE wrapper, ComfyUI Wan21).
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

RELEASED = VAEConfig()
TINY = VAEConfig(dim=8)  # 8/16/32/32 channels: the same code at test size


# --------------------------------------------------------------------------- cache


class CausalCache:
    """Per-call state of a chunked causal pass: what each module needs from earlier chunks.

    Create one per encode/decode call and pass it to every chunk of that call. Entries are keyed by
    the module object, so nothing depends on the order in which modules run. Stored frames are
    copies, so the chunk they came from can be freed.
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, Tensor] = {}
        self._started: set[nn.Module] = set()

    def frames(self, module: nn.Module) -> Tensor | None:
        """Frames ``module`` kept from earlier chunks ([B, C, t, H, W]), or None at the stream start."""
        return self._frames.get(module)

    def keep(self, module: nn.Module, frames: Tensor) -> None:
        """Replace ``module``'s entry with a copy of ``frames`` (a copy, not a view of the chunk)."""
        self._frames[module] = frames.clone()

    def first_call(self, module: nn.Module) -> bool:
        """True the first time ``module`` asks during this pass (i.e. its input starts at frame 0)."""
        if module in self._started:
            return False
        self._started.add(module)
        return True

    def __len__(self) -> int:
        return len(self._frames)


# --------------------------------------------------------------------------- layers


def _per_frame(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame: [B, C, T, H, W] -> [B, C', T, H', W']."""
    b, c, t, h, w = x.shape
    y: Tensor = layer(x.transpose(1, 2).reshape(b * t, c, h, w))  # [(B T), C', H', W']
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d that is causal in time: ``2 * padding_t`` frames of left context, none on the right.

    Spatial padding is ordinary zero padding. The left context comes from the cache when an earlier
    chunk left frames there, otherwise it is zeros; either way the result equals one causal
    convolution over the whole stream.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt  # frames of left context (2 for the 3-tap convs, 0 for 1x1x1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """x: [B, Cin, T, H, W] -> [B, Cout, T, H, W] (stride 1). ``cache=None``: x starts the stream."""
        if self.time_pad:
            prev = cache.frames(self) if cache is not None else None
            if prev is not None:
                x = torch.cat([prev, x], dim=2)  # real context replaces (some of) the zero padding
            if cache is not None:
                cache.keep(self, x[:, :, -self.time_pad :])  # the next chunk's context
            missing = self.time_pad - (prev.shape[2] if prev is not None else 0)
            if missing > 0:
                x = F.pad(x, (0, 0, 0, 0, missing, 0))
        return super().forward(x)


class RMS_norm(nn.Module):  # noqa: N801 (upstream class name)
    """L2-normalise over channels (dim 1), times sqrt(C) and a learned per-channel gamma (no bias).

    ``images=True``: input [N, C, H, W], gamma [C, 1, 1]; else [B, C, T, H, W], gamma [C, 1, 1, 1].
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 norm without an fp32 copy of x: precise in bf16, no overflow in fp16.
        norm: Tensor = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        factor = (norm.clamp_min(1e-12).reciprocal() * self.scale).to(x.dtype)  # F.normalize's eps
        out: Tensor = x * factor * self.gamma.to(x.dtype)
        return out


class ResidualBlock(nn.Module):
    """RMS_norm -> SiLU -> conv 3^3 -> RMS_norm -> SiLU -> (dropout) -> conv 3^3, plus shortcut.

    The Sequential's indices are the checkpoint's: residual.0 / .2 / .3 / .6 carry weights.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # Dropout(0.0) upstream; inference only
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        # 1x1x1 projection when the channel count changes (no time context, so no cache).
        self.shortcut: nn.Module = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, Cin, T, H, W] -> [B, Cout, T, H, W]."""
        r = self.residual
        h: Tensor = r[2](r[1](r[0](x)), cache)
        h = r[6](r[5](r[4](r[3](h))), cache)
        shortcut: Tensor = self.shortcut(x)
        return h + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (no time mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """x: [B, C, T, H, W] -> same shape. Per frame, so it needs nothing from the cache."""
        b, c, t, h, w = x.shape
        y: Tensor = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # [(B T), C, H, W]
        # to_qkv's 3C output channels are q | k | v, each C wide (upstream's chunk(3) order).
        qkv = self.to_qkv(y).reshape(b * t, 3, c, h * w).permute(0, 3, 1, 2).contiguous()  # [(B T), HW, 3, C]
        q, k, v = qkv.chunk(3, dim=2)  # each [(B T), HW, 1, C]: one head of width C
        y = attention(q, k, v).reshape(b * t, h * w, c).transpose(1, 2).reshape(b * t, c, h, w)
        y = self.proj(y)  # [(B T), C, H, W]
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Downsample(nn.Module):
    """Halve H and W (ZeroPad right/bottom + Conv2d 3x3 stride 2, per frame); optionally halve time.

    Temporal (``downsample3d``): frame 0 of the stream passes through; every later pair of frames
    (2i+1, 2i+2) becomes one frame through ``time_conv`` (kernel 3, stride 2, no padding) applied to
    (2i, 2i+1, 2i+2). So 1 + 2m frames -> 1 + m. The cache keeps the last frame for the next chunk.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, C, T, H, W] -> [B, C, T', H/2, W/2]; T' = T, or as in the class docstring."""
        x = _per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        prev = cache.frames(self)
        cache.keep(self, x[:, :, -1:])
        if prev is not None:  # continuing the stream: T is even
            assert x.shape[2] % 2 == 0, "temporal downsample expects an even chunk after frame 0"
            out: Tensor = self.time_conv(torch.cat([prev, x], dim=2))
            return out
        assert x.shape[2] % 2 == 1, "temporal downsample expects 1 + 2m frames at the stream start"
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


class Upsample(nn.Module):
    """Double H and W (nearest 2x + Conv2d 3x3 to dim/2, per frame); optionally double time first.

    Temporal (``upsample3d``): frame 0 of the stream passes through as one frame; every later frame
    goes through the causal ``time_conv`` (dim -> 2 * dim) whose two channel halves become two
    consecutive frames. So 1 + m frames -> 1 + 2m.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # Nearest-exact with factor 2 copies each pixel into a 2x2 block, in any dtype.
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def _double_time(self, x: Tensor, cache: CausalCache) -> Tensor:
        """[B, C, T, H, W] -> [B, C, 2T, H, W]: frame 2i from channels [0, C), 2i+1 from [C, 2C)."""
        assert self.time_conv is not None
        b, c, t, h, w = x.shape
        y: Tensor = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
        return y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, C, T, H, W] -> [B, C/2, T', 2H, 2W]; T' = T, or as in the class docstring."""
        if self.time_conv is not None:
            if cache.first_call(self):
                # Frame 0 is not doubled; the frames after it start time_conv's stream (zero context).
                if x.shape[2] > 1:
                    x = torch.cat([x[:, :, :1], self._double_time(x[:, :, 1:], cache)], dim=2)
            else:
                x = self._double_time(x, cache)
        return _per_frame(self.resample, x)


# --------------------------------------------------------------------------- encoder / decoder


def _head(head: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    """RMS_norm (head.0) -> SiLU (head.1) -> causal conv 3^3 (head.2)."""
    out: Tensor = head[2](head[1](head[0](x)), cache)
    return out


class Encoder3d(nn.Module):
    """[B, 3, T, H, W] -> [B, 2 * z_dim, T', H/8, W/8] (mu | logvar before ``conv1``).

    Channels (released): 3 -> 96 -> 96 -> 192 -> 384 -> 384; ``downsamples`` holds, per stage,
    num_res_blocks residual blocks then (except after the last stage) a Downsample.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Downsample(out_dim, temporal=cfg.temperal_downsample[i]))
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMS_norm(c), nn.SiLU(), CausalConv3d(c, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return _head(self.head, x, cache)


class Decoder3d(nn.Module):
    """[B, z_dim, F, h, w] -> [B, 3, 1 + 4(F - 1), 8h, 8w] (before clamping).

    Channels (released): 16 -> 384 (middle) -> 384 -> 384 -> 192 -> 96 -> 3. Each stage has
    num_res_blocks + 1 residual blocks; each Upsample halves the channels, so the next stage's
    first block starts from dim/2.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = tuple(reversed(cfg.temperal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's Upsample output
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Upsample(out_dim, temporal=temporal_up[i]))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return _head(self.head, x, cache)


# --------------------------------------------------------------------------- model


class WanVAE(nn.Module):
    """The Wan 2.1 VAE with latent normalisation; keys ``encoder.*``, ``conv1.*``, ``conv2.*``, ``decoder.*``.

    Build on the meta device and load with ``load_state_dict(sd, strict=True, assign=True)``; the
    module computes in the dtype of its weights (fp32, bf16 or fp16). encode/decode run without
    autograd.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> mu | logvar
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # latent -> decoder input
        self.decoder = Decoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """LATENT_MEAN / LATENT_STD as fp32 [1, z, 1, 1, 1] on ``like``'s device."""
        mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(LATENT_STD, dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)
        return mean, std

    def _mu(self, h: Tensor) -> Tensor:
        """conv1 restricted to its mu half: [B, 2z, t, h, w] -> [B, z, t, h, w]."""
        z = self.cfg.z_dim
        return F.conv3d(h, self.conv1.weight[:z], self.conv1.bias[:z] if self.conv1.bias is not None else None)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Encode a clip causally: frame 0 alone, then chunks of 4 frames, one cache for the call.

        Args:
            video: [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8.
        Returns:
            normalised latent ``(mu - mean) / std``, fp32 [B, 16, 1 + k, H/8, W/8] (mu only, no sampling).
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        _, _, t, h, w = video.shape
        tf, sf = self.cfg.temporal_factor, self.cfg.spatial_factor
        if (t - 1) % tf or h % sf or w % sf:
            raise ValueError(f"video needs T = 1 + {tf}k frames and H, W multiples of {sf}; got T={t}, {h}x{w}")
        video = video.to(self.dtype)
        cache = CausalCache()
        starts = [0, *range(1, t, tf)]  # chunk i covers frames [starts[i], starts[i + 1])
        mus = [
            self._mu(self.encoder(video[:, :, s:e], cache))  # [B, z, 1, h/8, w/8] per chunk
            for s, e in zip(starts, [*starts[1:], t])
        ]
        mean, std = self._stats(video)
        return (torch.cat(mus, dim=2).float() - mean) / std

    @torch.no_grad()
    def decode_iter(self, z: Tensor) -> Iterator[Tensor]:
        """Decode one latent at a time, yielding its frames as soon as they exist.

        Args:
            z: normalised latent [B, 16, F, h, w].
        Yields:
            fp32 frames clamped to [-1, 1]: [B, 3, 1, 8h, 8w] for the first latent, then
            [B, 3, 4, 8h, 8w] for each later one. Only one latent's activations plus the cache
            (a few frames per conv) are alive at a time.
        """
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"latent must be [B, {self.cfg.z_dim}, F, h, w], got {tuple(z.shape)}")
        mean, std = self._stats(z)
        x = self.conv2((z.float() * std + mean).to(self.dtype))  # 1x1x1: cheap on the whole latent
        cache = CausalCache()
        for i in range(x.shape[2]):
            yield self.decoder(x[:, :, i : i + 1], cache).float().clamp_(-1.0, 1.0)

    def decode(self, z: Tensor) -> Tensor:
        """Decode a whole latent: [B, 16, F, h, w] -> fp32 video [B, 3, 1 + 4(F - 1), 8h, 8w] in [-1, 1]."""
        return torch.cat(list(self.decode_iter(z)), dim=2)


def build(cfg: VAEConfig, device: torch.device | str) -> WanVAE:
    """The VAE with every parameter on the meta device, for a strict ``assign=True`` load.

    The module has no buffers (the latent mean/std are constants applied on the inputs' device), so
    ``device`` has nothing to hold; it is accepted for the common ``build(cfg, device)`` contract of
    the network files.
    """
    with torch.device("meta"):
        model = WanVAE(cfg)
    if any(True for _ in model.buffers()):
        raise RuntimeError(f"VAE: unexpected buffers; build() must create them on {device}")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- config detection


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    """Infer the VAEConfig from a state dict's key -> shape map (e.g. a safetensors header).

    Reads dim from ``encoder.conv1.weight``, z_dim from ``conv2.weight``, and the stage layout from
    ``encoder.downsamples.N`` (residual blocks vs resamples, with or without ``time_conv``); then
    checks every key and shape against a meta-device model of that config.

    Raises:
        ValueError naming the missing, unexpected or mis-shaped keys.
    """
    required = ["encoder.conv1.weight", "conv2.weight", "encoder.downsamples.0.residual.2.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise ValueError(f"not a Wan 2.1 VAE state dict: missing {', '.join(missing)}")
    dim = shapes["encoder.conv1.weight"][0]
    z_dim = shapes["conv2.weight"][0]

    stages: list[list[int]] = [[]]  # output channels of each residual block, per stage
    temporal: list[bool] = []
    i = 0
    while True:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in shapes:
            stages[-1].append(shapes[p + "residual.2.weight"][0])
        elif p + "resample.1.weight" in shapes:
            temporal.append(p + "time_conv.weight" in shapes)
            stages.append([])
        else:
            break
        i += 1
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts or any(s[-1] % dim for s in stages):
        raise ValueError(f"unrecognised Wan VAE encoder layout: residual blocks per stage {[len(s) for s in stages]}")
    try:
        cfg = VAEConfig(
            dim=dim,
            z_dim=z_dim,
            dim_mult=tuple(s[-1] // dim for s in stages),
            num_res_blocks=counts.pop(),
            temperal_downsample=tuple(temporal),
        )
    except ValueError as e:
        raise ValueError(f"unsupported Wan VAE: {e}") from None

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [
        f"{k} {tuple(shapes[k])} (expected {shape})"
        for k, shape in expected.items()
        if k in shapes and tuple(shapes[k]) != shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
            problems.append(f"{what}: {', '.join(keys[:10])}{more}")
    if problems:
        raise ValueError(f"Wan 2.1 VAE state dict does not match {cfg}: " + "; ".join(problems))
    return cfg
