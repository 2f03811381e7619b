"""sd_notify(3) written by hand: one AF_UNIX datagram per message to ``$NOTIFY_SOCKET``.

The protocol is declared stable by systemd (man sd_notify; systemd ships a self-contained example,
man/notify-selfcontained-example.py, which this follows in spirit). Without ``NOTIFY_SOCKET`` every
call is a no-op, so the daemon runs the same way on a terminal.

Watchdog pings are *not* sent from a timer: the worker calls :meth:`Notifier.watchdog` when it made
progress (a denoising step, a finished scan), and the ping goes out at most every half
``WATCHDOG_USEC``. A hung render therefore stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # A leading '@' names a socket in the abstract namespace (a NUL byte on the wire).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # Ping at half the deadline (sd_watchdog_enabled(3) recommends that).
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if enabled else None
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one datagram. Returns False when there is no socket, or when
        the message could not be sent: a notification must never block or break a render."""
        if not self._address:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self._sock.sendto("\n".join(lines).encode("utf-8"), self._address)
        except OSError:  # receiver queue full (EAGAIN) or the socket is gone (systemd restarting)
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={' '.join(text.split())}")

    def stopping(self, status: str = "") -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        """Report progress. Sends ``WATCHDOG=1`` at most every half watchdog period."""
        if self.watchdog_interval_s is None:
            return False
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_interval_s:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
