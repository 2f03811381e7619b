"""Frame geometry: buckets, cover-resize + crop, person masks, model range, colour matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import color

from engine import frames as fr
from engine.api import InputError

# ---------------------------------------------------------------------------------------------
# Buckets
# ---------------------------------------------------------------------------------------------


def test_bucket_tables_match_upstream() -> None:
    assert len(fr.BUCKETS_480) == 15 and len(fr.BUCKETS_720) == 21
    assert fr.BUCKETS_480[0] == (320, 1216) and fr.BUCKETS_480[-1] == (1280, 320)
    assert fr.BUCKETS_720[0] == (448, 2048) and fr.BUCKETS_720[-1] == (1920, 512)
    assert (960, 960) in fr.BUCKETS_720 and (704, 1280) in fr.BUCKETS_720 and (1280, 704) in fr.BUCKETS_720
    # Every bucket is a multiple of 16 (VAE stride 8 x patch 2) and close to the family's area.
    for buckets, area in ((fr.BUCKETS_480, 640 * 640), (fr.BUCKETS_720, 960 * 960)):
        for h, w in buckets:
            assert h % 16 == 0 and w % 16 == 0
            assert 0.85 < h * w / area < 1.15


@pytest.mark.parametrize(
    ("hw", "family", "expected"),
    [
        ((1000, 1000), "480p", (640, 640)),
        ((1080, 1920), "480p", (448, 896)),  # 16:9 landscape, ratio 0.5625 -> key 0.50
        ((1920, 1080), "480p", (832, 448)),  # 9:16 portrait, 1.78 -> key 1.86
        ((1280, 960), "480p", (704, 576)),  # 4:3 portrait, 1.333 -> key 1.22 (0.113) beats 1.50 (0.167)
        ((4000, 1000), "480p", (1280, 320)),
        ((100, 1000), "480p", (320, 1216)),  # beyond the table: the extreme bucket
        ((1080, 1920), "720p", (704, 1280)),  # 0.5625 -> key 0.55
        ((1920, 1080), "720p", (1280, 704)),  # 1.778 -> key 1.82
        ((1000, 1000), "720p", (960, 960)),
    ],
)
def test_choose_bucket(hw: tuple[int, int], family: str, expected: tuple[int, int]) -> None:
    assert fr.choose_bucket(hw[0], hw[1], family) == expected


def test_choose_bucket_compares_rounded_keys() -> None:
    # Upstream compares the source ratio with the dict keys ("2.83", "3.60"), not with the exact
    # bucket ratios (1088/384 = 2.8333, 1152/320 = 3.6). At 3.216 the two rules disagree:
    # keys: |3.60 - 3.216| = 0.384 < |2.83 - 3.216| = 0.386; exact ratios: 0.3827 < 0.384.
    assert fr.choose_bucket(3216, 1000, "480p") == (1152, 320)
    with pytest.raises(ValueError):
        fr.choose_bucket(100, 100, "1080p")


# ---------------------------------------------------------------------------------------------
# Cover resize + crop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [((90, 160), (64, 64)), ((160, 90), (48, 96)), ((33, 47), (64, 80))])
def test_resize_cover_crop_shape_and_params(src: tuple[int, int], dst: tuple[int, int]) -> None:
    img = np.random.default_rng(0).integers(0, 256, (*src, 3), dtype=np.uint8)
    out = fr.resize_cover_crop(img, dst)
    assert out.shape == (*dst, 3) and out.dtype == np.uint8
    rh, rw = fr.cover_size(src, dst)
    assert rh >= dst[0] and rw >= dst[1]
    assert rh == dst[0] or rw == dst[1]  # covers exactly along one axis
    scale, top, left = fr.crop_params(src, dst)
    assert top == round((rh - dst[0]) / 2) and left == round((rw - dst[1]) / 2)
    assert scale == max(dst[0] / src[0], dst[1] / src[1])


def test_resize_cover_crop_keeps_the_centre() -> None:
    # A wide image with a red left third, green middle, blue right third: the square crop is green.
    img = np.zeros((60, 180, 3), np.uint8)
    img[:, :60, 0] = 255
    img[:, 60:120, 1] = 255
    img[:, 120:, 2] = 255
    out = fr.resize_cover_crop(img, (32, 32))
    assert (out[..., 1] > 200).all() and (out[..., 0] < 50).all() and (out[..., 2] < 50).all()


# ---------------------------------------------------------------------------------------------
# Person masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_out", "n_in"), [(7, 23), (80, 1216), (81, 80), (40, 40), (13, 640), (100, 50)])
def test_nearest_index_matches_torch(n_out: int, n_in: int) -> None:
    x = torch.arange(n_in, dtype=torch.float32)[None, None, :, None]  # [1, 1, n_in, 1]
    ref = F.interpolate(x, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long().numpy()
    np.testing.assert_array_equal(fr._nearest_index(n_out, n_in), ref)


def _official_masks(src_hw: tuple[int, int], dst_hw: tuple[int, int], latent_hw: tuple[int, int],
                    raw_masks: list[np.ndarray]) -> np.ndarray:
    """Upstream's tensor path, written out with torch ops: nearest resize to the cover size,
    centre crop, nearest resize to the latent grid, > 0."""
    t = torch.from_numpy(np.stack(raw_masks).astype(np.float32))[None]
    rh, rw = fr.cover_size(src_hw, dst_hw)
    t = F.interpolate(t, size=(rh, rw), mode="nearest")
    top, left = round((rh - dst_hw[0]) / 2), round((rw - dst_hw[1]) / 2)
    t = t[:, :, top:top + dst_hw[0], left:left + dst_hw[1]]
    t = F.interpolate(t, size=latent_hw, mode="nearest")[0]
    out: np.ndarray = (t > 0).float().numpy()
    return out


def test_person_masks_default_halves_match_upstream() -> None:
    src, dst = (300, 500), (256, 384)
    m = fr.person_masks(*dst, src_hw=src, dst_hw=dst, latent_hw=(32, 48))
    assert m.shape == (3, 32, 48) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    # Upstream's default regions at source size (rows 5..95 %, each half inset by 5 % of a half).
    h, w = src
    p1 = np.zeros(src, bool)
    p2 = np.zeros(src, bool)
    p1[int(h * 0.05):int(h * 0.95), int(w // 2 * 0.05):int(w // 2 * 0.95)] = True
    p2[int(h * 0.05):int(h * 0.95), int(w // 2 * 0.05 + w // 2):int(w // 2 * 0.95 + w // 2)] = True
    np.testing.assert_array_equal(m, _official_masks(src, dst, (32, 48), [p1, p2, ~(p1 | p2)]))
    # person 1 on the left, person 2 on the right, background = neither
    cols1, cols2 = np.nonzero(m[0].any(0))[0], np.nonzero(m[1].any(0))[0]
    assert cols1.max() < 24 <= cols2.min()
    np.testing.assert_array_equal(m[2], 1 - np.maximum(m[0], m[1]))


def test_person_masks_one_speaker_is_all_ones() -> None:
    m = fr.person_masks(64, 64, src_hw=(100, 100), speakers=1)
    assert m.shape == (3, 8, 8) and (m == 1).all()


def test_person_masks_box_x_is_column() -> None:
    # 600 wide x 300 high; person 1 in the left third, person 2 in the right third.
    src, dst = (300, 600), (256, 512)
    boxes = [(0, 50, 200, 250), (400, 50, 600, 250)]
    m = fr.person_masks(*dst, src_hw=src, dst_hw=dst, boxes=boxes)
    assert m.shape == (3, 32, 64)
    cols1, cols2 = np.nonzero(m[0].any(0))[0], np.nonzero(m[1].any(0))[0]
    rows1 = np.nonzero(m[0].any(1))[0]
    assert cols1.max() < 64 // 3 + 1 and cols2.min() >= 2 * 64 // 3 - 1
    assert rows1.min() > 0 and rows1.max() < 31  # y from 50 to 250 of 300: neither edge
    # Same as upstream's pipeline fed with the masks drawn with x = column.
    raw = []
    for x0, y0, x1, y1 in boxes:
        r = np.zeros(src, bool)
        r[y0:y1, x0:x1] = True
        raw.append(r)
    raw.append(~(raw[0] | raw[1]))
    np.testing.assert_array_equal(m, _official_masks(src, dst, (32, 64), raw))


def test_person_masks_from_arrays_through_crop() -> None:
    # Source 200 high x 400 wide cropped to a square: the outer quarters fall away.
    src, dst = (200, 400), (128, 128)
    # Cover size 128x256, crop columns 64..192 of it = source columns 100..300.
    a = np.zeros(src, bool)
    b = np.zeros(src, bool)
    a[:, 100:200] = True  # the left half of what is kept
    b[:100, 200:300] = True  # the top right quarter
    m = fr.person_masks(*dst, src_hw=src, dst_hw=dst, masks=[a, b])
    assert m[0, :, :8].all() and not m[0, :, 8:].any()
    assert m[1, :8, 8:].all() and not m[1, 8:].any() and not m[1, :, :8].any()
    assert m[2, 8:, 8:].all() and m[2].sum() == 64
    with pytest.raises(InputError, match="mask is 10x10"):
        fr.person_masks(*dst, src_hw=src, masks=[np.ones((10, 10), bool), b])


def test_person_masks_empty_regions_raise() -> None:
    src, dst = (200, 400), (128, 128)
    # a box entirely in the part cropped away
    with pytest.raises(InputError, match="speaker 1's region"):
        fr.person_masks(*dst, src_hw=src, boxes=[(0, 0, 90, 200), (200, 0, 300, 200)])
    # a box smaller than one token (16 output pixels)
    with pytest.raises(InputError, match="speaker 2's region"):
        fr.person_masks(*dst, src_hw=src, boxes=[(100, 0, 200, 200), (201, 1, 203, 3)])
    # masks covering the whole kept frame leave no background
    a = np.zeros(src, bool)
    a[:, :200] = True
    with pytest.raises(InputError, match="background"):
        fr.person_masks(*dst, src_hw=src, masks=[a, ~a])


# ---------------------------------------------------------------------------------------------
# Model range
# ---------------------------------------------------------------------------------------------


def test_to_model_from_model_round_trip() -> None:
    x = np.random.default_rng(1).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    x[0, 0, 0] = (0, 128, 255)
    t = fr.to_model(x)
    assert t.shape == (3, 3, 8, 10) and t.dtype == torch.float32
    assert float(t.min()) >= -1 and float(t.max()) <= 1
    assert float(t[0, 0, 0, 0]) == -1.0 and float(t[2, 0, 0, 0]) == 1.0
    np.testing.assert_array_equal(fr.from_model(t), x)
    np.testing.assert_array_equal(fr.from_model(t.to(torch.bfloat16)), fr.from_model(t.to(torch.bfloat16).float()))
    # out-of-range values clamp; values round to nearest
    v = torch.tensor([-1.5, 1.5, 2 * 100.4 / 255 - 1, 2 * 100.6 / 255 - 1]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    assert fr.from_model(v)[:, 0, 0, 0].tolist() == [0, 255, 100, 101]


# ---------------------------------------------------------------------------------------------
# Colour matching
# ---------------------------------------------------------------------------------------------


def _scene(seed: int, tint: tuple[float, float, float]) -> np.ndarray:
    """Noise with a colour cast, mid-range so that matching stays inside the sRGB gamut."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 0.7, (24, 32, 3)) * np.asarray(tint)
    out: np.ndarray = np.clip(base * 255, 0, 255).astype(np.uint8)
    return out


def test_match_colors_strength_zero_is_identity() -> None:
    f = np.stack([_scene(0, (1, 1, 1)), _scene(1, (1, 0.5, 0.5))])
    out = fr.match_colors(f, _scene(2, (0.3, 0.3, 1)), 0.0)
    assert out is f
    t = torch.rand(3, 2, 8, 8) * 2 - 1
    assert fr.match_colors_model(t, t[:, 0], 0.0) is t


def test_match_colors_full_strength_matches_reference_lab_mean() -> None:
    ref = _scene(5, (0.9, 0.95, 1.0))
    frames = np.stack([_scene(6, (1.0, 0.85, 0.75)), _scene(7, (0.8, 1.0, 0.8))])
    out = fr.match_colors(frames, ref, 1.0)
    assert out.shape == frames.shape and out.dtype == np.uint8
    ref_mean = color.rgb2lab(ref / 255.0).reshape(-1, 3).mean(0)
    for before, after in zip(frames, out, strict=True):
        d_before = np.abs(color.rgb2lab(before / 255.0).reshape(-1, 3).mean(0) - ref_mean)
        d_after = np.abs(color.rgb2lab(after / 255.0).reshape(-1, 3).mean(0) - ref_mean)
        assert d_before.max() > 5  # the test scenes really differ
        assert d_after.max() < 0.5
    # half strength lands in between, in RGB
    half = fr.match_colors(frames, ref, 0.5).astype(float)
    np.testing.assert_allclose(half, (frames.astype(float) + out.astype(float)) / 2, atol=1.01)


def test_match_colors_float_model_range_and_tensor_wrapper() -> None:
    ref = _scene(5, (0.6, 0.8, 1.0))
    frames = np.stack([_scene(6, (1.0, 0.6, 0.4))])
    u8 = fr.match_colors(frames, ref, 1.0)
    fl = fr.match_colors(frames / 127.5 - 1.0, ref / 127.5 - 1.0, 1.0)
    assert fl.dtype == np.float32 and fl.min() >= -1 and fl.max() <= 1
    np.testing.assert_allclose((fl + 1) * 127.5, u8, atol=0.51)
    video = fr.to_model(frames)  # [3, 1, H, W]
    ref_t = fr.to_model(ref[None])[:, 0]
    out_t = fr.match_colors_model(video, ref_t, 1.0)
    assert out_t.shape == video.shape and out_t.dtype == video.dtype
    np.testing.assert_array_equal(fr.from_model(out_t), u8)


def test_match_colors_flat_channel_takes_reference_mean() -> None:
    grey = np.full((1, 8, 8, 3), 128, np.uint8)  # every Lab channel is flat (std 0, or 1e-14 after rounding)
    ref = _scene(3, (1.0, 0.7, 0.7))
    out = fr.match_colors(grey, ref, 1.0)
    ref_lab = color.rgb2lab(ref / 255.0).reshape(-1, 3).mean(0)
    out_lab = color.rgb2lab(out[0] / 255.0).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(out_lab, ref_lab, atol=1.0)
    assert (out == out[0, 0, 0]).all()  # still flat


def test_match_colors_agrees_with_the_official_skimage_formulation() -> None:
    """Upstream's match_and_blend_colors, written here with skimage (test-only dependency), as the reference."""
    from skimage import color

    rng = np.random.default_rng(3)
    ref = (rng.random((24, 24, 3)) * 0.6 + 0.2)
    frames = np.clip(rng.random((3, 24, 24, 3)) * 0.5 + np.array([0.4, 0.2, 0.1]), 0, 1)
    ref_lab = color.rgb2lab(ref).reshape(-1, 3)
    expected = []
    for f in frames:
        lab = color.rgb2lab(f)
        flat = lab.reshape(-1, 3)
        lab = (lab - flat.mean(0)) * (ref_lab.std(0) / flat.std(0)) + ref_lab.mean(0)
        corrected = np.clip(color.lab2rgb(lab), 0, 1)
        expected.append(0.3 * f + 0.7 * corrected)
    got = fr.match_colors((frames * 2 - 1).astype(np.float32), (ref * 2 - 1).astype(np.float32), 0.7)
    assert np.abs((got + 1) / 2 - np.stack(expected)).max() < 2e-3


def test_match_colors_piecewise_equals_whole_video() -> None:
    """The render colour-matches each latent's frames as the VAE yields them (1, then 4 at a time) and streams
    them to the writer; that must give the frames matching the whole chunk at once gives (per-frame statistics)."""
    g = torch.Generator().manual_seed(3)
    video = torch.rand(3, 13, 24, 32, generator=g) * 1.6 - 0.8
    ref = torch.rand(3, 24, 32, generator=g) * 2 - 1
    whole = fr.match_colors_model(video, ref, 0.7)
    pieces = [fr.match_colors_model(video[:, a:b], ref, 0.7) for a, b in ((0, 1), (1, 5), (5, 9), (9, 13))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-6)
    assert np.array_equal(np.concatenate([fr.from_model(p) for p in pieces]), fr.from_model(whole))
