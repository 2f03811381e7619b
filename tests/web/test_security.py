"""Security of ``infinitetalkd web`` on the real process: token, CSRF, traversal, upload limits,
escaping, and the refusal to serve the LAN without a token."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from daemon.jobs import JobStatus
from tests.daemon.conftest import REPO, wait_for, write_png, write_wav
from tests.web.conftest import TOKEN, Site

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("sec"))
    try:
        s.start_daemon(steps=3, step_s=0.01)
        s.start_web()
        yield s
    finally:
        s.stop()


def raw_get(site: Site, path: str) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte (HTTP clients normalise '..' away)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def login(site: Site) -> httpx.Client:
    c = httpx.Client(base_url=site.url, timeout=30)
    r = c.post("/login", data={"token": TOKEN}, headers={"origin": site.url})
    assert r.status_code == 303
    c.get("/")  # sets the CSRF cookie
    return c


def test_no_token_or_wrong_token_is_401(sec: Site) -> None:
    for path in ("/api/v1/jobs", "/api/v1/jobs/1", "/api/v1/overview", "/files/x.mp4", "/partials/live"):
        r = sec.anon.get(path)
        assert r.status_code == 401 and r.json()["status"] == 401, path
        assert path.startswith(("/files", "/partials")) or r.headers["www-authenticate"] == "Bearer"
        assert sec.anon.get(path, headers={"authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert sec.anon.post("/api/v1/jobs/1/cancel").status_code == 401
    assert sec.anon.get("/").status_code == 303  # the page sends the browser to the login form
    bad = sec.anon.post("/login", data={"token": "wrong-token-0123456789"})
    assert bad.status_code == 401 and "session" not in str(bad.cookies)
    c = login(sec)
    try:
        cookie = next(h for h in c.post("/login", data={"token": TOKEN}).headers.get_list("set-cookie")
                      if h.startswith("itd_session="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert TOKEN not in cookie
        assert c.get("/").status_code == 200 and c.get("/api/v1/jobs").status_code == 200
    finally:
        c.close()


def test_cross_site_posts_are_refused(sec: Site) -> None:
    job_id = sec.submit("dave", wait_s=20)["job_id"]
    sec.wait_status(job_id, JobStatus.DONE)
    (sec.root / "failed").mkdir(exist_ok=True)
    c = login(sec)
    try:
        csrf = c.cookies["itd_csrf"]
        # A form on another site posting to us (as if the browser sent the cookie along anyway).
        evil = c.post(f"/api/v1/jobs/{job_id}/retry", data={"csrf_token": csrf},
                      headers={"origin": "http://evil.example", "sec-fetch-site": "cross-site"})
        assert evil.status_code == 403 and "cross-site" in evil.json()["error"]
        no_csrf = c.post(f"/api/v1/jobs/{job_id}/cancel", headers={"origin": sec.url})
        assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["error"]
        wrong = c.post(f"/api/v1/jobs/{job_id}/cancel", headers={"origin": sec.url, "x-csrf-token": "nope"})
        assert wrong.status_code == 403
        good = c.post(f"/api/v1/jobs/{job_id}/cancel", headers={"origin": sec.url, "x-csrf-token": csrf})
        assert good.status_code == 409  # passed the checks; a done job cannot be cancelled
        logout = c.post("/logout", headers={"origin": "http://evil.example"}, data={"csrf_token": csrf})
        assert logout.status_code == 403
    finally:
        c.close()
    assert sec.job(job_id)["status"] == "done"


def test_result_urls_never_leave_the_outbox(sec: Site) -> None:
    job_id = sec.submit("erin", wait_s=20)["job_id"]
    sec.wait_status(job_id, JobStatus.DONE)
    secret = sec.root / "secret.log"
    secret.write_text("secret\n")
    os.symlink(secret, sec.outbox / "link.log")
    os.symlink(secret, sec.outbox / "link.mp4")
    (sec.outbox / "sub.mp4").mkdir()
    assert raw_get(sec, "/files/erin.mp4")[0] == 200  # the control: a real result is served
    for path in ("/files/../secret.log", "/files/..%2fsecret.log", "/files/%2e%2e%2fsecret.log",
                 "/files/%2e%2e/secret.log", "/files/..%5csecret.log", "/files//etc/passwd", "/files/%2Fetc%2Fpasswd",
                 f"/files/{secret}", "/files/link.log", "/files/link.mp4", "/files/sub.mp4", "/files/", "/files/.tmp",
                 "/files/erin.mp4%00.log", "/files/erin.png", "/files/failed", "/static/", "/static/../config.yaml"):
        status, body = raw_get(sec, path)
        assert status == 404, (path, status, body[:200])
        assert b"secret" not in body


def test_upload_over_the_limits_is_413_and_leaves_nothing(sec: Site) -> None:
    png = write_png(sec.root / "big.png")
    before = sorted(os.listdir(sec.inbox))
    for size_mb, why in ((2, "jobs.max_input_mb"), (5, "web.max_upload_mb")):  # limits: 1 MiB a file, 3 in all
        big = sec.root / "big.wav"
        write_wav(big, seconds=0.1)
        with open(big, "ab") as f:
            f.write(b"\0" * (size_mb << 20))
        with open(png, "rb") as p, open(big, "rb") as w:
            r = sec.client.post("/api/v1/jobs", files={"portrait": ("big.png", p), "speech": ("big.wav", w)})
        assert r.status_code == 413 and why in r.json()["error"], r.text
        assert sorted(os.listdir(sec.inbox)) == before

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body streams in
        yield b"--x\r\nContent-Disposition: form-data; name=\"speech\"; filename=\"c.wav\"\r\n\r\n"
        for _ in range(5):
            yield b"\0" * (1 << 20)

    r = sec.client.post("/api/v1/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    assert sorted(os.listdir(sec.inbox)) == before


def test_a_stem_with_html_is_shown_escaped(sec: Site) -> None:
    write_png(sec.inbox / f"{XSS}.png", color=(1, 2, 3))
    write_wav(sec.inbox / f"{XSS}.wav", seconds=0.3)
    (sec.inbox / f"{XSS}.ready").touch()
    wait_for(lambda: any(j["stem"] == XSS and j["status"] == "done"
                         for j in sec.client.get("/api/v1/jobs").json()["jobs"]), timeout=60, what="the XSS job")
    page = sec.client.get("/").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert XSS not in page


def run_web(site: Site, web: dict[str, object]) -> subprocess.CompletedProcess[str]:
    doc = yaml.safe_load(site.config_path.read_text())
    doc["web"] = web
    cfg = site.root / "other.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.pop("INFINITETALKD_WEB_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "daemon", "web", "--config", str(cfg)], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=60)


def test_refuses_to_bind_a_lan_address_without_a_token(sec: Site) -> None:
    r = run_web(sec, {"host": "0.0.0.0", "port": sec.port + 1})
    assert r.returncode == 78 and "no token is set" in r.stderr


def test_without_a_token_only_loopback_host_names_are_served(tmp_path: Path) -> None:
    """No token means loopback only; a page whose DNS name points at 127.0.0.1 (DNS rebinding) is refused."""
    from fastapi.testclient import TestClient

    from daemon.config import parse_config
    from daemon.web.app import create_app
    from tests.daemon.conftest import fast_config_dict

    app = create_app(parse_config(fast_config_dict(tmp_path), base=tmp_path), None)
    with TestClient(app, base_url="http://127.0.0.1:8787") as c:
        assert c.get("/api/v1/jobs").status_code == 503  # no token needed; no database yet
        assert "no job database" in c.get("/api/v1/jobs").json()["error"]
        assert c.get("/", headers={"host": "localhost:8787"}).status_code == 200
        r = c.get("/api/v1/jobs", headers={"host": "evil.example:8787"})
        assert r.status_code == 403 and "Host" in r.json()["error"]
        evil = c.post("/api/v1/jobs/1/cancel", headers={"origin": "http://evil.example"})
        assert evil.status_code == 403  # a cross-site form on loopback is refused too
