"""Reading user media and writing the output video.

Everything that reaches this module comes from a hostile inbox (docs/daemon.md §7):

- Images are opened with Pillow restricted to PNG, JPEG and WebP, under a pixel cap, verified
  and reopened; animated images are refused.
- Audio and video containers are identified from their first bytes and opened with an explicit
  FFmpeg demuxer from an allow-list (never FFmpeg's content probing, which turns a text file
  named ``job.wav`` into an ``ffconcat`` playlist that reads other files), with file-only I/O.
- Audio length is counted while decoding, so a tiny file that decodes to hours of silence is
  stopped at the cap.

Every bad input raises :class:`engine.api.InputError` naming the file, the problem and what to
do. The output is H.264 (libx264, yuv420p, BT.709 tags) + AAC in an mp4 with the index at the
front (``+faststart``), written frame by frame.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.api import MAX_IMAGE_PIXELS, InputError
from engine.sniff import sniff
from engine.writer import FPS, WRITER_THREAD_NAME, VideoWriter, fit_full_scale

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "MAX_VIDEO_PIXELS",
    "AUDIO_CONTAINERS",
    "VIDEO_CONTAINERS",
    "load_image",
    "load_mask",
    "load_audio",
    "loudness_normalize",
    "is_silent",
    "mix_tracks",
    "VideoReader",
    "VideoWriter",
    "WRITER_THREAD_NAME",
    "probe",
]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# MAX_IMAGE_PIXELS (engine.api, shared with ingest's jobs.max_image_pixels bound): above any phone or DSLR
# still we expect, below Pillow's own 89 MP warning; decoding a 40 MP RGB image takes 120 MB.
MAX_VIDEO_PIXELS = 4096 * 4096  # per frame; 4K UHD (8.3 MP) fits

# Sniffed container -> the FFmpeg demuxer forced in av.open (FFmpeg matches a name against each
# demuxer's comma-separated list, so "mp4" selects "mov,mp4,m4a,3gp,3g2,mj2").
AUDIO_CONTAINERS = {"wav": "wav", "flac": "flac", "mp3": "mp3", "m4a": "mp4", "aac": "aac", "ogg": "ogg",
                    "opus": "ogg"}
VIDEO_CONTAINERS = {"mp4": "mp4", "mov": "mp4", "mkv": "matroska", "webm": "matroska"}
# Only local files, even if a demuxer wants to open a reference (mov's external data refs are
# off by default too).
_AV_OPTIONS = {"protocol_whitelist": "file"}

_AUDIO_HELP = "WAV, FLAC, MP3, M4A/AAC or Ogg (Vorbis/Opus)"


def _name(path: Path) -> str:
    return Path(path).name


def _check_file(path: Path, what: str) -> int:
    """Regular, non-empty file; returns its size."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} '{p.name}' does not exist or is not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"{what} '{p.name}' is empty (0 bytes); copy the file again")
    return size


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _open_image(path: Path, what: str) -> Image.Image:
    """Open, check and decode an image; EXIF orientation applied. Returns a loaded PIL image."""
    _check_file(path, what)
    name = _name(path)
    try:
        # Pillow warns above its own MAX_IMAGE_PIXELS and raises above twice that; make the
        # warning an error too. (catch_warnings is process-global; the worst a concurrent thread
        # sees is this filter for the duration of one header read.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise InputError(f"{what} '{name}' is {w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is "
                                     f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP. Scale it down (2000 pixels on the long side "
                                     "is plenty)")
                if getattr(im, "is_animated", False) or getattr(im, "n_frames", 1) > 1:
                    raise InputError(f"{what} '{name}' is animated; export a single still frame as PNG or JPEG")
                im.verify()  # structure / checksum pass; the object is unusable afterwards
            im = Image.open(path, formats=IMAGE_FORMATS)
            try:
                im.load()
                out = ImageOps.exif_transpose(im)
            finally:
                im.close()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{what} '{name}' is not a PNG, JPEG or WebP image; convert it to PNG or JPEG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{what} '{name}' claims too many pixels (a decompression bomb or a huge image); "
                         f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise InputError(f"{what} '{name}' is damaged or truncated ({e}); export it again") from None
    return out


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _to_8bit_grey(im: Image.Image) -> np.ndarray | None:
    """16/32-bit greyscale modes -> HxW uint8 (Pillow's convert would clip them); else None."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)
    return None


def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB image, transparency composited over ``background``."""
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path) -> np.ndarray:
    """Load a portrait as HxWx3 uint8 RGB.

    PNG, JPEG or WebP only; at most :data:`MAX_IMAGE_PIXELS`; not animated; EXIF orientation
    applied (a phone photo comes out upright). Transparency is flattened over **white** (a cut-out
    portrait on a white card is what the model handles best; black would read as a dark scene).
    16-bit greyscale is scaled to 8 bits.
    """
    im = _open_image(path, "image")
    grey = _to_8bit_grey(im)
    if grey is not None:
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(np.asarray(_flatten(im, (255, 255, 255))))


def load_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Load a speaker mask as an HxW bool array: True where the pixel is light.

    Same checks and EXIF handling as :func:`load_image`. The mask is taken to greyscale
    (transparent pixels count as **black**, i.e. not the speaker) and thresholded at mid-grey
    (> 127), which tolerates JPEG noise around pure black and white. ``size`` = ``(height, width)``
    of the image the mask belongs to; a different size is an error (masks are not rescaled: a
    mismatch is usually the wrong file). An all-black mask is an error.
    """
    im = _open_image(path, "mask")
    grey = _to_8bit_grey(im)
    if grey is None:
        grey = np.asarray(_flatten(im, (0, 0, 0)).convert("L"))
    mask = grey > 127
    name = _name(path)
    if size is not None and mask.shape != tuple(size):
        raise InputError(f"mask '{name}' is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
                         f"{size[1]}x{size[0]}; draw the mask on an image of the same size")
    if not mask.any():
        raise InputError(f"mask '{name}' is all black; paint the speaker white")
    return mask


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


# The container, from the one shared sniffer (engine/sniff.py), as a key of AUDIO_CONTAINERS.
_AUDIO_KINDS = {"wav": "wav", "flac": "flac", "ogg": "ogg", "isobmff": "m4a", "aac": "aac", "mp3": "mp3"}


def _sniff_audio(path: Path) -> str | None:
    """The container of an audio file from its first bytes (a key of AUDIO_CONTAINERS), or None."""
    return _AUDIO_KINDS.get(sniff(path) or "")


def load_audio(path: Path, *, max_seconds: float, sample_rate: int = 16000) -> np.ndarray:
    """Decode speech to float32 mono at ``sample_rate``.

    The container must be one of :data:`AUDIO_CONTAINERS`, judged by its first bytes, and is
    opened with that demuxer explicitly. Channels are averaged (as librosa's ``to_mono`` in
    upstream's loader; FFmpeg's own downmix would scale stereo by 1/sqrt(2) instead), then
    FFmpeg's resampler converts the rate. Decoding stops with an InputError as soon as more
    than ``max_seconds`` have been decoded. Speech shorter than one video frame (40 ms) is an
    error; anything longer is the caller's to pad.
    """
    _check_file(path, "speech file")
    name = _name(path)
    kind = _sniff_audio(path)
    if kind is None:
        raise InputError(f"speech file '{name}' is not a {_AUDIO_HELP} file (its first bytes do not match any of "
                         "them); export the speech again in one of these formats")
    limit = int(math.floor(max_seconds * sample_rate))
    chunks: list[np.ndarray] = []
    total = 0

    def take(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for fr in frames:
            x = fr.to_ndarray()  # fltp: [channels, samples]
            chunks.append(x.mean(axis=0, dtype=np.float32) if x.shape[0] > 1 else x[0])
            total += x.shape[1]
            if total > limit:
                raise InputError(f"speech file '{name}' is longer than the limit of {max_seconds:g} s; cut it or "
                                 "raise max_duration_s")

    try:
        with av.open(str(path), format=AUDIO_CONTAINERS[kind], options=_AV_OPTIONS) as container:
            if not container.streams.audio:
                raise InputError(f"speech file '{name}' has no audio stream")
            stream = container.streams.audio[0]
            resampler: av.AudioResampler | None = None
            for frame in container.decode(stream):
                if resampler is None:  # layout kept (averaged above); only format and rate change
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=sample_rate)
                take(resampler.resample(frame))
            if resampler is not None:
                take(resampler.resample(None))
    except InputError:
        raise
    except (av.FFmpegError, ValueError, OSError) as e:
        raise InputError(f"speech file '{name}' could not be decoded as {kind.upper()} ({e}); export it again "
                         f"as {_AUDIO_HELP}") from None
    wave = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if wave.size < sample_rate / FPS:
        raise InputError(f"speech file '{name}' lasts {wave.size / sample_rate * 1000:.0f} ms: the speech is shorter "
                         "than one video frame (40 ms)")
    if not np.isfinite(wave).all():
        raise InputError(f"speech file '{name}' decodes to invalid (NaN or infinite) samples; export it again")
    return wave


def loudness_normalize(wave: np.ndarray, sample_rate: int = 16000, target_lufs: float = -23.0) -> np.ndarray:
    """Scale speech to ``target_lufs`` integrated loudness (ITU-R BS.1770 via pyloudnorm).

    As upstream's ``loudness_norm``: silence (loudness -inf, or any value beyond +-100 LU) is
    returned unchanged; so is audio shorter than one 400 ms measuring block (upstream would
    raise). The result is float32 (pyloudnorm returns float64 with numpy 2).

    Clipping: upstream does not clip, and neither do we: the samples feed wav2vec2 as floats,
    where a peak above 1.0 is harmless, and clipping would change the features. Full-scale
    safety is handled where audio is written (:func:`mix_tracks`, :class:`VideoWriter` scale
    the whole track down instead of clipping). Non-finite input is returned unchanged.
    """
    import pyloudnorm  # imported here: only the audio path needs it

    x = np.asarray(wave, dtype=np.float64)
    if x.size < int(0.4 * sample_rate) or not np.isfinite(x).all():
        return np.asarray(wave, dtype=np.float32)
    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(x)
    if not np.isfinite(loudness) or abs(loudness) > 100:
        return np.asarray(wave, dtype=np.float32)
    gain = 10.0 ** ((target_lufs - float(loudness)) / 20.0)  # what pyloudnorm.normalize.loudness applies
    out: np.ndarray = (x * gain).astype(np.float32)
    return out


def is_silent(wave: np.ndarray, threshold_dbfs: float = -60.0) -> bool:
    """True when the RMS level of ``wave`` is below ``threshold_dbfs`` (or it is empty)."""
    x = np.asarray(wave, dtype=np.float64)
    if x.size == 0:
        return True
    rms = math.sqrt(float(np.mean(x * x)))
    return rms == 0.0 or 20.0 * math.log10(rms) < threshold_dbfs


def mix_tracks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum two speakers' tracks for the output's sound: the shorter one is padded with silence;
    if the sum exceeds full scale it is scaled down as a whole (upstream writes the plain sum to
    16-bit PCM, which clips)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    n = max(a.size, b.size)
    out = np.zeros(n, dtype=np.float32)
    out[:a.size] += a
    out[:b.size] += b
    return fit_full_scale(out).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Video in
# --------------------------------------------------------------------------------------------


def _sniff_video(path: Path) -> str | None:
    """``mp4`` (ISO BMFF / QuickTime: mp4, mov, m4v) or ``mkv`` (EBML: Matroska and WebM), or None."""
    return {"isobmff": "mp4", "matroska": "mkv"}.get(sniff(path) or "")


def _open_video(path: Path, what: str) -> tuple[Any, Any]:
    """(container, first video stream) for an allow-listed container; raises InputError."""
    _check_file(path, what)
    name = _name(path)
    kind = _sniff_video(path)
    if kind is None:
        raise InputError(f"{what} '{name}' is not an MP4, MOV, MKV or WebM file (judged by its first bytes); "
                         "convert it to MP4")
    try:
        container = av.open(str(path), format=VIDEO_CONTAINERS[kind], options=_AV_OPTIONS)
    except (av.FFmpegError, ValueError, OSError) as e:
        raise InputError(f"{what} '{name}' could not be opened ({e}); convert it to MP4") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{what} '{name}' has no video stream")
    return container, container.streams.video[0]


class VideoReader:
    """Frames of a source video resampled to ``fps`` by timestamp, read sequentially.

    Output frame ``i`` (time ``i / fps`` after the first frame) is the source frame whose
    timestamp is nearest (ties: the earlier one); the output has as many frames as fit in the
    source's span (first timestamp to end of the last frame), capped at ``max_frames``. Frames
    come out upright (the container's display rotation is applied) as HxWx3 uint8 RGB.

    Only the most recent frame is kept: asking for increasing indices decodes forward; asking
    for an earlier frame seeks back to a keyframe and decodes forward again. A first pass reads
    packet timestamps only (no decoding) to know the frame times.
    """

    def __init__(self, path: Path, *, fps: int = FPS, max_frames: int | None = None) -> None:
        self.path = Path(path)
        self.fps = fps
        name = _name(path)
        container, stream = _open_video(self.path, "video")
        try:
            pts: list[int] = []
            last_duration = 0
            # With a frame cap, stop scanning a little past the last needed time (packets come in
            # decode order, so allow 2 s of reordering slack).
            stop_after = None if max_frames is None else (max_frames / fps + 2.0) / float(stream.time_base or 1)
            for packet in container.demux(stream):
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None or packet.size == 0:
                    continue
                pts.append(t)
                last_duration = packet.duration or 0
                if stop_after is not None and t - pts[0] > stop_after:
                    break
            src_w, src_h = stream.codec_context.width, stream.codec_context.height
            time_base = stream.time_base
        except (av.FFmpegError, ValueError, OSError) as e:
            container.close()
            raise InputError(f"video '{name}' could not be read ({e}); convert it to MP4") from None
        container.close()
        if not pts or time_base is None:
            raise InputError(f"video '{name}' has no frames with timestamps; convert it to MP4")
        if src_w <= 0 or src_h <= 0 or src_w * src_h > MAX_VIDEO_PIXELS:
            raise InputError(f"video '{name}' is {src_w}x{src_h}; the limit is {MAX_VIDEO_PIXELS / 1e6:.1f} "
                             "megapixels per frame. Scale it down")

        self._pts = np.unique(np.asarray(pts, dtype=np.int64))  # sorted presentation order
        tb = float(time_base)
        times = (self._pts - self._pts[0]) * tb  # seconds from the first frame
        step = float(np.median(np.diff(times))) if times.size > 1 else 1.0 / fps
        span = times[-1] + (last_duration * tb if last_duration > 0 else step)
        count = max(1, math.ceil(span * fps - 1e-6))
        if max_frames is not None:
            count = min(count, max_frames)
        # Nearest source frame for each output time.
        out_t = np.arange(count) / fps
        hi = np.clip(np.searchsorted(times, out_t), 0, times.size - 1)
        lo = np.clip(hi - 1, 0, times.size - 1)
        self._src = np.where(np.abs(times[lo] - out_t) <= np.abs(times[hi] - out_t), lo, hi)
        self.num_frames = int(count)

        self._container, self._stream = _open_video(self.path, "video")
        self._stream.thread_type = "AUTO"
        self._frames: Any = None  # decode iterator
        self._cur_index = -1  # source index of the frame in self._cur
        self._cur: np.ndarray | None = None
        try:  # width/height after rotation come from the first frame
            first = self.frame(0)
        except BaseException:
            self._container.close()
            raise
        self.height, self.width = first.shape[:2]

    def _restart(self, index: int) -> None:
        """Seek so that decoding resumes at the keyframe at or before source frame ``index``."""
        self._container.seek(int(self._pts[index]), stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._cur_index = -1
        self._cur = None

    def frame(self, i: int) -> np.ndarray:
        """Output frame ``i`` as HxWx3 uint8 RGB (a fresh array)."""
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} out of range 0..{self.num_frames - 1}")
        target = int(self._src[i])
        if self._cur is not None and self._cur_index == target:
            return self._cur.copy()
        if self._frames is None or target < self._cur_index:
            self._restart(target)
        name = _name(self.path)
        found: av.VideoFrame | None = None  # converted to RGB only once the target is reached
        try:
            while self._cur_index < target:
                try:
                    fr = next(self._frames)
                except StopIteration:  # the stream ended early: repeat the last frame
                    if found is None and self._cur is None:
                        raise InputError(f"video '{name}' ended before frame {i}; convert it to MP4") from None
                    self._cur_index = target
                    break
                # Source index from the timestamp; without one, count frames.
                idx = self._cur_index + 1 if fr.pts is None else int(np.searchsorted(self._pts, fr.pts))
                self._cur_index = max(idx, self._cur_index + 1)
                found = fr
        except InputError:
            raise
        except (av.FFmpegError, ValueError, OSError) as e:
            raise InputError(f"video '{name}' could not be decoded at frame {i} ({e}); convert it to MP4") from None
        if found is not None:
            rgb = found.to_ndarray(format="rgb24")
            quarter_turns = int(round((found.rotation or 0) / 90.0)) % 4
            if quarter_turns:  # display matrix: counter-clockwise rotation in degrees
                rgb = np.rot90(rgb, k=quarter_turns)
            self._cur = np.ascontiguousarray(rgb)
        assert self._cur is not None
        return self._cur.copy()

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Describing a media file (the output video is written by engine/writer.py)
# --------------------------------------------------------------------------------------------


def probe(path: Path) -> dict[str, Any]:
    """Describe a media file: ``format``, ``duration`` (s), ``width``, ``height``, ``fps``,
    ``frames``, ``video_codec``, ``pix_fmt``, ``audio_codec``, ``audio_duration`` (s),
    ``audio_rate``, ``audio_channels``; None where absent. Only allow-listed containers."""
    name = _name(path)
    _check_file(path, "file")
    kind = _sniff_video(path)
    demuxer = VIDEO_CONTAINERS.get(kind or "")
    if demuxer is None:
        audio_kind = _sniff_audio(path)
        if audio_kind is None:
            raise InputError(f"'{name}' is not a media file this program reads")
        demuxer = AUDIO_CONTAINERS[audio_kind]
    info: dict[str, Any] = dict.fromkeys(
        ("duration", "width", "height", "fps", "frames", "video_codec", "pix_fmt", "audio_codec", "audio_duration",
         "audio_rate", "audio_channels"))
    try:
        with av.open(str(path), format=demuxer, options=_AV_OPTIONS) as c:
            info["format"] = c.format.name
            info["duration"] = c.duration / 1e6 if c.duration is not None else None
            if c.streams.video:
                v = c.streams.video[0]
                info.update(width=v.codec_context.width, height=v.codec_context.height,
                            video_codec=v.codec_context.name, pix_fmt=v.codec_context.pix_fmt,
                            fps=float(v.average_rate) if v.average_rate else None)
                frames = v.frames
                if not frames:  # not in the header (Matroska): count packets
                    frames = sum(1 for p in c.demux(v) if p.size)
                info["frames"] = frames
                if v.duration is not None and v.time_base is not None:
                    info["duration"] = float(v.duration * v.time_base)
            if c.streams.audio:
                a = c.streams.audio[0]
                info.update(audio_codec=a.codec_context.name, audio_rate=a.codec_context.sample_rate,
                            audio_channels=a.codec_context.channels)
                if a.duration is not None and a.time_base is not None:
                    info["audio_duration"] = float(a.duration * a.time_base)
    except (av.FFmpegError, ValueError, OSError) as e:
        raise InputError(f"'{name}' could not be read ({e})") from None
    return info
