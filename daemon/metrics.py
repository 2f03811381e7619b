"""Prometheus metrics (opt-in: ``metrics.enabled``). One registry per daemon, no global state.

- ``infinitetalkd_jobs{status}``: jobs in the table by status (queue depth is status="queued");
- ``infinitetalkd_render_seconds``: histogram of render wall time of finished jobs;
- ``infinitetalkd_failures_total{kind}``: failed jobs by kind (input, render, oom, device, disk, internal);
- ``infinitetalkd_last_success_timestamp_seconds``: when the last job finished well;
- ``infinitetalkd_running_job_progress``: fraction done of the running job (0 when none runs);
- ``infinitetalkd_running_job_seconds_left``: its estimated time left (NaN until known, and when none runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Gauge("infinitetalkd_jobs", "Jobs by status", ["status"], registry=self.registry)
        self.render_seconds = Histogram(
            "infinitetalkd_render_seconds", "Render wall time of finished jobs", registry=self.registry,
            buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")),
        )
        self.failures = Counter("infinitetalkd_failures", "Failed jobs by kind", ["kind"], registry=self.registry)
        self.last_success = Gauge("infinitetalkd_last_success_timestamp_seconds",
                                  "Unix time of the last successful job", registry=self.registry)
        self.running_progress = Gauge("infinitetalkd_running_job_progress",
                                      "Fraction done of the running job (0 when none runs)", registry=self.registry)
        self.running_seconds_left = Gauge("infinitetalkd_running_job_seconds_left",
                                          "Estimated seconds left in the running job (NaN until known or when idle)",
                                          registry=self.registry)
        self.running_seconds_left.set(float("nan"))
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def set_counts(self, counts: Mapping[str, int]) -> None:
        for status, n in counts.items():
            self.jobs.labels(status=status).set(n)

    def set_running(self, fraction: float, seconds_left: float | None) -> None:
        """The running job's progress; ``set_running(0.0, None)`` when it ends."""
        self.running_progress.set(fraction)
        self.running_seconds_left.set(float("nan") if seconds_left is None else seconds_left)

    def serve(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
