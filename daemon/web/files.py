"""Files the web process reads: outbox results, failed jobs' logs, poster frames.

Every file is opened relative to an open folder with ``O_NOFOLLOW`` from a name that must be one
plain path component, so no ``..``, absolute path, encoded slash or symlink reaches outside the
folder, and a folder is never listed. Responses are streamed from the already-open descriptor
(with single byte ranges, which ``<video>`` uses to seek), so the file checked is the file sent.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from starlette.responses import Response, StreamingResponse

__all__ = ["safe_name", "open_in", "file_response", "read_tail", "failure_log", "poster"]

_CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MEDIA_TYPES = {"mp4": "video/mp4", "json": "application/json", "log": "text/plain; charset=utf-8",
               "jpg": "image/jpeg"}


def safe_name(name: str, exts: tuple[str, ...]) -> bool:
    """One visible file name with one of ``exts``: no separators, no NUL, not hidden, not '..'."""
    return (0 < len(name.encode("utf-8", "surrogateescape")) <= 255 and "/" not in name and "\\" not in name
            and "\0" not in name and not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in exts)


def open_in(folder: Path, name: str) -> tuple[int, os.stat_result] | None:
    """An open descriptor for the regular file ``folder/name`` (a symlink, folder or device: None)."""
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def _stream(fd: int, start: int, length: int) -> Iterator[bytes]:
    try:
        pos, end = start, start + length
        while pos < end:
            data = os.pread(fd, min(_CHUNK, end - pos), pos)
            if not data:
                break
            pos += len(data)
            yield data
    finally:
        os.close(fd)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """(start, length) for one satisfiable range, None for no (or an unsupported) Range header,
    False for an unsatisfiable one."""
    m = _RANGE.match(header.strip()) if header else None
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or end < start:
        return False
    return start, end - start + 1


def file_response(fd: int, st: os.stat_result, name: str, range_header: str | None) -> Response:
    """Stream an open file (closing it when done), honouring one ``Range: bytes=`` range."""
    ext = name.rsplit(".", 1)[-1].lower()
    size = st.st_size
    headers = {"accept-ranges": "bytes", "x-content-type-options": "nosniff",
               "content-disposition": "inline; filename*=UTF-8''" + _quote(name),
               "last-modified": _http_date(st.st_mtime)}
    rng = _byte_range(range_header, size)
    if rng is False:
        os.close(fd)
        return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
    start, length = rng if isinstance(rng, tuple) else (0, size)
    headers["content-length"] = str(length)
    status = 200
    if isinstance(rng, tuple):
        status = 206
        headers["content-range"] = f"bytes {start}-{start + length - 1}/{size}"
    return StreamingResponse(_stream(fd, start, length), status_code=status, headers=headers,
                             media_type=MEDIA_TYPES.get(ext, "application/octet-stream"))


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _http_date(ts: float) -> str:
    from email.utils import formatdate

    return formatdate(ts, usegmt=True)


def read_tail(fd: int, st: os.stat_result, limit: int = 256 * 1024) -> str:
    """The last ``limit`` bytes of an open text file (then closed), decoded leniently."""
    try:
        start = max(0, st.st_size - limit)
        data = os.pread(fd, st.st_size - start, start)
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")


def failure_log(failed_root: Path, failed_dir: str, stem: str) -> tuple[int, os.stat_result] | None:
    """``failed/<dir>/<stem>.log`` of a failed job: the folder the database names must be a real
    folder directly inside ``failed_root`` (paths.failed)."""
    d = Path(failed_dir)
    if d.parent.resolve() != failed_root.resolve() or not safe_name(f"{stem}.log", ("log",)):
        return None
    try:
        if stat.S_ISLNK(os.lstat(d).st_mode):
            return None
    except OSError:
        return None
    return open_in(d, f"{stem}.log")


def poster(cache: Path, key: str, fd: int) -> Path | None:
    """A JPEG of the video's first frame, made once per ``key`` by a short-lived child process
    (PyAV stays out of this long-running process, and a hostile file cannot take it down).
    ``fd`` is the open mp4; it is closed here."""
    out = cache / f"{key}.jpg"
    try:
        if out.exists():
            return out
        cache.mkdir(parents=True, exist_ok=True)
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            done = subprocess.run([sys.executable, "-m", "daemon.web.poster"], stdin=fd, capture_output=True,
                                  timeout=30, check=False)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0 or not done.stdout.startswith(b"\xff\xd8"):
            return None
        tmp = cache / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(done.stdout)
        os.replace(tmp, out)
        return out
    finally:
        os.close(fd)
