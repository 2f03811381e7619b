"""A real daemon process (fake renderer) and a real ``infinitetalkd web`` process on one site."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from daemon.jobs import JobStatus
from tests.daemon.conftest import REPO, deep_update, fast_config_dict, wait_for, write_png, write_wav

TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Site:
    """Folders, config.yaml (with a web: section and a token file), and the two processes."""

    def __init__(self, root: Path, overrides: dict[str, Any] | None = None, token: str | None = TOKEN) -> None:
        self.root = root
        self.port = free_port()
        self.token = token
        web: dict[str, Any] = {"port": self.port, "max_upload_mb": 3}
        if token is not None:
            (root / "web.token").write_text(token + "\n")
            web["token_file"] = str(root / "web.token")
        doc = deep_update(fast_config_dict(root), {"web": web, "watch": {"rescan_interval_s": 1},
                                                    "jobs": {"max_input_mb": 1}})
        deep_update(doc, overrides or {})
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(doc))
        self.inbox, self.outbox, self.failed = root / "inbox", root / "outbox", root / "failed"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.web: subprocess.Popen[bytes] | None = None
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.anon = httpx.Client(base_url=self.url, timeout=30)

    def env(self, **extra: str) -> dict[str, str]:
        e = dict(os.environ, PYTHONPATH=str(REPO), **extra)
        e.pop("NOTIFY_SOCKET", None)
        return e

    def start_daemon(self, steps: int = 30, step_s: float = 0.12) -> None:
        with open(self.root / "daemon.err", "ab") as err:  # the child keeps its own copy of the descriptor
            self.daemon = subprocess.Popen([sys.executable, "-m", "tests.daemon.fake_daemon", str(self.config_path)],
                                           cwd=REPO, env=self.env(FAKE_STEPS=str(steps), FAKE_STEP_S=str(step_s)),
                                           stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: (self.root / "state" / "inbox.json").exists(), timeout=60, what="the daemon's first scan")

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(30)
        self.daemon = None

    def start_web(self) -> None:
        with open(self.root / "web.err", "ab") as err:
            self.web = subprocess.Popen([sys.executable, "-m", "daemon", "web", "--config", str(self.config_path)],
                                        cwd=REPO, env=self.env(), stdout=subprocess.DEVNULL, stderr=err)

        def up() -> bool:
            assert self.web is not None and self.web.poll() is None, (self.root / "web.err").read_text()
            try:
                return self.anon.get("/api/v1/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60, interval=0.1, what="the web server to answer")

    def stop(self) -> None:
        self.stop_daemon()
        if self.web is not None and self.web.poll() is None:
            self.web.send_signal(signal.SIGTERM)
            try:
                self.web.wait(20)
            except subprocess.TimeoutExpired:
                self.web.kill()
                self.web.wait(10)
        self.client.close()
        self.anon.close()

    # -- helpers --------------------------------------------------------------------------

    def submit(self, stem: str, *, settings: dict[str, Any] | None = None, seconds: float = 0.4,
               wait_s: float = 20) -> dict[str, Any]:
        src = self.root / "uploads"
        src.mkdir(exist_ok=True)
        digest = hashlib.sha256(stem.encode()).digest()  # distinct inputs per stem: no dedupe between tests
        png = write_png(src / f"{stem}.png", color=(digest[0], digest[1], digest[2]))
        wav = write_wav(src / f"{stem}.wav", seconds=seconds)
        with open(png, "rb") as p, open(wav, "rb") as w:
            r = self.client.post("/api/v1/jobs", files={"portrait": (png.name, p, "image/png"),
                                                        "speech": (wav.name, w, "audio/wav")},
                                 data={"settings": json.dumps(settings or {}), "wait_s": str(wait_s)})
        assert r.status_code == 202, r.text
        doc: dict[str, Any] = r.json()
        if doc["job_id"] is None and wait_s:  # a loaded machine: keep asking, as a client would
            doc = wait_for(lambda: (d := self.client.get(f"/api/v1/submissions/{doc['stem']}").json())["job_id"]
                           and d, timeout=60, interval=0.2, what=f"{stem} to be ingested")
        return doc

    def job(self, job_id: int) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def wait_status(self, job_id: int, *statuses: JobStatus, timeout: float = 60) -> dict[str, Any]:
        want = {s.value for s in statuses}
        doc: dict[str, Any] = wait_for(lambda: (j := self.job(job_id))["status"] in want and j, timeout=timeout,
                                       interval=0.1, what=f"job {job_id} to become {sorted(want)}")
        return doc


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("site"))
    try:
        s.start_daemon()
        s.start_web()
        yield s
    finally:
        s.stop()
