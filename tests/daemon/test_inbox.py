"""The inbox contract's pure parts: names, grouping, stability, sidecar parsing, checks, fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import inbox as ib
from engine.api import InputError
from tests.conftest import png_header_only
from tests.daemon.conftest import write_png, write_wav

LIMITS = ib.Limits(max_input_bytes=2**20, max_sidecar_bytes=4096, max_image_pixels=1_000_000)


@pytest.mark.parametrize("name", [
    ".hidden.png", "._alice.png", ".alice.wav.Xy12Ab", "alice.png.part", "alice.wav.crdownload", "alice.png.tmp",
    "alice.wav~", "~$alice.yaml", "@eaDir", "desktop.ini", "Thumbs.db", "alice.wav.partial", "alice.png.download",
    "~syncthing~alice.png.tmp", ".syncthing.alice.png.tmp", "alice-TdarrCacheFile-x.wav", "alice.mp4.filepart",
])
def test_temporary_and_hidden_names_are_ignored(name: str) -> None:
    assert ib.is_ignored(name)
    assert ib.split_name(name) is None


def test_split_name() -> None:
    assert ib.split_name("Alice Smith.PNG") == ("Alice Smith", "png")
    assert ib.split_name("a.b.wav") == ("a.b", "wav")
    assert ib.split_name("notes.txt") is None
    assert ib.split_name("README") is None


def _group(*names: str) -> ib.Group:
    groups = ib.group_entries(ib.Entry(n, 1, 1, "file") for n in names)
    assert len(groups) == 1
    return next(iter(groups.values()))


def test_parts_and_collisions() -> None:
    p = ib.parts_of(_group("a.png", "a.wav", "a.yaml", "a.ready"))
    assert (p.image, p.audio, p.sidecar, p.marker, p.problem, p.missing) == ("a.png", "a.wav", "a.yaml", "a.ready",
                                                                              None, ())
    assert "several portrait images" in (ib.parts_of(_group("a.png", "a.jpg", "a.wav")).problem or "")
    assert "several speech files" in (ib.parts_of(_group("a.png", "a.wav", "a.mp3")).problem or "")
    assert "both an image and a video" in (ib.parts_of(_group("a.png", "a.mp4", "a.wav")).problem or "")
    assert len(ib.parts_of(_group("a.yaml")).missing) == 2
    assert ib.parts_of(_group("a.mp4", "a.wav")).video == "a.mp4"


def test_stability_tracker() -> None:
    t = ib.StabilityTracker()
    assert t.observe("a", (1,), now=10.0) == 0.0
    assert t.observe("a", (1,), now=12.5) == 2.5
    assert t.observe("a", (2,), now=13.0) == 0.0  # any change restarts the clock
    assert t.observe("a", (2,), now=14.0) == 1.0
    t.keep_only(["b"])
    assert t.observe("a", (2,), now=15.0) == 0.0


def sidecar(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_sidecar_parsing(tmp_path: Path) -> None:
    assert ib.load_sidecar(sidecar(tmp_path, "seed: 3\nprompt: hi\n"), 4096) == {"seed": 3, "prompt": "hi"}
    assert ib.load_sidecar(sidecar(tmp_path, ""), 4096) == {}
    assert ib.load_sidecar(sidecar(tmp_path, "a: &x 1\n"), 4096) == {"a": 1}  # anchors alone are harmless


@pytest.mark.parametrize(("text", "message"), [
    ("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n", "aliases"),
    ("seed: [1, 2\n", "YAML error at line"),
    ("- a\n- b\n", "must be a mapping"),
    ("seed: !!python/object/apply:os.system ['true']\n", "YAML error"),
    ("1: x\n", "setting names must be text"),
    ("x" * 5000, "more than the limit"),
    ("[" * 2000 + "]" * 2000, "YAML error"),
])
def test_bad_sidecars(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ib.load_sidecar(sidecar(tmp_path, text), 4096)


def test_sidecar_must_be_utf8(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_bytes(b"prompt: \xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        ib.load_sidecar(p, 4096)


@pytest.mark.parametrize("name", ["../x.wav", "/etc/passwd", "a/b.wav", "..", ".", "", ".hidden.wav", "a\\b.wav",
                                  "a\0.wav", "x" * 300])
def test_only_bare_names(name: str) -> None:
    with pytest.raises(InputError, match="bare file name"):
        ib.check_bare_name("audio2", name)


def test_check_file(tmp_path: Path) -> None:
    real = write_wav(tmp_path / "real.wav")
    link = tmp_path / "link.wav"
    link.symlink_to(real)
    with pytest.raises(InputError, match="symbolic link"):
        ib.check_file(link, max_bytes=2**20)
    (tmp_path / "empty.wav").touch()
    with pytest.raises(InputError, match="empty"):
        ib.check_file(tmp_path / "empty.wav", max_bytes=2**20)
    with pytest.raises(InputError, match="more than the limit"):
        ib.check_file(real, max_bytes=100)
    with pytest.raises(InputError, match="not found"):
        ib.check_file(tmp_path / "gone.wav", max_bytes=2**20)
    assert ib.check_file(real, max_bytes=2**20).st_size == real.stat().st_size


def test_image_checks(tmp_path: Path) -> None:
    assert ib.check_image(write_png(tmp_path / "ok.png", (40, 30)), 10_000) == (40, 30)
    with pytest.raises(InputError, match="more than jobs.max_image_pixels"):
        ib.check_image(write_png(tmp_path / "big.png", (200, 100)), 10_000)
    with pytest.raises(InputError, match="decompression bomb|more than jobs.max_image_pixels"):
        ib.check_image(png_header_only(tmp_path / "bomb.png", 100_000, 100_000), 10_000_000_000)
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    with pytest.raises(InputError, match="look like text"):
        ib.check_image(tmp_path / "text.png", 10_000)
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="not a readable PNG"):
        ib.check_image(tmp_path / "cut.png", 10_000)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "gif.png", format="GIF")  # a GIF named .png
    with pytest.raises(InputError, match="not a .png file"):
        ib.check_image(tmp_path / "gif.png", 10_000)


def test_audio_checks(tmp_path: Path) -> None:
    assert ib.check_audio(write_wav(tmp_path / "a.wav", seconds=1.5)) == pytest.approx(1.5)
    (tmp_path / "t.wav").write_text("ffconcat version 1.0\nfile other.wav\n")  # docs/daemon.md §7
    with pytest.raises(InputError, match="look like text"):
        ib.check_audio(tmp_path / "t.wav")
    (tmp_path / "flac.wav").write_bytes(b"fLaC" + bytes(60))
    with pytest.raises(InputError, match="not a .wav file"):
        ib.check_audio(tmp_path / "flac.wav")
    (tmp_path / "b.flac").write_bytes(b"fLaC" + bytes(60))
    assert ib.check_audio(tmp_path / "b.flac") is None  # decoded (and refused) by the renderer


def _prepared(inbox: Path, stem: str, settings: str | None = None, identity: str = "e1") -> ib.Prepared:
    names = [f"{stem}.png", f"{stem}.wav"] + ([f"{stem}.yaml"] if settings is not None else [])
    if settings is not None:
        (inbox / f"{stem}.yaml").write_text(settings, encoding="utf-8")
    groups = ib.group_entries(ib.list_inbox(inbox))
    assert sorted(groups[stem].entries) == sorted(names)
    return ib.prepare(inbox, stem, ib.parts_of(groups[stem]), defaults={}, identity=identity, limits=LIMITS)


def test_fingerprint_follows_content_params_and_engine_not_names(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        write_png(tmp_path / f"{stem}.png")
        write_wav(tmp_path / f"{stem}.wav")
    a = _prepared(tmp_path, "a")
    assert _prepared(tmp_path, "b").fingerprint == a.fingerprint  # renamed copy: same job
    assert _prepared(tmp_path, "a", "# a comment only\n").fingerprint == a.fingerprint
    assert _prepared(tmp_path, "a", "seed: 43\n").fingerprint != a.fingerprint
    (tmp_path / "a.yaml").unlink()
    assert _prepared(tmp_path, "a", identity="e2").fingerprint != a.fingerprint
    write_wav(tmp_path / "a.wav", freq=330.0)
    assert _prepared(tmp_path, "a").fingerprint != a.fingerprint
    assert {i["role"] for i in a.inputs} == {"image", "audio"}
    assert all(len(str(i["sha256"])) == 64 for i in a.inputs)


def test_prepare_resolves_sidecar_names_inside_the_inbox(tmp_path: Path) -> None:
    write_png(tmp_path / "duo.png")
    write_wav(tmp_path / "duo.wav")
    write_wav(tmp_path / "second.wav")
    p = _prepared(tmp_path, "duo", "audio2: second.wav\nprompt: two people\n")
    assert p.request.audio == (tmp_path / "duo.wav", tmp_path / "second.wav")
    assert {i["role"] for i in p.inputs} == {"image", "audio", "audio2", "sidecar"}
    with pytest.raises(InputError, match="bare file name"):
        _prepared(tmp_path, "duo", "audio2: ../duo.wav\n")
    with pytest.raises(InputError, match="already one of the job's own files"):
        _prepared(tmp_path, "duo", "audio2: duo.wav\n")
    with pytest.raises(InputError, match="more than max_duration_s"):
        _prepared(tmp_path, "duo", "max_duration_s: 0.2\n")
