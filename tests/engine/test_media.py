"""Media input/output: hostile-input checks, audio decoding, loudness, mp4 writing and reading."""

from __future__ import annotations

import errno
import struct
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from engine import media
from engine.api import InputError
from tests.conftest import png_header_only

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _picture(h: int = 40, w: int = 60) -> np.ndarray:
    """Left half red, right half blue, top-left 8x8 block green (to see rotations)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[:, w // 2:] = (30, 30, 200)
    img[:8, :8] = (30, 200, 30)
    return img


def _sine(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_audio(path: Path, fmt: str, codec: str, x: np.ndarray, rate: int, channels: int = 1) -> Path:
    """Encode ``x`` (mono float32) with PyAV, duplicated to ``channels`` channels."""
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w", format=fmt) as c:
        s: Any = c.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.repeat(x[None], channels, axis=0), format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _dominant_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * rate / x.size)


def _top_level_atoms(path: Path) -> list[str]:
    data = path.read_bytes()
    atoms, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        atoms.append(kind.decode("latin-1"))
        if size < 8:
            break
        pos += size
    return atoms


def _write_test_video(path: Path, n: int, fps: int, h: int = 32, w: int = 48, rotation: int = 0,
                      fmt: str = "mp4") -> Path:
    """A clip whose frame k is flat grey level 5*k (so the reader's choice of frame is visible)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "0"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        for k in range(n):
            img = np.full((h, w, 3), 5 * k, np.uint8)
            if rotation:
                img[:8, :8] = (255, 0, 0)  # a marker in the stored top-left corner
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = k
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "suffix", "tol"), [("PNG", "png", 0), ("JPEG", "jpg", 12), ("WEBP", "webp", 12)])
def test_load_image_formats(tmp_path: Path, fmt: str, suffix: str, tol: int) -> None:
    img = _picture()
    p = tmp_path / f"face.{suffix}"
    Image.fromarray(img).save(p, format=fmt, quality=95)
    out = media.load_image(p)
    assert out.shape == img.shape and out.dtype == np.uint8
    # compare away from the colour edges, where lossy codecs blur
    assert np.abs(out[12:, 12:24].astype(int) - img[12:, 12:24]).max() <= tol
    assert np.abs(out[12:, 40:].astype(int) - img[12:, 40:]).max() <= tol


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    img = _picture(40, 60)  # landscape, green marker top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "phone.jpg"
    Image.fromarray(img).save(p, format="JPEG", quality=95, exif=exif)
    out = media.load_image(p)
    assert out.shape == (60, 40, 3)  # upright portrait
    # Rotating 90 degrees clockwise moves the top-left marker to the top-right.
    assert out[:6, -6:, 1].mean() > 150 and out[:6, :6, 1].mean() < 100


def test_load_image_flattens_alpha_over_white_and_scales_16_bit(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :5, 3] = 255  # left half opaque red, right half transparent
    p = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = media.load_image(p)
    assert out.shape == (10, 10, 3)
    assert (out[:, :5] == (255, 0, 0)).all() and (out[:, 5:] == 255).all()

    grey16 = np.full((6, 6), 65535 // 2, np.uint16)
    p16 = tmp_path / "deep.png"
    Image.fromarray(grey16).save(p16)
    out16 = media.load_image(p16)
    assert out16.shape == (6, 6, 3) and abs(int(out16[0, 0, 0]) - 127) <= 1


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), "empty"),
        ("notes.png", lambda p: p.write_text("hello, this is not a picture\n"), "not a PNG, JPEG or WebP"),
        ("anim.gif", lambda p: Image.new("RGB", (8, 8)).save(p, format="GIF"), "not a PNG, JPEG or WebP"),
        ("bomb.png", lambda p: png_header_only(p, 30000, 30000), "too many pixels"),  # > 2x Pillow's cap
        ("warned.png", lambda p: png_header_only(p, 10000, 10000), "too many pixels"),  # Pillow's warning
        ("big.png", lambda p: png_header_only(p, 8000, 6000), "limit is 40 MP"),  # our own cap
    ],
)
def test_load_image_refuses_bad_files(tmp_path: Path, name: str, make, message: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / name
    make(p)
    with pytest.raises(InputError, match=message) as e:
        media.load_image(p)
    assert name in str(e.value)


def test_load_image_refuses_truncated_and_animated(tmp_path: Path) -> None:
    src = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        p = tmp_path / f"cut.{fmt.lower()}"
        Image.fromarray(src).save(p, format=fmt)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        with pytest.raises(InputError, match="damaged or truncated") as e:
            media.load_image(p)
        assert p.name in str(e.value)
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    for fmt in ("PNG", "WEBP"):
        p = tmp_path / f"anim.{fmt.lower()}"
        frames[0].save(p, format=fmt, save_all=True, append_images=frames[1:], duration=100)
        with pytest.raises(InputError, match="animated"):
            media.load_image(p)
    with pytest.raises(InputError, match="does not exist"):
        media.load_image(tmp_path / "missing.png")


def test_load_mask(tmp_path: Path) -> None:
    m = np.zeros((20, 30), np.uint8)
    m[5:15, 3:12] = 255
    p = tmp_path / "m.png"
    Image.fromarray(m).save(p)
    out = media.load_mask(p, size=(20, 30))
    assert out.dtype == bool and out.shape == (20, 30)
    np.testing.assert_array_equal(out, m > 0)
    # JPEG noise around black and white does not matter
    pj = tmp_path / "m.jpg"
    Image.fromarray(m).convert("RGB").save(pj, quality=70)
    assert (media.load_mask(pj) != (m > 0)).mean() < 0.02
    # transparent = not the speaker (flattened over black)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :10, 3] = 255
    pa = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(pa)
    out = media.load_mask(pa)
    assert out[:, :10].all() and not out[:, 10:].any()
    with pytest.raises(InputError, match="30x20 pixels but the image is 40x20"):
        media.load_mask(p, size=(20, 40))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(InputError, match="all black"):
        media.load_mask(tmp_path / "black.png")


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


def test_load_audio_wav_44k_stereo_to_16k_mono(tmp_path: Path) -> None:
    x = _sine(1.0, 44100, amp=0.5)
    p = _write_audio(tmp_path / "speech.wav", "wav", "pcm_s16le", x, 44100, channels=2)
    wave = media.load_audio(p, max_seconds=10)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.size == 16000
    assert abs(_dominant_hz(wave, 16000) - 440) < 2
    # channels are averaged (L = R -> same level), not FFmpeg's 1/sqrt(2) downmix
    assert abs(np.abs(wave[1000:-1000]).max() - 0.5) < 0.01


@pytest.mark.parametrize(
    ("name", "fmt", "codec", "rate"),
    [
        ("s.flac", "flac", "flac", 22050),
        ("s.mp3", "mp3", "mp3", 44100),
        ("s.m4a", "ipod", "aac", 44100),
        ("s.aac", "adts", "aac", 48000),
        ("s.ogg", "ogg", "libopus", 48000),
        ("s.opus", "opus", "libopus", 48000),
        ("s.mp3-named.wav", "mp3", "mp3", 44100),  # the content decides, not the name
    ],
)
def test_load_audio_round_trips(tmp_path: Path, name: str, fmt: str, codec: str, rate: int) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    p = _write_audio(tmp_path / name, fmt, codec, _sine(1.0, rate, amp=0.3), rate)
    wave = media.load_audio(p, max_seconds=10)
    assert wave.dtype == np.float32
    assert abs(wave.size - 16000) < 0.08 * 16000  # encoder delay/padding of lossy codecs
    assert abs(_dominant_hz(wave, 16000) - 440) < 2
    rms = float(np.sqrt(np.mean(wave[2000:-2000] ** 2)))
    assert abs(rms - 0.3 / np.sqrt(2)) < 0.03


def test_load_audio_mp3_without_id3_tag(tmp_path: Path) -> None:
    if "mp3" not in av.codecs_available:
        pytest.skip("this PyAV build has no mp3 encoder")
    p = _write_audio(tmp_path / "tagged.mp3", "mp3", "mp3", _sine(1.0, 44100, amp=0.3), 44100)
    data = p.read_bytes()
    assert data[:3] == b"ID3"
    tag = 10 + (data[6] << 21 | data[7] << 14 | data[8] << 7 | data[9])  # syncsafe size
    raw = tmp_path / "raw.mp3"
    raw.write_bytes(data[tag:])
    assert raw.read_bytes()[0] == 0xFF  # starts with an MPEG frame sync
    wave = media.load_audio(raw, max_seconds=10)
    assert abs(_dominant_hz(wave, 16000) - 440) < 2


def test_load_audio_refuses_ffconcat_playlist_named_wav(tmp_path: Path) -> None:
    _write_audio(tmp_path / "secret.wav", "wav", "pcm_s16le", _sine(1.0, 16000), 16000)
    trap = tmp_path / "job5.wav"
    trap.write_text("ffconcat version 1.0\nfile secret.wav\n")
    with pytest.raises(InputError, match="job5.wav") as e:
        media.load_audio(trap, max_seconds=10)
    assert "first bytes" in str(e.value)
    hls = tmp_path / "job6.wav"
    hls.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsecret.wav\n#EXT-X-ENDLIST\n")
    with pytest.raises(InputError, match="job6.wav"):
        media.load_audio(hls, max_seconds=10)


def test_load_audio_refuses_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.wav.*empty"):
        media.load_audio(empty, max_seconds=10)

    long = _write_audio(tmp_path / "long.wav", "wav", "pcm_s16le", _sine(3.0, 16000), 16000)
    with pytest.raises(InputError, match="long.wav.*longer than the limit of 1 s"):
        media.load_audio(long, max_seconds=1.0)
    assert media.load_audio(long, max_seconds=3.0).size == 48000

    tiny = _write_audio(tmp_path / "tiny.wav", "wav", "pcm_s16le", _sine(0.02, 16000), 16000)
    with pytest.raises(InputError, match="shorter than one video frame"):
        media.load_audio(tiny, max_seconds=10)
    ok = _write_audio(tmp_path / "ok.wav", "wav", "pcm_s16le", _sine(0.05, 16000), 16000)
    assert media.load_audio(ok, max_seconds=10).size == 800

    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x24\x00\x00\x00WAVE" + b"\x00garbage" * 8)
    with pytest.raises(InputError, match="broken.wav"):
        media.load_audio(broken, max_seconds=10)

    silent_video = _write_test_video(tmp_path / "video.m4a", 5, 25)  # ftyp, but no audio stream
    with pytest.raises(InputError, match="no audio stream"):
        media.load_audio(silent_video, max_seconds=10)


def test_loudness_normalize() -> None:
    import pyloudnorm

    meter = pyloudnorm.Meter(16000)
    x = _sine(3.0, 16000, freq=1000, amp=0.1)
    x = (x * 10 ** ((-10 - meter.integrated_loudness(x)) / 20)).astype(np.float32)
    assert abs(meter.integrated_loudness(x) + 10) < 0.1  # the input really is at -10 LUFS
    y = media.loudness_normalize(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert abs(meter.integrated_loudness(y) + 23) < 0.5
    silence = np.zeros(32000, np.float32)
    assert np.array_equal(media.loudness_normalize(silence), silence)
    short = _sine(0.2, 16000)  # shorter than the 400 ms measuring block
    assert np.array_equal(media.loudness_normalize(short), short)


def test_is_silent_and_mix_tracks() -> None:
    assert media.is_silent(np.zeros(100, np.float32)) and media.is_silent(np.zeros(0, np.float32))
    assert media.is_silent(np.full(100, 1e-4, np.float32))  # -80 dBFS
    assert not media.is_silent(_sine(0.1, 16000, amp=0.01))  # -43 dBFS
    a, b = _sine(1.0, 16000, amp=0.3), _sine(0.5, 16000, freq=300, amp=0.3)
    m = media.mix_tracks(a, b)
    assert m.dtype == np.float32 and m.size == 16000
    np.testing.assert_allclose(m[8000:], a[8000:], atol=1e-6)
    np.testing.assert_allclose(m[:8000], a[:8000] + b, atol=1e-6)
    loud = media.mix_tracks(_sine(1.0, 16000, amp=0.8), _sine(1.0, 16000, amp=0.8))
    assert np.abs(loud).max() <= 1.0  # scaled down, not clipped: still a clean sine
    np.testing.assert_allclose(loud / np.abs(loud).max(), _sine(1.0, 16000, amp=1.0), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Video out
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("audio_seconds", [2.0, 3.1, 1.2])
def test_video_writer_mp4(tmp_path: Path, audio_seconds: float) -> None:
    out = tmp_path / "out.mp4"
    frames = np.stack([np.full((32, 48, 3), 4 * k, np.uint8) for k in range(50)])
    with media.VideoWriter(out, width=48, height=32, fps=25, crf=18,
                           audio=_sine(audio_seconds, 16000), audio_rate=16000) as w:
        w.write(frames[:20])
        w.write(frames[20:])
    info = media.probe(out)
    assert info["frames"] == 50 and info["fps"] == 25.0
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == (48, 32)
    assert info["audio_codec"] == "aac" and info["audio_channels"] == 1
    assert abs(info["audio_duration"] - 2.0) <= 0.05  # trimmed or padded to the video
    assert abs(info["duration"] - 2.0) <= 0.05
    atoms = _top_level_atoms(out)
    assert atoms.index("moov") < atoms.index("mdat")  # +faststart


def test_video_writer_colours_survive_and_reader_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "colours.mp4"
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :16] = (200, 40, 40)
    img[:, 16:32] = (40, 200, 40)
    img[:, 32:] = (40, 40, 200)
    with media.VideoWriter(out, width=48, height=32, crf=10) as w:
        w.write(np.stack([img] * 5))
    assert media.probe(out)["audio_codec"] is None
    with media.VideoReader(out) as r:
        assert r.num_frames == 5 and (r.height, r.width) == (32, 48)
        back = r.frame(2)
    # BT.709 tags written and honoured on reading: flat areas come back within a few levels
    for x0 in (4, 20, 36):
        assert np.abs(back[8:24, x0:x0 + 8].astype(int) - img[8:24, x0:x0 + 8]).max() <= 4


def test_video_writer_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        media.VideoWriter(tmp_path / "odd.mp4", width=47, height=32)
    with media.VideoWriter(tmp_path / "x.mp4", width=48, height=32) as w, pytest.raises(ValueError, match="uint8"):
        w.write(np.zeros((1, 32, 48, 3), np.float32))


# --- background mode (encoding in a worker thread) ---


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == media.WRITER_THREAD_NAME]


def _moving_frames(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Frame k: a gradient with a bright square at x = k (so a dropped or reordered frame shows)."""
    rng = np.random.default_rng(0)
    base = (np.arange(w)[None, :, None] * 4 + np.arange(h)[:, None, None] * 2 + np.array([0, 40, 80])) % 256
    frames = np.repeat(base[None].astype(np.uint8), n, axis=0)
    for k in range(n):
        x = k % (w - 8)
        frames[k, 12:20, x:x + 8] = 250
    return frames ^ rng.integers(0, 8, frames.shape, dtype=np.uint8)  # a little noise to encode


def _decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All video frames as [N, H, W, 3] rgb24 and the audio samples (first channel)."""
    with av.open(str(path)) as c:
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(c.streams.audio[0])])
    return video, audio


def _within(seconds: float, fn: Any) -> Any:
    """Run ``fn`` in a helper thread: its result, its exception re-raised, or a failure on a hang."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"hung for {seconds} s (deadlock)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


class _StreamProxy:
    """Stands in for the writer's libx264 stream: waits for ``gate`` (if any) on the first encode call,
    then delegates, except that call number ``fail_at`` raises a disk-full error."""

    def __init__(self, real: Any, fail_at: int | None = None, gate: threading.Event | None = None) -> None:
        self.real, self.fail_at, self.gate, self.calls = real, fail_at, gate, 0

    def encode(self, frame: Any = None) -> Any:
        self.calls += 1
        if self.gate is not None and self.calls == 1:
            assert self.gate.wait(10)
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.encode(frame)


def test_video_writer_background_output_equals_foreground(tmp_path: Path) -> None:
    frames = _moving_frames(50)
    audio = _sine(3.1, 16000)  # longer than the video: trimmed at close
    outs = {}
    for background in (False, True):
        out = outs[background] = tmp_path / f"bg{int(background)}.mp4"
        with media.VideoWriter(out, width=48, height=32, crf=18, audio=audio, background=background) as w:
            assert len(_writer_threads()) == int(background)
            w.write(frames[:20])
            w.write(frames[20])  # a single [H, W, 3] frame
            w.write(frames[21:])
        assert w.frames_written == 50
        assert w.encode_s > 0  # the encoding time is accounted in either mode (render.py reports it)
        assert not _writer_threads()  # joined by close()
    (v_fg, a_fg), (v_bg, a_bg) = _decode(outs[False]), _decode(outs[True])
    assert v_bg.shape == (50, 32, 48, 3)
    np.testing.assert_array_equal(v_bg, v_fg)
    np.testing.assert_array_equal(a_bg, a_fg)
    assert outs[True].read_bytes() == outs[False].read_bytes()  # x264 is deterministic: same bytes
    assert np.abs(v_bg[7].astype(int) - frames[7]).mean() < 6  # and it is the picture that was written
    info = media.probe(outs[True])
    assert info["frames"] == 50 and abs(info["audio_duration"] - 2.0) <= 0.05
    assert _top_level_atoms(outs[True]).index("moov") < _top_level_atoms(outs[True]).index("mdat")


def test_video_writer_background_worker_error_does_not_deadlock(tmp_path: Path) -> None:
    frames = _moving_frames(15)
    out = tmp_path / "fail.mp4"
    w = media.VideoWriter(out, width=48, height=32, background=True)
    gate = threading.Event()
    # the first frame blocks, then fails
    w._video = _StreamProxy(w._video, fail_at=1, gate=gate)  # type: ignore[assignment]

    def scenario() -> None:
        w.write(frames[:5])  # taken by the worker, which blocks in encode
        w.write(frames[5:10])  # queued: the queue (one chunk) is now full
        threading.Timer(0.3, gate.set).start()  # the worker fails while the caller waits to queue
        with pytest.raises(OSError, match="No space left") as first:
            w.write(frames[10:])
        t0 = time.monotonic()
        with pytest.raises(OSError) as again:  # further writes fail fast with the same error
            w.write(frames[10:])
        assert time.monotonic() - t0 < 0.05 and again.value is first.value
        with pytest.raises(OSError, match="No space left"):
            w.close()

    _within(20, scenario)
    assert not _writer_threads() and w.frames_written == 0
    w.abort()  # what render.py does after a failure (FFmpeg creates the file at the first packet only)
    assert not out.exists()


def test_video_writer_background_error_surfaces_from_close(tmp_path: Path) -> None:
    w = media.VideoWriter(tmp_path / "late.mp4", width=48, height=32, background=True)
    w._video = _StreamProxy(w._video, fail_at=3)  # type: ignore[assignment]
    w.write(_moving_frames(5))
    with pytest.raises(OSError, match="No space left"):
        _within(20, w.close)
    assert w.frames_written == 2 and not _writer_threads()
    with pytest.raises(RuntimeError, match="closed"):
        w.write(_moving_frames(1))


def test_video_writer_background_abort_drops_queued_frames(tmp_path: Path) -> None:
    out = tmp_path / "aborted.mp4"
    w = media.VideoWriter(out, width=48, height=32, audio=_sine(1.0, 16000), background=True)
    gate = threading.Event()
    w._video = _StreamProxy(w._video, gate=gate)  # type: ignore[assignment]
    w.write(_moving_frames(10))  # the worker blocks on its first frame
    w.write(_moving_frames(10))  # queued
    threading.Timer(0.3, gate.set).start()
    _within(20, w.abort)
    assert w.frames_written == 1  # the frame in flight finished; the rest and the queued chunk were dropped
    assert not out.exists() and not _writer_threads()
    w.abort()  # idempotent


def test_video_writer_background_checks_frames_in_caller_and_exit_on_error(tmp_path: Path) -> None:
    out = tmp_path / "checked.mp4"
    with media.VideoWriter(out, width=48, height=32, background=True) as w:
        with pytest.raises(ValueError, match="uint8"):
            w.write(np.zeros((2, 32, 48, 3), np.float32))
        with pytest.raises(ValueError, match=r"\[N, 32, 48, 3\]"):
            w.write(np.zeros((2, 48, 32, 3), np.uint8))
        w.write(_moving_frames(7))  # the writer still works
    assert media.probe(out)["frames"] == 7 and not _writer_threads()

    out2 = tmp_path / "interrupted.mp4"
    with pytest.raises(KeyError), media.VideoWriter(out2, width=48, height=32, background=True) as w2:
        w2.write(_moving_frames(5))
        raise KeyError("render failed")
    assert not _writer_threads()  # the worker was stopped and joined; the original error propagated
    assert w2.frames_written <= 5


# ---------------------------------------------------------------------------------------------
# Video in
# ---------------------------------------------------------------------------------------------


def test_video_reader_resamples_30_to_25_fps(tmp_path: Path) -> None:
    src = _write_test_video(tmp_path / "clip.mp4", 45, 30)  # 1.5 s
    with media.VideoReader(src, fps=25) as r:
        assert r.num_frames == 38  # ceil(1.5 s * 25)
        levels = [int(r.frame(i).mean().round()) for i in range(r.num_frames)]
        # output frame i shows source frame nearest to i/25 s, i.e. round(1.2 i)
        expected = [5 * min(44, int(np.floor(1.2 * i + 0.5))) for i in range(38)]
        assert max(abs(a - b) for a, b in zip(levels, expected, strict=True)) <= 2
        # going back re-seeks and gives the same picture
        assert abs(int(r.frame(3).mean().round()) - expected[3]) <= 2
        assert abs(int(r.frame(37).mean().round()) - expected[37]) <= 2
    with media.VideoReader(src, fps=25, max_frames=10) as r:
        assert r.num_frames == 10
        with pytest.raises(IndexError):
            r.frame(10)


def test_video_reader_matroska_and_probe_counts_packets(tmp_path: Path) -> None:
    src = _write_test_video(tmp_path / "clip.mkv", 20, 50, fmt="matroska")  # 0.4 s at 50 fps
    info = media.probe(src)
    assert info["frames"] == 20 and info["video_codec"] == "h264"
    with media.VideoReader(src, fps=25) as r:
        assert r.num_frames == 10
        levels = [int(r.frame(i).mean().round()) for i in range(10)]
    assert max(abs(a - 10 * i) for i, a in enumerate(levels)) <= 2  # every second source frame


def test_video_reader_applies_rotation_and_refuses_non_video(tmp_path: Path) -> None:
    src = _write_test_video(tmp_path / "phone.mp4", 3, 25, h=32, w=48, rotation=90)
    with media.VideoReader(src) as r:
        assert (r.height, r.width) == (48, 32)
        f = r.frame(0)
    # 90 degrees counter-clockwise moves the stored top-left marker to the bottom-left
    assert f[-6:, :6, 0].mean() > 200 and f[:6, :6, 0].mean() < 100
    fake = tmp_path / "fake.mp4"
    fake.write_text("ffconcat version 1.0\nfile phone.mp4\n")
    with pytest.raises(InputError, match="fake.mp4"):
        media.VideoReader(fake)
    with pytest.raises(InputError, match="no video stream"):
        media.VideoReader(_write_audio(tmp_path / "voice.mp4", "mp4", "aac", _sine(0.5, 16000), 16000))
