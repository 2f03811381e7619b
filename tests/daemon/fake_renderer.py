"""A test double for the engine (tests only): the real Renderer protocol at no cost.

It decodes its inputs the way a real engine must (Pillow for the image, ``wave`` for WAV speech,
PyAV for anything else) and raises InputError for what it cannot read or what is too long, so bad
inputs fail the way they would in production. It reports progress per "step", honours
``should_stop`` between steps, and writes a small but real H.264 mp4 frame by frame while it runs
(so a kill mid-render leaves a genuinely partial file behind in outbox/.tmp).

Fault injection through the prompt, for the worker's fault paths: ``FAIL:oom``, ``FAIL:device``,
``FAIL:enospc``, ``FAIL:render``, ``FAIL:crash``, ``FAIL:input``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import wave
from pathlib import Path

import av
import numpy as np
from PIL import Image

from engine.api import (
    DeviceFault,
    EngineOptions,
    InputError,
    OutOfMemory,
    Progress,
    ProgressFn,
    RenderError,
    RenderRequest,
    RenderResult,
    RenderStopped,
    StopFn,
)

SIZE = 64
FPS = 25


def _audio_seconds(path: Path) -> float:
    if path.suffix.lower() == ".wav":
        try:
            with wave.open(str(path), "rb") as w:
                # a streaming header (size 0xFFFFFFFF) overstates the length: count what is there,
                # as a real decoder (FFmpeg) does
                block = w.getsampwidth() * w.getnchannels()
                frames = min(w.getnframes(), (path.stat().st_size - 44) // max(1, block))
                if frames <= 0:
                    raise InputError(f"{path.name} has no audio samples")
                return frames / w.getframerate()
        except (wave.Error, EOFError) as exc:
            raise InputError(f"{path.name} cannot be decoded as WAV ({exc})") from None
    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise InputError(f"{path.name} has no audio stream")
            samples = sum(f.samples for f in c.decode(audio=0))
            return samples / (c.streams.audio[0].rate or 16000)
    except av.FFmpegError as exc:
        raise InputError(f"{path.name} cannot be decoded ({exc})") from None


class FakeRenderer:
    chunks = 1  # what its results report (a test of redo sets more: a redo starts at chunk 1 or later)

    def __init__(self, options: EngineOptions, *, steps: int = 4, step_s: float = 0.02,
                 record: Path | None = None) -> None:
        self.options = options
        self.steps = steps
        self.step_s = step_s
        self.record = record
        self.warm = False
        self.renders = 0
        self.resume_options: list[tuple[Path | None, bool, Path | None]] = []  # per render call

    def warmup(self) -> None:
        self.warm = True

    def device_name(self) -> str:
        return "fake device"

    def identity(self) -> str:
        return f"fake-renderer/1 preset={self.options.preset}"

    def _note(self, what: str) -> None:
        if self.record is not None:
            with open(self.record, "a", encoding="utf-8") as f:
                f.write(f"{what} {os.getpid()}\n")

    def render(self, request: RenderRequest, out_path: Path, progress: ProgressFn, should_stop: StopFn, *,
               checkpoint_dir: Path | None = None, keep_all_checkpoints: bool = False,
               base_checkpoint_dir: Path | None = None) -> RenderResult:
        """The resume keywords are accepted and noted (``resume_options``), not acted on: the
        fake has no chunks to resume; the daemon tests check the folders' life cycle, not their content."""
        assert self.warm, "warmup() must run before the first render"
        stem = request.audio[0].stem
        self._note(f"start {stem}")
        if checkpoint_dir is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)  # as the engine does
            (checkpoint_dir / "fake-checkpoint").write_text(f"{request.seed}\n", encoding="utf-8")
        self.resume_options.append((checkpoint_dir, keep_all_checkpoints, base_checkpoint_dir))
        # a stdlib record, as the real engine writes them: it must reach the job's log file too
        logging.getLogger("infinitetalkd.engine").info("fake engine: rendering %s", stem)
        t0 = time.monotonic()
        progress(Progress("prepare", 0, 1, 0, 0, 0.0))
        if request.image is not None:
            try:
                with Image.open(request.image) as im:
                    im.load()
            except OSError as exc:
                raise InputError(f"{request.image.name} cannot be decoded ({exc})") from None
        for a in request.audio:
            seconds = _audio_seconds(a)
            if seconds > request.max_duration_s:
                raise InputError(f"{a.name} is {seconds:.1f} s long, more than max_duration_s")
        fault = request.prompt.removeprefix("FAIL:") if request.prompt.startswith("FAIL:") else ""
        if fault == "oom":
            raise OutOfMemory("CUDA out of memory (fake): tried to allocate 20.00 GiB")
        if fault == "device":
            raise DeviceFault("CUDA error: an illegal memory access was encountered (fake)")
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(out_path))
        if fault == "render":
            raise RenderError("the fake renderer was told to fail")
        if fault == "crash":
            raise ZeroDivisionError("fake bug")
        if fault == "input":
            raise InputError("the fake renderer refused the input")

        open(out_path, "wb").close()  # noqa: SIM115 - through Python's open, where tests inject disk faults
        container = av.open(str(out_path), "w", format="mp4")
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((SIZE, SIZE, 3), np.uint8), format="rgb24")
        try:
            for step in range(1, self.steps + 1):
                if should_stop():
                    raise RenderStopped()
                time.sleep(self.step_s)
                for packet in stream.encode(frame):
                    container.mux(packet)
                progress(Progress("denoise", 1, 1, step, self.steps, step / self.steps))
            for packet in stream.encode(None):
                container.mux(packet)
        finally:
            container.close()
        self.renders += 1
        self._note(f"done {stem}")
        return RenderResult(frames=self.steps, fps=FPS, width=SIZE, height=SIZE, duration_s=self.steps / FPS,
                            chunks=self.chunks, seed=request.seed, timings={"denoise_s": time.monotonic() - t0},
                            model_files={"dit": "fake-dit.safetensors"})
