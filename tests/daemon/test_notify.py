"""sd_notify datagrams, written by hand."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from daemon.notify import Notifier


def receiver(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(2)
    return s


def test_no_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and not n.send("READY=1") and not n.watchdog()
    n.ready()
    n.status("x")


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    sock = receiver(str(tmp_path / "notify"))
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    n.ready("loaded")
    assert sock.recv(4096) == b"READY=1\nSTATUS=loaded"
    n.status("job 3 alice:\n  denoise   step 2/4")
    assert sock.recv(4096) == b"STATUS=job 3 alice: denoise step 2/4"  # one line
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.extend_timeout(2.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"
    n.close()
    sock.close()


def test_abstract_namespace_socket() -> None:
    name = f"infinitetalkd-test-{os.getpid()}"
    sock = receiver("\0" + name)
    Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
    assert sock.recv(4096) == b"READY=1"
    sock.close()


def test_watchdog_pings_are_rate_limited_to_half_the_period(tmp_path: Path) -> None:
    sock = receiver(str(tmp_path / "n"))
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "200000"})
    assert n.watchdog_interval_s == 0.1
    assert n.watchdog() and not n.watchdog()
    time.sleep(0.11)
    assert n.watchdog()
    assert sock.recv(64) == b"WATCHDOG=1" and sock.recv(64) == b"WATCHDOG=1"
    other = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None and not other.watchdog()  # meant for another process
    sock.close()


def test_a_full_receiver_queue_never_blocks_the_daemon(tmp_path: Path) -> None:
    sock = receiver(str(tmp_path / "n"))  # systemd stalled: nobody reads
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "n")})
    t0 = time.monotonic()
    results = [n.status(f"step {i}") for i in range(3000)] and [n.send("STATUS=x") for _ in range(3000)]
    assert time.monotonic() - t0 < 2
    assert not all(results)  # some were dropped instead of blocking
    sock.close()
    assert not n.send("READY=1")  # and a vanished socket is not an error either
