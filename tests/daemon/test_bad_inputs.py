"""A hostile inbox: every kind of bad drop ends in failed/<stem>/ with a one-line reason, and the
daemon goes on to render the good jobs dropped at the same time.

One daemon run handles all cases (module fixture); each case is then checked as its own test.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from daemon.jobs import Job, JobStatus
from tests.daemon.conftest import Env, wait_for, write_png, write_wav
from tests.daemon.test_inbox import png_header_only

ALIAS_BOMB = "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9))
ALIAS_BOMB = "l0: &l0 [lol]\n" + ALIAS_BOMB


def pair(inbox: Path, stem: str, *, image: bool = True, audio: bool = True, seconds: float = 0.4) -> None:
    if image:
        write_png(inbox / f"{stem}.png", color=(hash(stem) % 255, 40, 90))
    if audio:
        write_wav(inbox / f"{stem}.wav", seconds=seconds, freq=200 + hash(stem) % 300)


def side(inbox: Path, stem: str, doc: object) -> None:
    (inbox / f"{stem}.yaml").write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")


def corrupt_png(inbox: Path) -> None:
    pair(inbox, "corrupt_png", image=False)
    good = write_png(inbox / "tmp_source.png.part", (64, 64)).read_bytes()
    os.unlink(inbox / "tmp_source.png.part")
    (inbox / "corrupt_png.png").write_bytes(good[:40] + b"\x00" * 30)


def text_png(inbox: Path) -> None:
    pair(inbox, "text_png", image=False)
    (inbox / "text_png.png").write_text("this is a text file pretending to be a portrait\n")


def missing_audio(inbox: Path) -> None:
    pair(inbox, "missing_audio", audio=False)
    side(inbox, "missing_audio", {"seed": 1})


def missing_audio2(inbox: Path) -> None:
    pair(inbox, "missing_audio2")
    side(inbox, "missing_audio2", {"audio2": "nobody.wav"})


def yaml_syntax(inbox: Path) -> None:
    pair(inbox, "yaml_syntax")
    side(inbox, "yaml_syntax", "seed: [1, 2\nprompt: hello\n")


def unknown_key(inbox: Path) -> None:
    pair(inbox, "unknown_key")
    side(inbox, "unknown_key", {"sed": 3})


def wrong_type(inbox: Path) -> None:
    pair(inbox, "wrong_type")
    side(inbox, "wrong_type", {"seed": "forty-two"})


def dotdot(inbox: Path) -> None:
    pair(inbox, "dotdot")
    write_wav(inbox.parent / "secret.wav")
    side(inbox, "dotdot", {"audio2": "../secret.wav"})


def absolute(inbox: Path) -> None:
    pair(inbox, "absolute")
    side(inbox, "absolute", {"masks": ["/etc/passwd"]})


def symlink(inbox: Path) -> None:
    pair(inbox, "symlink", audio=False)
    (inbox / "symlink.wav").symlink_to(write_wav(inbox.parent / "elsewhere.wav"))


def pixel_bomb(inbox: Path) -> None:
    pair(inbox, "pixel_bomb", image=False)
    png_header_only(inbox / "pixel_bomb.png", 100_000, 100_000)


def too_many_pixels(inbox: Path) -> None:
    pair(inbox, "too_many_pixels", image=False)
    write_png(inbox / "too_many_pixels.png", (300, 300))


def alias_bomb(inbox: Path) -> None:
    pair(inbox, "alias_bomb")
    side(inbox, "alias_bomb", ALIAS_BOMB)


def too_long(inbox: Path) -> None:
    pair(inbox, "too_long", seconds=2.0)
    side(inbox, "too_long", {"max_duration_s": 1.0})


def empty_audio(inbox: Path) -> None:
    pair(inbox, "empty_audio", audio=False)
    (inbox / "empty_audio.wav").touch()


def empty_image(inbox: Path) -> None:
    pair(inbox, "empty_image", image=False)
    (inbox / "empty_image.png").touch()


def unreadable(inbox: Path) -> None:
    pair(inbox, "unreadable")
    os.chmod(inbox / "unreadable.wav", 0)


def collision(inbox: Path) -> None:
    pair(inbox, "collision")
    write_png(inbox / "collision.jpg")


def image_and_video(inbox: Path) -> None:
    pair(inbox, "image_and_video")
    (inbox / "image_and_video.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))


def fifo(inbox: Path) -> None:
    pair(inbox, "fifo", audio=False)
    os.mkfifo(inbox / "fifo.wav")


def text_wav(inbox: Path) -> None:
    pair(inbox, "text_wav", audio=False)
    (inbox / "text_wav.wav").write_text("ffconcat version 1.0\nfile ../secret.wav\n")


def not_a_mapping(inbox: Path) -> None:
    pair(inbox, "not_a_mapping")
    side(inbox, "not_a_mapping", "- seed\n- 3\n")


def python_tag(inbox: Path) -> None:
    pair(inbox, "python_tag")
    side(inbox, "python_tag", "seed: !!python/object/apply:os.system ['touch /tmp/pwned']\n")


def big_sidecar(inbox: Path) -> None:
    pair(inbox, "big_sidecar")
    side(inbox, "big_sidecar", "prompt: " + "x" * 70_000 + "\n")


def broken_wav(inbox: Path) -> None:
    pair(inbox, "broken_wav", audio=False)
    (inbox / "broken_wav.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(40))


def undecodable_flac(inbox: Path) -> None:
    pair(inbox, "undecodable_flac", audio=False)
    (inbox / "undecodable_flac.flac").write_bytes(b"fLaC" + os.urandom(200))


def boxes_mismatch(inbox: Path) -> None:
    pair(inbox, "boxes_mismatch")
    side(inbox, "boxes_mismatch", {"boxes": [[0, 0, 10, 10], [10, 10, 20, 20]]})


def bad_window(inbox: Path) -> None:
    pair(inbox, "bad_window")
    side(inbox, "bad_window", {"frame_window": 80})


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], None]
    reason: str  # a substring of the one-line reason

    @property
    def stem(self) -> str:
        return self.make.__name__


CASES = [
    Case(corrupt_png, "not a readable PNG, JPEG or WebP image"),
    Case(text_png, "text_png.png is not a .png file (its first bytes look like text)"),
    Case(missing_audio, "is missing a speech file"),
    Case(missing_audio2, "is missing nobody.wav (named in the sidecar)"),
    Case(yaml_syntax, "yaml_syntax.yaml: YAML error at line"),
    Case(unknown_key, "unknown setting 'sed'"),
    Case(wrong_type, "setting 'seed': must be a whole number"),
    Case(dotdot, "setting 'audio2': '../secret.wav' must be a bare file name"),
    Case(absolute, "setting 'masks': '/etc/passwd' must be a bare file name"),
    Case(symlink, "symlink.wav is a symbolic link"),
    Case(pixel_bomb, "pixel_bomb.png has too many pixels"),
    Case(too_many_pixels, "more than jobs.max_image_pixels"),
    Case(alias_bomb, "aliases (*name) are not allowed"),
    Case(too_long, "too_long.wav is 2.0 s long, more than max_duration_s"),
    Case(empty_audio, "empty_audio.wav is empty (0 bytes)"),
    Case(empty_image, "empty_image.png is empty (0 bytes)"),
    Case(unreadable, "unreadable.wav cannot be read (permission denied)"),
    Case(collision, "has several portrait images (collision.jpg, collision.png)"),
    Case(image_and_video, "has both an image and a video"),
    Case(fifo, "fifo.wav is not a regular file"),
    Case(text_wav, "text_wav.wav is not a .wav file (its first bytes look like text)"),
    Case(not_a_mapping, "must be a mapping of setting: value lines"),
    Case(python_tag, "python_tag.yaml: YAML error"),
    Case(big_sidecar, "big_sidecar.yaml is 68.4 KiB, more than the limit of 64.0 KiB"),
    Case(broken_wav, "broken_wav.wav is not a readable WAV file"),
    Case(undecodable_flac, "undecodable_flac.flac cannot be decoded"),
    Case(boxes_mismatch, "'boxes' gives 2 boxes but the job has 1 speakers"),
    Case(bad_window, "setting 'frame_window': must be 4n+1"),
]
ROOT = os.geteuid() == 0  # root reads any file: the unreadable case cannot be set up


@dataclass
class Run:
    env: Env
    jobs: dict[str, Job]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    env = Env(tmp_path_factory.mktemp("hostile"), {
        "watch": {"incomplete_after_s": 1.0},
        "jobs": {"max_image_pixels": 50_000},
    })
    for case in CASES:
        if not (ROOT and case.make is unreadable):
            case.make(env.inbox)
    pair(env.inbox, "good_one")
    pair(env.inbox, "good_two")
    side(env.inbox, "good_two", {"seed": 9, "prompt": "a calm speaker"})
    threads_before = set(threading.enumerate())
    env.start()
    expected = {c.stem for c in CASES if not (ROOT and c.make is unreadable)} | {"good_one", "good_two"}

    def settled() -> bool:
        jobs = {j.stem: j for j in env.jobs()}
        return expected <= set(jobs) and all(j.status in (JobStatus.DONE, JobStatus.FAILED) for j in jobs.values())

    wait_for(settled, timeout=30, what="every drop to be rendered or refused")
    assert env.stop() == 0
    jobs = {j.stem: j for j in env.jobs()}
    yield Run(env, jobs)
    env.close()
    assert not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_drop_ends_in_failed_with_a_one_line_reason(run: Run, case: Case) -> None:
    if ROOT and case.make is unreadable:
        pytest.skip("running as root: every file is readable")
    job = run.jobs[case.stem]
    assert job.status is JobStatus.FAILED
    assert case.reason in (job.error or ""), job.error
    folder = run.env.failed / case.stem
    assert job.failed_dir == str(folder)
    error = (folder / "error.txt").read_text()
    assert error.count("\n") == 1 and error.strip() == job.error
    assert case.reason in (folder / f"{case.stem}.log").read_text()
    moved = {p.name for p in folder.iterdir()} - {"error.txt", f"{case.stem}.log"}
    assert moved and all(name.startswith(case.stem) for name in moved)


def test_the_good_jobs_dropped_alongside_were_rendered(run: Run) -> None:
    assert len(CASES) >= 15
    for stem in ("good_one", "good_two"):
        assert run.jobs[stem].status is JobStatus.DONE
        assert (run.env.outbox / f"{stem}.mp4").stat().st_size > 0
    # nothing is left behind in the inbox but the files of nobody's job
    assert sorted(p.name for p in run.env.inbox.iterdir()) == []
    assert not (run.env.root / "pwned").exists() and not Path("/tmp/pwned").exists()
