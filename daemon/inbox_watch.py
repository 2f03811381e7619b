"""Whether the inbox is there, and the watchdog observer that wakes the scanner (docs/daemon.md §1).

An :class:`InboxWatch` belongs to one :class:`daemon.watcher.Scanner` and runs on its thread, except
the observer's event handler, which only sets the scanner's wake event. Events are hints; the
scanner's full passes are the truth. In poll mode (configured, or ``auto`` on a network filesystem,
where inotify never sees other machines' writes) no observer runs at all. An inbox that disappears
(a NAS unmounted) is logged once and checked every poll interval; when it comes back, or is
remounted (device/inode changed), the observer is started again.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from daemon.config import WatchConfig
from daemon.fsinfo import filesystem_type, watch_mode
from daemon.log import get_logger

__all__ = ["InboxWatch"]

log = get_logger("infinitetalkd.watcher")


class _Hint(FileSystemEventHandler):
    """Runs on watchdog's thread: only wakes the scanner (records nothing, decides nothing)."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.wake.set()


class InboxWatch:
    def __init__(self, inbox: Path, config: WatchConfig, wake: threading.Event) -> None:
        self.inbox, self.config, self.wake = inbox, config, wake
        self.missing = False
        self.fstype = "unknown"
        self.mode = "poll"
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the inbox being watched
        self._observer: BaseObserver | None = None

    def presence_changed(self) -> bool:
        """The inbox vanished or came back (or was remounted) since the last :meth:`check`."""
        try:
            st = os.stat(self.inbox)
            here = stat.S_ISDIR(st.st_mode)
        except OSError:
            return not self.missing
        return self.missing or not here or (self._ident not in (None, (st.st_dev, st.st_ino)))

    def check(self) -> bool:
        """Before a pass: whether the inbox is there; (re)starts the observer when it came back, was
        remounted or the observer died."""
        try:
            st = os.stat(self.inbox)
            ok = stat.S_ISDIR(st.st_mode)
        except OSError:
            ok = False
        if not ok:
            self.mark_missing("missing")
            return False
        ident = (st.st_dev, st.st_ino)
        if self.missing:
            log.warning("inbox.back", inbox=str(self.inbox))
        elif self._ident is not None and ident != self._ident:
            log.warning("inbox.remounted", inbox=str(self.inbox))
        elif self._observer is not None and not self._observer.is_alive():
            log.error("watcher.died", inbox=str(self.inbox))
        elif self._ident is not None:
            return True
        self.missing = False
        self._ident = ident
        self._start_observer()
        return True

    def mark_missing(self, why: str, error: str = "") -> None:
        """The one place the inbox becomes missing: logged once per outage, observer stopped."""
        if not self.missing:
            log.error("inbox.missing", inbox=str(self.inbox), why=why, error=error,
                      hint=f"is the share mounted? checking again every {self.config.poll_interval_s:g} s; "
                           "queued jobs wait for it")
        self.stop()
        self._ident = None
        self.missing = True

    def stop(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=10)
            except Exception:  # a dead watch on a vanished mount may refuse to stop cleanly
                log.warning("watcher.stop_failed", exc_info=True)

    def _start_observer(self) -> None:
        self.stop()
        self.fstype = filesystem_type(self.inbox)
        self.mode = watch_mode(self.config.mode, self.fstype)
        if self.mode == "inotify":
            try:
                obs = Observer()
                obs.schedule(_Hint(self.wake), str(self.inbox), recursive=False)
                obs.daemon = True
                obs.start()
                self._observer = obs
            except OSError as exc:  # ENOSPC: inotify watch limit; EMFILE: instance limit
                log.error("watcher.failed", error=str(exc), fallback="poll",
                          hint="raise fs.inotify.max_user_watches / max_user_instances")
                self.mode = "poll"
        log.info("watcher.started", inbox=str(self.inbox), fstype=self.fstype, mode=self.mode,
                 configured=self.config.mode)
