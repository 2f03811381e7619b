"""Adversarial inputs and faults against the daemon.

Two layers:
- properties (hypothesis) of the pure checks every drop goes through: any sidecar text, any file
  name, any WAV header either passes or is refused with InputError, never another exception; a
  fitted name always fits and keeps distinct stems apart;
- one real daemon process (tests/daemon/fake_daemon.py, fake renderer) fed a corpus of broken and
  tricky drops (made with Pillow, PyAV and raw bytes, plus seeded random sidecars and names), while
  failed/ fails with EIO, the outbox fills up (ENOSPC), another process locks the database, the
  inbox is renamed away and back, and the process is killed with -9 and restarted. At the end:
  the daemon never exited by itself, every good drop is done exactly once with no stray file, every
  bad drop failed once, and every byte dropped is in the inbox, archive/ or failed/.

ADVERSARIAL_REPORT=<file> writes the run's figures as JSON (the README's "Reliability" section).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import string
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from daemon import inbox as ib
from daemon import outbox as ob
from daemon.jobs import JobStatus
from engine.api import InputError
from tests.daemon.conftest import Env, spawn, wait_for, write_png, write_wav
from tests.daemon.test_reliability import _hold_lock, streaming_wav, wav_bytes

LIMITS = ib.Limits(max_input_bytes=2**20, max_sidecar_bytes=64 * 1024, max_image_pixels=4_000_000)

# -- properties of the checks -----------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                      max_size=4), max_leaves=12)
_KEYS = ["seed", "shift", "steps", "prompt", "audio2", "masks", "bbox", "size", "crf", "teacache", "frame_window",
         "max_duration_s", "color_correction", "text_guidance", "sample"]


@pytest.fixture(scope="module")
def group_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("prop")
    write_png(d / "p.png")
    write_wav(d / "p.wav")
    return d


def _prepare_with_sidecar(d: Path, text: bytes) -> None:
    (d / "p.yaml").write_bytes(text)
    parts = ib.Parts(image="p.png", video=None, audio="p.wav", sidecar="p.yaml", marker=None, problem=None,
                     missing=())
    with contextlib.suppress(InputError):  # a refusal with a reason is fine; anything else fails the test
        ib.prepare(d, "p", parts, defaults={}, identity="prop", limits=LIMITS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=10), _values, max_size=5))
def test_any_sidecar_mapping_passes_or_is_refused_with_a_reason(group_dir: Path, doc: dict[str, Any]) -> None:
    _prepare_with_sidecar(group_dir, yaml.safe_dump(doc, allow_unicode=True).encode())


_NASTY = ["seed: " + "9" * 5000, "shift: 1e999999", "a: &a [*a]", "[1, 2]", "- x\n- y", "seed: 0x" + "f" * 600,
          "steps: .inf", "prompt: !!python/object:os.system x"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))
       | st.sampled_from(_NASTY).map(str.encode))
def test_any_sidecar_bytes_pass_or_are_refused_with_a_reason(group_dir: Path, raw: bytes) -> None:
    _prepare_with_sidecar(group_dir, raw)


@given(name=st.text(min_size=1, max_size=300))
def test_any_name_splits_or_is_ignored_and_fits_when_published(name: str) -> None:
    split = ib.split_name(name)
    if split is not None:
        stem, ext = split
        assert name.lower().endswith("." + ext)
    for suffix in (".json", ".17.json", ".log"):
        fitted = ob.fit_name(name, suffix)
        assert fitted.endswith(suffix) and len(fitted.encode("utf-8", "surrogateescape")) <= ob.NAME_MAX


@given(a=st.text(min_size=240, max_size=260), b=st.text(min_size=240, max_size=260))
def test_fitted_names_of_different_stems_differ(a: str, b: str) -> None:
    if a != b:
        assert ob.fit_name(a, ".json") != ob.fit_name(b, ".json")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1),
                        st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
       body=st.binary(max_size=200), cut=st.integers(0, 80))
def test_any_wav_header_gives_a_length_or_a_reason(tmp_path_factory: pytest.TempPathFactory,
                                                   fields: tuple[int, ...], body: bytes, cut: int) -> None:
    riff, fmt_len, rate, byte_rate, data_len = fields
    head = (b"RIFF" + riff.to_bytes(4, "little") + b"WAVE" + b"fmt " + (16).to_bytes(4, "little")
            + fmt_len.to_bytes(2, "little") + b"\x01\x00" + rate.to_bytes(4, "little") + byte_rate.to_bytes(4, "little")
            + b"\x02\x00\x10\x00" + b"data" + data_len.to_bytes(4, "little") + body)
    path = tmp_path_factory.getbasetemp() / "h.wav"
    path.write_bytes(head[: len(head) - cut] if cut < len(head) else head)
    try:
        seconds = ib.wav_duration(path)
    except InputError:
        return
    assert seconds is None or seconds >= 0


# -- the corpus ------------------------------------------------------------------------------------


@dataclass
class Case:
    stem: str
    good: bool | None  # None: either outcome is right (a random sidecar may well be valid)
    make: Callable[[Path, str], None]


def _png(d: Path, name: str, size: tuple[int, int] = (48, 40), mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16)).save(d / name)
    else:
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode).save(d / name)


def _wav(d: Path, name: str, seconds: float = 0.3, seed: int = 0) -> None:
    write_wav(d / name, seconds=seconds, freq=150.0 + seed * 7)


def _pair(stem: str, seed: int) -> Callable[[Path, str], None]:
    def make(d: Path, s: str) -> None:
        _png(d, f"{s}.png", seed=seed)
        _wav(d, f"{s}.wav", seed=seed)
    return make


def _with(image: Callable[[Path, str], None] | None, audio: Callable[[Path, str], None] | None,
          sidecar: str | None = None) -> Callable[[Path, str], None]:
    def make(d: Path, s: str) -> None:
        if image is not None:
            image(d, s)
        if audio is not None:
            audio(d, s)
        if sidecar is not None:
            (d / f"{s}.yaml").write_text(sidecar, encoding="utf-8")
    return make


def _bytes(ext: str, data: bytes) -> Callable[[Path, str], None]:
    return lambda d, s: (d / f"{s}.{ext}").write_bytes(data)


def _good_png(seed: int) -> Callable[[Path, str], None]:
    return lambda d, s: _png(d, f"{s}.png", seed=seed)


def _good_wav(seed: int) -> Callable[[Path, str], None]:
    return lambda d, s: _wav(d, f"{s}.wav", seed=seed)


def _encoded(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _mp4_without_audio() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for _ in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def _animated_png() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _bomb_png() -> bytes:
    data = bytearray(_encoded("PNG", (10, 10)))
    data[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")  # IHDR says 3.6 GP (CRC now wrong)
    return bytes(data)


def corpus(seed: int = 7) -> list[Case]:
    rng = random.Random(seed)
    png, jpg = _encoded("PNG"), _encoded("JPEG")
    wav = wav_bytes(0.3)
    cases = [
        Case("plain", True, _pair("plain", 1)),
        Case("grey16", True, _with(lambda d, s: _png(d, f"{s}.png", mode="I;16", seed=2), _good_wav(2))),
        Case("cmyk", True, _with(_bytes("jpg", _encoded("JPEG", mode="CMYK")), _good_wav(3))),
        Case("piped", True, _with(_good_png(4), _bytes("wav", streaming_wav(0.3)))),
        Case("-dash", True, _pair("-dash", 5)),
        Case("with spaces and ünïcödé", True, _pair("u", 6)),
        Case("é" * 100 + "x" * 51, True, _pair("long", 8)),
        Case("trunc_png", False, _with(_bytes("png", png[: len(png) // 2]), _good_wav(9))),
        Case("trunc_jpg", False, _with(_bytes("jpg", jpg[:200]), _good_wav(10))),
        Case("empty_png", False, _with(_bytes("png", b""), _good_wav(11))),
        Case("text_png", False, _with(_bytes("png", b"hello, I am a portrait\n"), _good_wav(12))),
        Case("strip", False, _with(lambda d, s: _png(d, f"{s}.png", size=(4000, 1)), _good_wav(13))),
        Case("animated", False, _with(_bytes("png", _animated_png()), _good_wav(14))),
        Case("bomb", False, _with(_bytes("png", _bomb_png()), _good_wav(15))),
        Case("text_wav", False, _with(_good_png(16), _bytes("wav", b"RIFF????WAVEnot really audio"))),
        Case("cut_wav", False, _with(_good_png(17), _bytes("wav", wav[:60]))),
        Case("zero_rate", False, _with(_good_png(18), _bytes("wav", wav[:24] + b"\x00\x00\x00\x00" + wav[28:]))),
        Case("mp3_noise", False, _with(_good_png(19), _bytes("mp3", bytes(rng.randrange(256) for _ in range(800))))),
        Case("silent_video", False, _with(_bytes("mp4", _mp4_without_audio()), None)),
        Case("huge_seed", False, _with(_good_png(20), _good_wav(20), "seed: " + "9" * 400 + "\n")),
        Case("alias", False, _with(_good_png(21), _good_wav(21), "a: &a [x]\nb: *a\n")),
        Case("escape", False, _with(_good_png(22), _good_wav(22), "masks: ['../../etc/passwd']\n")),
        Case("not_utf8", False, _with(_good_png(23), _good_wav(23), None)),  # sidecar bytes: below
        Case("two_images", False, lambda d, s: (_pair(s, 24)(d, s), _png(d, f"{s}.jpg", seed=25))),
    ]
    not_utf8 = next(c for c in cases if c.stem == "not_utf8")
    not_utf8.make = lambda d, s: (_pair(s, 23)(d, s), (d / f"{s}.yaml").write_bytes(b"prompt: \xff\xfe\n"))
    for i in range(6):  # seeded random sidecars of the keys people really write
        doc = {rng.choice(_KEYS): rng.choice([rng.randint(-10**6, 10**6), rng.random() * 100, "".join(
            rng.choice(string.printable) for _ in range(rng.randint(0, 30))), None, [1, 2, 3, 4]])
            for _ in range(rng.randint(1, 3))}
        text = yaml.safe_dump(doc)
        cases.append(Case(f"random{i}", None, _with(_good_png(30 + i), _good_wav(30 + i), text)))
    return cases


# -- the run ---------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_daemon_survives_a_hostile_inbox_and_ordinary_faults(tmp_path: Path,
                                                                 procs: list[subprocess.Popen[bytes]]) -> None:
    env = Env(tmp_path, {"watch": {"incomplete_after_s": 2}})
    paths = env.config.paths
    for d in (paths.outbox, paths.failed, paths.archive, paths.state, paths.tmp):
        d.mkdir(parents=True, exist_ok=True)
    eio, full = tmp_path / "eio", tmp_path / "full"
    spec = [{"under": [str(paths.failed)], "flag": str(eio), "errno": "EIO"},
            {"under": [str(paths.outbox), str(paths.archive)], "flag": str(full), "errno": "ENOSPC"}]
    extra = {"FAKE_FAULTS": json.dumps(spec), "FAKE_BUSY_TIMEOUT_S": "0.3"}
    cases = corpus()
    dropped: set[tuple[str, str]] = set()
    rng = random.Random(11)
    exits: list[int] = []
    kills = 0

    def readies() -> int:
        log = tmp_path / "daemon.log"
        return log.read_text(errors="replace").count('"daemon.ready"') if log.exists() else 0

    def start() -> subprocess.Popen[bytes]:
        before = readies()
        p = spawn(env, steps=3, step_s=0.02, extra_env=extra)
        procs.append(p)
        wait_for(lambda: readies() > before or p.poll() is not None, timeout=60, what="the daemon to be ready")
        check_alive(p)
        return p

    def drop(batch: list[Case]) -> None:
        for c in batch:
            staging = tmp_path / "staging"
            staging.mkdir(exist_ok=True)
            c.make(staging, c.stem)
            for f in sorted(staging.iterdir()):
                dropped.add((f.name, _sha(f)))
                os.replace(f, env.inbox / f.name)

    def check_alive(p: subprocess.Popen[bytes]) -> None:
        if p.poll() is not None:
            exits.append(p.returncode)
            raise AssertionError(f"the daemon exited by itself with {p.returncode}")

    def kill9(p: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        nonlocal kills
        check_alive(p)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        kills += 1
        return start()

    p = start()
    thirds = [cases[i::3] for i in range(3)]
    drop(thirds[0])
    eio.touch()  # failed/ on a failing disk while refusals happen
    time.sleep(1.5)
    eio.unlink()
    time.sleep(rng.uniform(0.1, 0.8))
    p = kill9(p)  # kill -9 while refusals and renders are under way
    drop(thirds[1])
    locker = _hold_lock(paths.database, 2.0)  # a backup tool holding the database
    assert locker.wait(30) == 0
    check_alive(p)
    time.sleep(rng.uniform(0.1, 0.8))
    p = kill9(p)
    away = tmp_path / "inbox-away"
    env.inbox.rename(away)  # the share unmounted for a while
    time.sleep(1.5)
    away.rename(env.inbox)
    full.touch()  # the outbox full while the last drops arrive
    drop(thirds[2])
    time.sleep(1.5)
    check_alive(p)
    full.unlink()

    stems = {c.stem for c in cases}

    def settled() -> bool:
        jobs = [j for j in env.jobs() if j.stem in stems]
        done = {j.stem for j in jobs if j.status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)}
        return done == stems

    wait_for(settled, timeout=120, interval=0.2, what="every drop to be handled")
    check_alive(p)
    p.terminate()
    assert p.wait(30) == 0

    jobs = env.jobs()
    by_stem: dict[str, list[Any]] = {}
    for j in jobs:
        by_stem.setdefault(j.stem, []).append(j)

    def right(c: Case) -> bool:
        got = [j.status for j in by_stem.get(c.stem, [])]
        allowed = [[JobStatus.DONE], [JobStatus.FAILED]] if c.good is None else \
            [[JobStatus.DONE if c.good else JobStatus.FAILED]]
        return got in allowed

    wrong = [(c.stem, [(j.status.value, j.error) for j in by_stem.get(c.stem, [])]) for c in cases if not right(c)]
    assert wrong == []
    done = sum(1 for c in cases if by_stem[c.stem][0].status is JobStatus.DONE)
    outbox = sorted(x.name for x in paths.outbox.iterdir() if x.is_file())
    assert len(outbox) == 3 * done  # mp4, json and log once per rendered drop
    assert not any(".1." in n or ".2." in n for n in outbox)
    assert list(paths.tmp.iterdir()) == []
    found = {(f.name, _sha(f)) for root in (env.inbox, paths.archive, paths.failed) for f in root.rglob("*")
             if f.is_file()}
    lost = dropped - found
    assert lost == set()
    report = {"inputs_tried": len(cases), "files_dropped": len(dropped),
              "handled": sum(1 for c in cases if by_stem.get(c.stem)), "lost": len(lost),
              "daemon_exits": len(exits), "kill_9": kills, "done_once": done, "failed_once": len(cases) - done}
    if os.environ.get("ADVERSARIAL_REPORT"):
        Path(os.environ["ADVERSARIAL_REPORT"]).write_text(json.dumps(report, indent=1))


def test_a_fault_at_each_write_degrades_and_recovers(tmp_path: Path) -> None:
    """ENOSPC, EIO and EACCES in turn at every folder the daemon writes, each for a moment while a
    good and a bad drop arrive: the daemon stays up, then renders the good one once and refuses the
    bad one once, and no byte is lost."""
    from tests.daemon import faults

    env = Env(tmp_path)
    paths = env.config.paths
    for d in (paths.outbox, paths.failed, paths.archive, paths.state, paths.tmp, paths.state / "joblogs"):
        d.mkdir(parents=True, exist_ok=True)
    targets = [paths.outbox, paths.tmp, paths.failed, paths.archive, paths.state / "joblogs", paths.state]
    errnos = ["ENOSPC", "EIO", "EACCES"]
    flag = tmp_path / "fault"
    removers = [faults.install({"under": [str(t)], "flag": str(flag) + str(i), "errno": errnos[i % 3]})
                for i, t in enumerate(targets)]
    dropped: set[tuple[str, str]] = set()
    try:
        env.start()
        for i, _target in enumerate(targets):
            flag_i = Path(str(flag) + str(i))
            flag_i.touch()
            env.drop(f"good{i}", color=(i, 99, 1))
            (env.inbox / f"bad{i}.png").write_text("no image\n")
            write_wav(env.inbox / f"bad{i}.wav", freq=300.0 + i)
            for f in env.inbox.iterdir():
                with contextlib.suppress(FileNotFoundError):  # an earlier drop, moved meanwhile (hashed then)
                    dropped.add((f.name, _sha(f)))
            time.sleep(0.8)
            assert env.exit_code is None
            flag_i.unlink()
            env.wait_status(f"good{i}", JobStatus.DONE, timeout=30)
            env.wait_status(f"bad{i}", JobStatus.FAILED, timeout=30)
        assert env.stop() == 0
    finally:
        for r in removers:
            r()
        env.close()
    for i in range(len(targets)):
        assert [j.status for j in env.jobs() if j.stem == f"good{i}"] == [JobStatus.DONE]
        assert [j.status for j in env.jobs() if j.stem == f"bad{i}"] == [JobStatus.FAILED]
    found = {(f.name, _sha(f)) for root in (env.inbox, paths.archive, paths.failed) for f in root.rglob("*")
             if f.is_file()}
    assert dropped - found == set()
