"""The one magic-byte sniffer (engine/sniff.py), shared by ingest and the engine, on each format."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from engine.sniff import sniff, sniff_bytes
from tests.daemon.test_reliability import wav_bytes


def _image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), 50).save(buf, format=fmt)
    return buf.getvalue()


def _audio(fmt: str, codec: str, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        fmt_name = s.codec_context.codec.audio_formats[0].name if s.codec_context.codec.audio_formats else "s16"
        samples = 960 if codec == "libopus" else 1152
        dtype = np.float32 if fmt_name.startswith("flt") else np.int32 if fmt_name.startswith("s32") else np.int16
        frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), dtype), format=fmt_name, layout="mono")
        frame.sample_rate = rate
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def _video(fmt: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream("libx264" if fmt == "mp4" else "libvpx-vp9" if fmt == "webm" else "libx264", rate=25)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


CASES = [
    ("png", lambda: _image("PNG")),
    ("jpeg", lambda: _image("JPEG")),
    ("webp", lambda: _image("WEBP")),
    ("wav", lambda: wav_bytes(0.1)),
    ("flac", lambda: _audio("flac", "flac")),
    ("ogg", lambda: _audio("ogg", "libopus", 48000)),
    ("mp3", lambda: _audio("mp3", "libmp3lame", 44100)),
    ("aac", lambda: _audio("adts", "aac", 44100)),
    ("isobmff", lambda: _video("mp4")),
    ("matroska", lambda: _video("matroska")),
    ("text", lambda: b"hello\nworld\n"),
    (None, lambda: bytes(range(256))),
]


@pytest.mark.parametrize(("kind", "make"), CASES, ids=[str(k) for k, _ in CASES])
def test_each_format(tmp_path: Path, kind: str | None, make: object) -> None:
    path = tmp_path / "f"
    path.write_bytes(make())  # type: ignore[operator]
    assert sniff(path) == kind


def test_an_id3_tag_is_looked_behind() -> None:
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10
    assert sniff_bytes(tag, b"fLaC") == "flac"
    assert sniff_bytes(tag, b"\xff\xf1\x50\x80") == "aac"
    assert sniff_bytes(tag, b"\xff\xfb\x90\x00") == "mp3"


def test_the_daemon_refuses_a_symlink_the_engine_follows(tmp_path: Path) -> None:
    (tmp_path / "real.wav").write_bytes(wav_bytes(0.1))
    (tmp_path / "link.wav").symlink_to(tmp_path / "real.wav")
    assert sniff(tmp_path / "link.wav") == "wav"
    with pytest.raises(OSError):
        sniff(tmp_path / "link.wav", follow_symlinks=False)
