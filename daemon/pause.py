"""When a worker that hit a full or failing disk may claim again (used by daemon/worker.py)."""

from __future__ import annotations

import time

__all__ = ["DiskPause"]


class DiskPause:
    """When to claim again after a job hit a full disk: once the outbox has ``min_free_mb`` free
    and either its free space grew since the failure or a back-off (doubling, capped) has passed.
    Without the back-off a disk that stays full would be retried in a tight loop."""

    FIRST_S = 2.0
    MAX_S = 300.0
    GROWTH = 64 * 2**20  # bytes of new free space that count as "someone freed space"

    def __init__(self) -> None:
        self.backoff = self.FIRST_S
        self.free_at_failure: int | None = None
        self.until = 0.0
        self.reason = ""

    def hit(self, free: int, reason: str) -> None:
        self.free_at_failure = free
        self.until = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.MAX_S)
        self.reason = reason

    def succeeded(self) -> None:
        self.backoff = self.FIRST_S

    def blocks(self, free: int) -> bool:
        if self.free_at_failure is None:
            return False
        if free >= self.free_at_failure + self.GROWTH or time.monotonic() >= self.until:
            self.free_at_failure = None
            return False
        return True
