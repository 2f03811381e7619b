"""Writing the output video: H.264 (libx264, yuv420p, BT.709 tags) + AAC in an mp4 with the index at the front
(``+faststart``), frame by frame, optionally in a background thread. (Split from engine/media.py, which reads the
user's media; engine.media re-exports :class:`VideoWriter`.)
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np

from engine.api import RenderError

__all__ = ["FPS", "WRITER_THREAD_NAME", "VideoWriter", "fit_full_scale", "join_segments"]

FPS = 25
WRITER_THREAD_NAME = "infinitetalkd-mp4-writer"
_POLL_S = 0.1  # how often a blocked hand-over re-checks that the worker is still alive


class VideoWriter:
    """Stream RGB frames into an H.264 + AAC mp4.

    libx264, yuv420p, constant-quality ``crf``, ``fps`` frames per second, BT.709 limited-range
    conversion and tags, ``+faststart`` (index before the data, so browsers start playing at
    once). ``audio`` (mono float32 at ``audio_rate``) is muxed alongside the frames as they are
    written and on :meth:`close` trimmed or padded with silence to exactly the video's
    duration; a track that exceeds full scale is scaled down as a whole rather than clipped.
    Memory does not grow with the length: each :meth:`write` is encoded immediately.

    ``background=True`` moves the encoding (RGB->yuv420p, x264, AAC, muxing) to one daemon thread
    named :data:`WRITER_THREAD_NAME`, so the caller can go on with the next chunk on the GPU:
    :meth:`write` checks the array, hands it over through a queue of one chunk and returns (it
    blocks only while the worker is still busy with the chunk before the queued one, so at most
    three chunks are alive: the caller's next one, the queued one, the one being encoded). The
    array then belongs to the writer: do not modify it after :meth:`write` returns. The output is
    the same as in the foreground. A failure in the worker is re-raised, as the original exception,
    by every later :meth:`write` and by :meth:`close`. ``frames_written`` counts frames encoded so
    far, so in background mode it lags the frames handed over until :meth:`close` (or
    :meth:`abort`) has joined the worker; after :meth:`close` it is exact. :meth:`close`,
    :meth:`abort` and ``__exit__`` always join the worker. The writer is used from one thread.

    Why a thread helps: PyAV 18.1 releases the GIL around the heavy calls (read in its installed
    sources): ``avcodec_send_frame`` / ``avcodec_receive_packet`` (``with cython.nogil`` in
    ``_send_frame_and_recv`` / ``_recv_packet``, av/codec/context.py), ``sws_scale_frame``
    (``VideoReformatter.reformat``, av/video/reformatter.py) and ``av_interleaved_write_frame``
    (``OutputContainer.mux_one``, av/container/output.py). Only ``VideoFrame.from_ndarray``'s copy
    (``array.tobytes()`` + a memcpy into the plane) runs under the GIL: two copies of 2.8 MB per 960x960 frame, roughly
    50-100 ms per 81-frame chunk (estimated, not measured).
    """

    def __init__(self, path: Path, *, width: int, height: int, fps: int = FPS, crf: int = 18,
                 audio: np.ndarray | None = None, audio_rate: int = 16000, background: bool = False) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even for yuv420p, got {width}x{height}")
        if "libx264" not in av.codecs_available:
            raise RenderError("this PyAV build has no libx264 encoder; install the PyPI 'av' wheel, which bundles "
                              "it (pip install --force-reinstall av)")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.frames_written = 0
        self.encode_s = 0.0  # wall seconds spent encoding and flushing, in whichever thread did it
        self._closed = False  # no more writes; the container may still be open while a worker runs
        # background mode: the worker, its queue (None = stop), a "discard the rest" flag, its failure
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=1)
        self._drop = threading.Event()
        self._error: BaseException | None = None
        self._container = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            v = self._container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
            v.width, v.height, v.pix_fmt = width, height, "yuv420p"
            cc = v.codec_context
            cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = 1, 1, 1, 1  # BT.709, limited
            self._video = v
            self._audio_stream: Any = None
            self._audio: np.ndarray | None = None
            self._audio_pos = 0  # samples sent to the encoder
            self._audio_rate = audio_rate
            if audio is not None:
                a = np.asarray(audio, dtype=np.float32).reshape(-1)
                if not np.isfinite(a).all():
                    raise ValueError("audio contains NaN or infinite samples")
                self._audio = fit_full_scale(a).astype(np.float32)
                s = self._container.add_stream("aac", rate=audio_rate, layout="mono")
                s.bit_rate = 96_000
                self._audio_stream = s
            if background:
                thread = threading.Thread(target=self._worker, name=WRITER_THREAD_NAME, daemon=True)
                thread.start()
                self._thread = thread
        except BaseException:
            self._container.close()
            raise

    def _send_audio(self, end: int) -> None:
        """Encode audio samples [pos, end), silence past the end of the track."""
        if self._audio_stream is None or end <= self._audio_pos:
            return
        assert self._audio is not None
        chunk = np.zeros(end - self._audio_pos, dtype=np.float32)
        have = self._audio[self._audio_pos:end]
        chunk[:have.size] = have
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = self._audio_rate
        frame.pts = self._audio_pos
        self._audio_pos = end
        for packet in self._audio_stream.encode(frame):
            self._container.mux(packet)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        """Adds the wall time of the block to ``encode_s`` (in whichever thread encodes)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.encode_s += time.perf_counter() - t0

    def _encode(self, frames: np.ndarray) -> None:
        """Encode checked ``[N, H, W, 3]`` uint8 frames, audio interleaved; stops early once ``_drop`` is set."""
        with self._timed():
            self._encode_frames(frames)

    def _encode_frames(self, frames: np.ndarray) -> None:
        for img in frames:
            if self._drop.is_set():  # abort: leave the rest of the chunk unencoded
                return
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            vf.pts = self.frames_written
            for packet in self._video.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1
            # Keep audio interleaved with the video: send it up to the end of this frame.
            self._send_audio(self.frames_written * self._audio_rate // self.fps)

    def _worker(self) -> None:
        """Background mode: encode queued chunks in order until the stop marker; keep the first failure."""
        while True:
            frames = self._queue.get()
            if frames is None:
                return
            if not self._drop.is_set():
                try:
                    self._encode(frames)
                except BaseException as e:  # handed to the caller's thread by write()/close()
                    self._error = e
                    return
            del frames  # do not hold a chunk while waiting for the next one

    def _hand_over(self, item: np.ndarray | None) -> bool:
        """Queue ``item`` for the worker; False (nothing queued) once the worker has failed or exited.

        A plain blocking put would hang forever if the worker died while the queue is full, so the
        put waits in short slices and re-checks the worker between them."""
        assert self._thread is not None
        while self._error is None and self._thread.is_alive():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def _stop_worker(self, *, drop: bool) -> None:
        """Join the worker after it has encoded what is queued (``drop=False``) or discarded it."""
        thread = self._thread
        if thread is None:
            return
        if drop:
            self._drop.set()  # also stops the chunk being encoded, between two frames
            self._drain()
        self._hand_over(None)
        thread.join()
        self._thread = None
        self._drain()  # a chunk queued behind a failed worker

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, frames: np.ndarray) -> None:
        """Encode ``[N, H, W, 3]`` (or one ``[H, W, 3]``) uint8 RGB frames (background mode: queue them)."""
        if self._closed:
            raise RuntimeError("VideoWriter is closed")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"expected [N, {self.height}, {self.width}, 3] uint8 frames, got "
                             f"{frames.shape} {frames.dtype}")
        if self._thread is None:
            self._encode(frames)
        elif not self._hand_over(frames):
            self._raise_worker_error()
            raise RuntimeError("the mp4 writer thread stopped unexpectedly")

    def _flush(self) -> None:
        with self._timed():
            for packet in self._video.encode(None):
                self._container.mux(packet)
            if self._audio_stream is not None:
                self._send_audio(round(self.frames_written * self._audio_rate / self.fps))
                for packet in self._audio_stream.encode(None):
                    self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoders, finish the audio at exactly the video duration, write the index.

        Background mode: first waits for the queued frames to be encoded and joins the worker;
        a worker failure is raised here (the container is closed, the partial file left)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_worker(drop=False)
            self._raise_worker_error()
            self._flush()
        finally:
            if self._thread is None:  # never close the container under a running worker
                self._container.close()

    def abort(self) -> None:
        """Stop without finishing: drop queued frames, join the worker, close, remove the partial file."""
        self._closed = True
        self._stop_worker(drop=True)
        with contextlib.suppress(Exception):  # the file is being discarded anyway (closing twice is a no-op)
            self._container.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # do not let a flush error hide the original one; the partial file is the caller's
            self._closed = True
            self._stop_worker(drop=True)
            with contextlib.suppress(av.FFmpegError, OSError):
                self._container.close()


def fit_full_scale(x: np.ndarray, peak: float = 0.999) -> np.ndarray:
    """Scale the whole track down when its peak exceeds ``peak`` (no clipping, no change otherwise)."""
    top = float(np.max(np.abs(x), initial=0.0))
    return x * (peak / top) if top > peak else x


def join_segments(segments: list[Path], out_path: Path, *, audio: np.ndarray | None = None,
                  audio_rate: int = 16000) -> int:
    """Join closed H.264 mp4 segments (written by :class:`VideoWriter` with the same size, fps and crf) into one
    ``+faststart`` mp4 without re-encoding: the video packets are copied, their timestamps shifted by the frames
    before them, and the audio (mono float32 at ``audio_rate``) is encoded once, interleaved segment by segment
    and trimmed or padded with silence to exactly the video's duration. Every segment starts with a keyframe (a
    fresh encoder), so the copied stream decodes to the segments' frames. Returns the frames written."""
    if not segments:
        raise ValueError("no segments to join")
    track = None if audio is None else fit_full_scale(np.asarray(audio, dtype=np.float32).reshape(-1))
    frames = 0
    sent = 0  # audio samples encoded
    with av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        v_out: Any = None
        a_out: Any = None
        fps = FPS
        for seg in segments:
            with av.open(str(seg)) as src:
                v_in = src.streams.video[0]
                if v_out is None:
                    v_out = out.add_stream_from_template(v_in)
                    fps = int(v_in.average_rate or FPS)
                    if track is not None:
                        a_out = out.add_stream("aac", rate=audio_rate, layout="mono")
                        a_out.bit_rate = 96_000
                tb = v_in.time_base
                assert tb is not None
                step = round(1 / (fps * tb))  # one frame in the segment's time base
                shift = frames * step
                n = 0
                for packet in src.demux(v_in):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.pts = None if packet.pts is None else packet.pts + shift
                    packet.dts += shift
                    packet.stream = v_out
                    out.mux(packet)
                    n += 1
                frames += n
            if a_out is not None and track is not None:
                end = frames * audio_rate // fps
                sent = _encode_audio(out, a_out, track, sent, end, audio_rate)
        if a_out is not None and track is not None:
            _encode_audio(out, a_out, track, sent, round(frames * audio_rate / fps), audio_rate)
            for packet in a_out.encode(None):
                out.mux(packet)
    return frames


def _encode_audio(out: Any, stream: Any, track: np.ndarray, start: int, end: int, rate: int) -> int:
    """Encode samples [start, end) of ``track`` (silence past its end) into ``stream``; returns ``end``."""
    if end <= start:
        return start
    chunk = np.zeros(end - start, dtype=np.float32)
    have = track[start:end]
    chunk[:have.size] = have
    frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
    frame.sample_rate = rate
    frame.pts = start
    for packet in stream.encode(frame):
        out.mux(packet)
    return end
