"""Shared fixtures: a tiny models folder in the real layout, and sample media made on the fly."""

from __future__ import annotations

import math
import os
import struct
import uuid
import wave
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def make_portrait(path: Path, width: int = 96, height: int = 128, fmt: str | None = None) -> Path:
    """A synthetic 'portrait': a skin-coloured ellipse with eyes and a mouth on a gradient."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    px = np.zeros((height, width, 3), np.uint8)
    px[..., 0] = np.linspace(40, 90, height)[:, None]
    px[..., 2] = np.linspace(120, 60, width)[None, :]
    img = Image.fromarray(px)
    d = ImageDraw.Draw(img)
    cx, cy, rx, ry = width / 2, height / 2, width * 0.3, height * 0.33
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(224, 180, 150))
    for ex in (cx - rx / 2.5, cx + rx / 2.5):
        d.ellipse([ex - 4, cy - ry / 3 - 3, ex + 4, cy - ry / 3 + 3], fill=(40, 30, 30))
    d.ellipse([cx - rx / 3, cy + ry / 2.5 - 4, cx + rx / 3, cy + ry / 2.5 + 4], fill=(150, 60, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR claiming ``width`` x ``height`` + an empty IDAT: a pixel bomb in 60 bytes
    (no pixel data needed to trip size checks)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def speech_like(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated signal (not silent, not a pure tone), float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f0 = 140 + 20 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = 0.5 * (1 + np.sin(2 * math.pi * 4.0 * t)) ** 2
    sig = 0.2 * voiced * syllables + 0.01 * rng.standard_normal(n)
    return sig.astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(samples, -1, 1)
    if channels == 2:
        data = np.stack([data, data], axis=1).reshape(-1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((data * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny models folder, written once per test session through the product's own command."""
    from engine.tiny import write_tiny_models

    out = tmp_path_factory.mktemp("models")
    write_tiny_models(out, seed=0)
    return out


def dit_inputs(cfg, f: int = 3, h: int = 4, w: int = 4, seed: int = 1, device: str = "cpu",  # type: ignore[no-untyped-def]
               dtype=None) -> dict:
    """Random WanInfiniteTalk.forward keyword arguments for a (tiny) config: one speaker, 20 text tokens,
    257 CLIP tokens; x and t stay fp32, the rest in ``dtype`` (default fp32)."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(1, 16, f, h, w, generator=g),
        "t": torch.full((1,), 700.0),
        "context": torch.randn(1, 20, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=g),
        "y": torch.randn(1, 20, f, h, w, generator=g),
        "audio": torch.randn(1, 1, 4 * (f - 1) + 1, cfg.audio_window, cfg.audio_feature_dim, generator=g),
    }
    return {k: v.to(device, dtype if k not in ("x", "t") else torch.float32) for k, v in t.items()}


# -- the job database on both backends ------------------------------------------------------------
# SQLite is always there. PostgreSQL is the server named by INFINITETALKD_TEST_PG_URL (a superuser's
# SQLAlchemy URL; .ci/with-postgres starts a throwaway one and sets it). Each test gets a database of
# its own, dropped afterwards. Without a reachable server the PostgreSQL cases skip, except in CI
# (CI=true), where they fail: a green CI must have run them.

PG_URL_ENV = "INFINITETALKD_TEST_PG_URL"


def _pg_unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL store tests cannot run in CI: {reason}")
    pytest.skip(f"no PostgreSQL for the store tests: {reason} (run under .ci/with-postgres)")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """The test server's URL (a superuser), checked to answer once per session."""
    url = os.environ.get(PG_URL_ENV)
    if not url:
        _pg_unavailable(f"{PG_URL_ENV} is not set")
        raise AssertionError("unreachable")
    import psycopg
    from sqlalchemy.engine import make_url

    try:
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        psycopg.connect(dsn, connect_timeout=5).close()
    except Exception as exc:  # noqa: BLE001 - any failure means: no server for these tests
        _pg_unavailable(f"{PG_URL_ENV} does not answer: {exc}")
    return url


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(pg_admin_url)
    name = f"itd_test_{uuid.uuid4().hex[:12]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's job database lives: an SQLite file path, or a PostgreSQL URL (both go to Store.open)."""
    if request.param == "sqlite":
        return tmp_path / "state" / "jobs.db"
    url: str = request.getfixturevalue("pg_url")
    return url
