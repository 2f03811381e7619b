"""Fault injection at the filesystem boundary (tests only): writes under chosen folders fail with an
errno while a flag file exists, as on a full, failing or read-only disk.

    spec = {"under": ["/x/outbox", "/x/failed"], "flag": "/x/full", "errno": "ENOSPC",
            "crash_after_publish": "/x/outbox", "crash_before_mkdir": "/x/failed"}

- every write the daemon can make under ``under`` (open for writing, os.open with write flags,
  mkdir, rename/replace/link into it, logging file handlers) raises ``OSError(errno)`` while
  ``flag`` exists, and ``shutil.disk_usage`` reports 0 bytes free there;
- ``crash_after_publish``: the process dies (``os._exit(137)``, as kill -9) right after the first
  rename into that folder, once (the flag file ``<flag>.crashed`` records that it happened);
- ``crash_before_mkdir``: the same, right before the first folder is made inside that folder (for
  failed/: after the database recorded a refusal or failure, before its files move).

Installed by tests/daemon/fake_daemon.py from the env var FAKE_FAULTS (a JSON spec), or in-process
with :func:`install` (returns the function that removes it).
"""

from __future__ import annotations

import builtins
import errno as errno_mod
import io
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def install(spec: dict[str, Any]) -> Callable[[], None]:
    under = [os.path.realpath(u) for u in spec.get("under", [])]
    flag = Path(spec["flag"]) if spec.get("flag") else None
    code = getattr(errno_mod, str(spec.get("errno", "ENOSPC")))
    crash_dir = os.path.realpath(spec["crash_after_publish"]) if spec.get("crash_after_publish") else None
    mkdir_crash_dir = os.path.realpath(spec["crash_before_mkdir"]) if spec.get("crash_before_mkdir") else None
    crashed = Path(f"{spec.get('flag') or spec.get('crash_after_publish') or spec['crash_before_mkdir']}.crashed")

    def active() -> bool:
        return flag is not None and flag.exists()

    def inside(path: Any) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.realpath(os.fspath(path))
        return any(p == u or p.startswith(u + os.sep) for u in under)

    def fail(path: Any) -> None:
        if active() and inside(path):
            raise OSError(code, os.strerror(code), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_rename, real_replace, real_link = os.rename, os.replace, os.link
    real_usage = shutil.disk_usage
    real_handler_open = logging.FileHandler._open

    def f_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *a, **k)

    def f_os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & _WRITE_FLAGS:
            fail(path)
        return real_os_open(path, flags, *a, **k)

    def f_mkdir(path: Any, *a: Any, **k: Any) -> None:
        if not os.path.lexists(path):  # an existing folder is EEXIST, as on a real full disk
            fail(path)
            if (mkdir_crash_dir is not None and not crashed.exists()
                    and os.path.dirname(os.path.realpath(os.fspath(path))) == mkdir_crash_dir):
                crashed.touch()
                os._exit(137)
        real_mkdir(path, *a, **k)

    def moved(real: Callable[..., None]) -> Callable[..., None]:
        def f(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            fail(dst)
            real(src, dst, *a, **k)
            if (crash_dir is not None and not crashed.exists()
                    and os.path.dirname(os.path.realpath(os.fspath(dst))) == crash_dir):
                crashed.touch()
                os._exit(137)
        return f

    def f_usage(path: Any) -> Any:
        usage = real_usage(path)
        if active() and inside(path):
            return usage._replace(free=0)
        return usage

    def f_handler_open(self: logging.FileHandler) -> Any:
        fail(self.baseFilename)
        return real_handler_open(self)

    builtins.open = f_open
    io.open = f_open
    os.open = f_os_open
    os.mkdir = f_mkdir
    os.rename = moved(real_rename)
    os.replace = moved(real_replace)
    os.link = moved(real_link)
    shutil.disk_usage = f_usage
    logging.FileHandler._open = f_handler_open  # type: ignore[method-assign]

    def uninstall() -> None:
        builtins.open, io.open, os.open, os.mkdir = real_open, real_open, real_os_open, real_mkdir
        os.rename, os.replace, os.link = real_rename, real_replace, real_link
        shutil.disk_usage = real_usage
        logging.FileHandler._open = real_handler_open  # type: ignore[method-assign]

    return uninstall
