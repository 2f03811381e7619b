"""Frame geometry and pixel conversions: resolution buckets, cover-resize + centre crop, the
two-speaker person masks, model-range conversion and Lab colour matching.

Pure functions on numpy arrays (and torch tensors where the model is involved). The geometry
reproduces the official InfiniteTalk pipeline (``wan/multitalk.py``: ``resize_and_centercrop``,
the bucket choice and the ``ref_target_masks`` construction; ``wan/utils/multitalk_utils.py``:
``ASPECT_RATIO_627`` / ``ASPECT_RATIO_960`` and ``match_and_blend_colors``), re-written here.

Deliberate deviations from upstream (each one says why where it is implemented):

- Boxes are ``(x0, y0, x1, y1)`` with x = column. Upstream indexes rows with the first
  coordinate (``mask[x_min:x_max, y_min:y_max]``), so its boxes are really ``(y0, x0, y1, x1)``.
- Empty person or background regions are refused (upstream divides by a zero mask area, which
  makes a NaN row win the routing argmax and silently sends every token to the background).
- :func:`from_model` rounds to the nearest 8-bit value; upstream truncates (``astype(uint8)``),
  which darkens every pixel by half a level on average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from engine.api import InputError
from engine.recipes import BUCKET_TABLES

__all__ = [
    "BUCKETS_480",
    "BUCKETS_720",
    "choose_bucket",
    "cover_size",
    "crop_params",
    "CropParams",
    "resize_cover_crop",
    "person_masks",
    "to_model",
    "from_model",
    "match_colors",
    "match_colors_model",
]

# --------------------------------------------------------------------------------------------
# Resolution buckets
# --------------------------------------------------------------------------------------------

# The tables (ratio key, (h, w)) live in engine/recipes.py (BUCKET_TABLES, torch-free, so the daemon's config can
# check engine.warm_buckets); the choice rule is here.
_TABLES = BUCKET_TABLES
_TABLE_480, _TABLE_720 = BUCKET_TABLES["480p"], BUCKET_TABLES["720p"]

BUCKETS_480: list[tuple[int, int]] = [hw for _, hw in _TABLE_480]  # (h, w), ~640^2 pixels
BUCKETS_720: list[tuple[int, int]] = [hw for _, hw in _TABLE_720]  # (h, w), ~960^2 pixels


def choose_bucket(height: int, width: int, family: str) -> tuple[int, int]:
    """The ``(h, w)`` bucket of ``family`` ("480p" or "720p") for a ``height`` x ``width`` source.

    Official rule: the bucket whose ratio key is closest to ``height / width``; on a tie the
    first in table order wins (upstream takes element 0 of a stable sort).
    """
    if family not in _TABLES:
        raise ValueError(f"unknown bucket family {family!r}; expected one of {sorted(_TABLES)}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = height / width
    _, hw = min(_TABLES[family], key=lambda item: abs(item[0] - ratio))  # min() keeps the first tie
    return hw


# --------------------------------------------------------------------------------------------
# Cover resize + centre crop
# --------------------------------------------------------------------------------------------


# Above this many times the output's pixels, the cover-resize intermediate is skipped (see
# resize_cover_crop). Portraits of ordinary shape stay below it and keep upstream's exact path.
_MAX_COVER_FACTOR = 4


class CropParams(NamedTuple):
    """``scale``: source -> resized factor (the larger of the two axis ratios); ``top``/``left``:
    offset of the crop window inside the resized image, in resized pixels."""

    scale: float
    top: int
    left: int


def cover_size(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[int, int]:
    """Size ``(h, w)`` the source is resized to before the centre crop: the smallest size with
    the source's aspect that covers ``dst_hw``. Upstream: ``ceil(max(th/h, tw/w) * h)`` etc., in
    Python floats (kept exactly, so rounding agrees with upstream)."""
    (h, w), (th, tw) = src_hw, dst_hw
    scale = max(th / h, tw / w)
    return math.ceil(scale * h), math.ceil(scale * w)


def crop_params(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> CropParams:
    """Geometry of :func:`resize_cover_crop`, for mapping boxes or masks through it.

    A source pixel ``(y, x)`` lands near ``(y * scale - top, x * scale - left)`` in the output.
    The crop offsets follow torchvision's ``center_crop``: ``int(round((size - crop) / 2))``
    (Python's round-half-to-even), as upstream uses it.
    """
    (h, w), (th, tw) = src_hw, dst_hw
    rh, rw = cover_size(src_hw, dst_hw)
    return CropParams(max(th / h, tw / w), int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0)))


def resize_cover_crop(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize ``img`` (HxWx3 uint8) to cover ``size_hw`` with PIL bilinear, then centre-crop.

    Same as upstream's ``resize_and_centercrop`` on a PIL image (Pillow's bilinear filter widens
    its support when shrinking, i.e. it antialiases).
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {img.shape} {img.dtype}")
    th, tw = size_hw
    rh, rw = cover_size(img.shape[:2], size_hw)
    scale, top, left = crop_params(img.shape[:2], size_hw)
    if rh * rw > _MAX_COVER_FACTOR * th * tw:
        # An image of extreme shape (a 4000x1 strip) would be resized to a huge intermediate only
        # to crop almost all of it: resize just the source window the crop keeps (Pillow's box),
        # so memory stays bounded by the output whatever the input's shape.
        box = (left / scale, top / scale, (left + tw) / scale, (top + th) / scale)
        out = Image.fromarray(img).resize((tw, th), resample=Image.Resampling.BILINEAR, box=box)
        return np.ascontiguousarray(np.asarray(out))
    resized = Image.fromarray(img).resize((rw, rh), resample=Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(resized)[top:top + th, left:left + tw])


# --------------------------------------------------------------------------------------------
# Person masks (two-speaker routing)
# --------------------------------------------------------------------------------------------


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output index for torch's ``F.interpolate(mode='nearest')``.

    torch computes ``scale = (float)in / out`` in float32 and ``floorf(i * scale)``; doing the
    same in float32 here reproduces its choice of rows/columns exactly (a test checks it).
    """
    if out_size == in_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    out: np.ndarray = np.minimum(idx, in_size - 1)
    return out


def _default_halves(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's regions when no boxes or masks are given: left and right halves inset by 5 %
    (``face_scale`` 0.05), with its integer truncations."""
    face_scale = 0.05
    r0, r1 = int(h * face_scale), int(h * (1 - face_scale))
    half = w // 2
    left = (int(half * face_scale), int(half * (1 - face_scale)))
    right = (int(half * face_scale + half), int(half * (1 - face_scale) + half))
    p1 = np.zeros((h, w), dtype=bool)
    p2 = np.zeros((h, w), dtype=bool)
    p1[r0:r1, left[0]:left[1]] = True
    p2[r0:r1, right[0]:right[1]] = True
    return p1, p2


def _source_regions(src_hw: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]] | None,
                    masks: Sequence[np.ndarray] | None) -> tuple[list[np.ndarray], str]:
    """The two speakers' regions as bool arrays at the source size, and what they came from (for messages)."""
    sh, sw = src_hw
    if masks:
        if len(masks) != 2:
            raise InputError(f"two speakers need two masks, got {len(masks)}")
        regions = []
        for k, m in enumerate(masks):
            if m.shape != (sh, sw):
                raise InputError(f"speaker {k + 1}'s mask is {m.shape[1]}x{m.shape[0]} pixels but the image is "
                                 f"{sw}x{sh}; draw the mask on the same image size")
            regions.append(np.asarray(m) > 0)
        return regions, "mask"
    if boxes:
        if len(boxes) != 2:
            raise InputError(f"two speakers need two boxes, got {len(boxes)}")
        regions = []
        for x0, y0, x1, y1 in boxes:
            r = np.zeros((sh, sw), dtype=bool)
            r[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True  # rows = y, columns = x
            regions.append(r)
        return regions, "box"
    return list(_default_halves(sh, sw)), "default region"


def person_masks(
    h: int,
    w: int,
    *,
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int] | None = None,
    latent_hw: tuple[int, int] | None = None,
    boxes: Sequence[tuple[int, int, int, int]] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    speakers: int = 2,
) -> np.ndarray:
    """Class masks ``[3, lh, lw]`` float32 in {0, 1}: person 1, person 2, background.

    Args:
        h, w: output frame size (the bucket) the image is cover-resized and centre-cropped to.
        src_hw: size of the source image the regions are given in.
        dst_hw: the same output size as ``(h, w)`` (optional; must agree when given).
        latent_hw: latent grid (default ``dst // 8``, the VAE stride). Upstream resizes the
            masks to ``y.shape[-2:]``, the latent grid; the DiT later nearest-resizes them to
            its token grid (``lh // 2, lw // 2``).
        boxes: one ``(x0, y0, x1, y1)`` per speaker in source pixels, **x = column**, half-open.
            Upstream writes ``mask[x_min:x_max, y_min:y_max] = 1`` and so treats the first
            coordinate as a row; we do not copy that swap (a box from any drawing tool means
            x = column). Parts outside the image are ignored.
        masks: one HxW bool array per speaker at ``src_hw`` (True = that speaker).
        speakers: 1 or 2. With one speaker upstream passes three all-ones masks that the model
            never uses; so do we (regions are ignored).

    No regions -> upstream's default: left and right halves with 5 % margins. The masks go
    through the image's geometry with nearest sampling (upstream: nearest resize to the cover
    size, centre crop, nearest resize to the latent grid, ``> 0``), composed here as index
    look-ups so no full-size intermediate is built. Background = not any person.

    Raises InputError when a person or the background is empty on the DiT's token grid: an
    empty class makes the routing divide by a zero area (docs/model.md §14a).
    """
    if dst_hw is not None and tuple(dst_hw) != (h, w):
        raise ValueError(f"dst_hw {dst_hw} disagrees with the output size {(h, w)}")
    th, tw = dst_hw = (h, w)
    lh, lw = latent_hw if latent_hw is not None else (th // 8, tw // 8)
    if speakers == 1:
        return np.ones((3, lh, lw), dtype=np.float32)
    if speakers != 2:
        raise ValueError(f"speakers must be 1 or 2, got {speakers}")
    if boxes and masks:
        raise InputError("give either boxes or masks for the two speakers, not both")
    sh, sw = src_hw
    (p1, p2), what = _source_regions(src_hw, boxes, masks)
    classes = np.stack([p1, p2, ~(p1 | p2)])  # [3, h, w] bool

    # Compose the three nearest-neighbour steps into one row and one column look-up:
    # latent index -> crop index (+ offset) -> resized index -> source index.
    rh, rw = cover_size(src_hw, dst_hw)
    _, top, left = crop_params(src_hw, dst_hw)
    rows = _nearest_index(rh, sh)[top + _nearest_index(lh, th)]
    cols = _nearest_index(rw, sw)[left + _nearest_index(lw, tw)]
    out = classes[:, rows][:, :, cols]  # [3, lh, lw]

    # The DiT samples the masks again at its token grid (patch 2x2); check emptiness there.
    tokens = out[:, _nearest_index(lh // 2, lh)][:, :, _nearest_index(lw // 2, lw)]
    for k in range(2):
        if not tokens[k].any():
            region = f"box {list(boxes[k])}" if boxes else what
            raise InputError(
                f"speaker {k + 1}'s region ({region}) is empty after the image is resized and cropped to "
                f"{tw}x{th}: it lies outside the kept centre or is smaller than 16 output pixels; "
                "make it larger or move it towards the centre")
    if not tokens[2].any():
        plural = {"mask": "masks", "box": "boxes"}.get(what, "default regions")
        raise InputError(f"the two speakers' {plural} cover the whole {tw}x{th} frame; leave some background "
                         "outside both regions")
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Model range
# --------------------------------------------------------------------------------------------


def to_model(frames_uint8: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[3, N, H, W]`` float32 in [-1, 1] (upstream: ``(x/255 - 0.5) * 2``)."""
    if frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3 or frames_uint8.dtype != np.uint8:
        raise ValueError(f"expected [N, H, W, 3] uint8 frames, got {frames_uint8.shape} {frames_uint8.dtype}")
    x = torch.from_numpy(np.array(frames_uint8)).permute(3, 0, 1, 2).float()  # copy: inputs may be read-only
    return ((x / 255 - 0.5) * 2).contiguous()


def from_model(video: torch.Tensor) -> np.ndarray:
    """``[3, N, H, W]`` in [-1, 1] (any float dtype/device) -> ``[N, H, W, 3]`` uint8, rounded and
    clamped (upstream truncates; rounding removes its half-level darkening)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, N, H, W] video, got {tuple(video.shape)}")
    # Quantise and transpose where the video is (the GPU in a render), then move the 4x smaller uint8 frames:
    # the same IEEE float32 ops on either device, so the result does not depend on where this runs.
    x = ((video.detach().float() + 1) / 2 * 255).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Colour matching (docs/model.md §9.3)
# --------------------------------------------------------------------------------------------


def match_colors_model(video: torch.Tensor, reference: torch.Tensor, strength: float,
                       frames_per_batch: int = 16) -> torch.Tensor:
    """Match each frame's Lab mean/std to ``reference`` and blend by ``strength`` (0..1), on the tensor's device.

    ``video`` ``[3, N, H, W]`` and ``reference`` ``[3, H', W']`` (or ``[3, 1, H', W']``) in [-1, 1]; returns
    ``video``'s dtype and device. The official ``match_and_blend_colors`` (wan/utils/multitalk_utils.py) does
    this per frame with skimage on the CPU; the order of operations is the same: clip to [0, 1]; reference ->
    Lab once; per frame: Lab, per channel ``(x - mean) * std_ref / std + mean_ref`` (population std; a flat
    channel, std < 1e-6, takes ``mean_ref`` — upstream tests == 0, which divides by float noise), back to
    RGB clipped to [0, 1], blend ``(1 - s) * frame + s * corrected``. Kornia's sRGB/Lab conversion (D65) agrees
    with skimage's to ~1e-13 in float64; here it runs in float32 on the render device.
    ``strength == 0`` returns ``video`` itself.
    """
    from kornia.color import lab_to_rgb, rgb_to_lab

    if strength == 0.0:
        return video
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour-correction strength must be in [0, 1], got {strength}")
    if reference.ndim == 4:
        reference = reference[:, 0]
    if video.ndim != 4 or video.shape[0] != 3 or reference.ndim != 3 or reference.shape[0] != 3:
        raise ValueError(f"expected a [3, N, H, W] video and a [3, H, W] reference, got {tuple(video.shape)} "
                         f"and {tuple(reference.shape)}")
    ref = rgb_to_lab(((reference.float() + 1) / 2).clamp(0, 1)[None])  # [1, 3, H', W']
    ref_mean = ref.mean(dim=(2, 3), keepdim=True)
    ref_std = ref.std(dim=(2, 3), keepdim=True, unbiased=False)
    out = torch.empty_like(video)
    for i in range(0, video.shape[1], frames_per_batch):
        x = ((video[:, i:i + frames_per_batch].float() + 1) / 2).clamp(0, 1).transpose(0, 1)  # [n, 3, H, W]
        lab = rgb_to_lab(x)
        mean = lab.mean(dim=(2, 3), keepdim=True)
        std = lab.std(dim=(2, 3), keepdim=True, unbiased=False)
        matched = torch.where(std < 1e-6, ref_mean, (lab - mean) * (ref_std / std.clamp_min(1e-6)) + ref_mean)
        corrected = lab_to_rgb(matched, clip=True)
        blended = (1 - strength) * x + strength * corrected
        out[:, i:i + frames_per_batch] = (blended * 2 - 1).transpose(0, 1).to(video.dtype)
    return out


def match_colors(frames: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """:func:`match_colors_model` for arrays: ``[N, H, W, 3]`` frames and an ``[H', W', 3]`` reference, either
    both uint8 (the result is rounded back to uint8) or both float in [-1, 1] (the result is float32)."""
    if strength == 0.0:
        return frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or reference.ndim != 3 or reference.shape[-1] != 3:
        raise ValueError(f"expected [N, H, W, 3] frames and an [H, W, 3] reference, got {frames.shape} "
                         f"and {reference.shape}")
    u8 = frames.dtype == np.uint8
    f = torch.from_numpy(np.array(frames, dtype=np.float32))
    r = torch.from_numpy(np.array(reference, dtype=np.float32))
    if u8:
        f, r = f / 127.5 - 1, r / 127.5 - 1
    out = match_colors_model(f.permute(3, 0, 1, 2), r.permute(2, 0, 1), strength).permute(1, 2, 3, 0)
    if u8:
        return ((out + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return out.numpy().astype(np.float32)
