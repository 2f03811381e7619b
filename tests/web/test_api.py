"""``infinitetalkd web`` against a real daemon process (fake renderer): the JSON API end to end."""

from __future__ import annotations

import sqlite3
import time

from daemon.jobs import JobStatus
from tests.daemon.conftest import wait_for, write_png
from tests.web.conftest import Site, rss_mb


def test_submit_watch_progress_fetch_mp4(site: Site) -> None:
    sub = site.submit("alice")
    assert sub["stem"] == "alice" and sub["job_id"] is not None, sub
    job_id = sub["job_id"]
    seen: list[float] = []

    def progressed() -> bool:
        j = site.job(job_id)
        if j["status"] == "running" and (not seen or j["progress"] != seen[-1]):
            seen.append(j["progress"])
        return len(seen) >= 2 or j["status"] == "done"

    wait_for(progressed, timeout=60, interval=0.1, what="progress reports")
    assert len(seen) >= 2 and seen[-1] > seen[0], seen  # progress moved while it ran
    done = site.wait_status(job_id, JobStatus.DONE)
    assert done["outputs"]["mp4"] == "alice.mp4"
    r = site.client.get(f"/api/v1/jobs/{job_id}/result")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.content == (site.outbox / "alice.mp4").read_bytes() and r.content[4:8] == b"ftyp"
    part = site.client.get(f"/api/v1/jobs/{job_id}/result", headers={"range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == r.content[:10]
    doc = site.client.get(f"/api/v1/jobs/{job_id}/result.json").json()
    assert doc["job_id"] == job_id and doc["stem"] == "alice"
    assert site.client.get(f"/files/{done['outputs']['mp4']}").content == r.content
    poster = site.client.get(f"/api/v1/jobs/{job_id}/poster.jpg")
    assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"
    assert list((site.root / "state" / "web" / "posters").glob("*.jpg"))  # cached in the state folder
    assert not [p for p in site.outbox.iterdir() if p.suffix == ".jpg"]  # not in the outbox
    listed = site.client.get("/api/v1/jobs", params={"status": "done"}).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]


def test_cancel_running_then_retry(site: Site) -> None:
    job_id = site.submit("bob")["job_id"]
    wait_for(lambda: (j := site.job(job_id))["status"] == "running" and j["progress"] > 0, timeout=60,
             interval=0.1, what="bob to run")
    r = site.client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    cancelled = site.wait_status(job_id, JobStatus.CANCELLED)
    assert cancelled["error"]
    assert site.client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 409  # already finished
    r = site.client.post(f"/api/v1/jobs/{job_id}/retry")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and sorted(r.json()["moved_back"]) == ["bob.png", "bob.ready", "bob.wav"]
    assert site.wait_status(job_id, JobStatus.DONE)["attempts"] == 1
    assert site.client.post(f"/api/v1/jobs/{job_id}/retry").status_code == 409  # done: nothing to retry


def test_failure_reason_and_log(site: Site) -> None:
    job_id = site.submit("carol", settings={"prompt": "FAIL:render"})["job_id"]
    failed = site.wait_status(job_id, JobStatus.FAILED)
    assert "the fake renderer was told to fail" in failed["error"]
    log = site.client.get(f"/api/v1/jobs/{job_id}/log")
    assert log.status_code == 200 and "job" in log.text
    page = site.client.get("/partials/finished").text
    assert "the fake renderer was told to fail" in page


def test_bad_submissions_are_clear_4xx_json(site: Site) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 100
    r = site.client.post("/api/v1/jobs", files={"portrait": ("a.png", png, "image/png")})
    assert r.status_code == 400 and "speech" in r.json()["error"]
    r = site.client.post("/api/v1/jobs", files={"portrait": ("a.exe", png), "speech": ("a.wav", b"RIFF")})
    assert r.status_code == 400 and "portrait" in r.json()["error"]
    r = site.client.post("/api/v1/jobs", files={"portrait": ("a.png", png), "speech": ("a.wav", b"RIFF")},
                         data={"settings": '{"seed": "x"}'})
    assert r.status_code == 400 and "seed" in r.json()["error"]
    assert site.client.get("/api/v1/jobs/999999").status_code == 404
    assert site.client.get("/api/v1/jobs/abc").json()["status"] == 400
    assert not [p for p in site.inbox.iterdir() if p.name.startswith("a")]


def test_waiting_stems_show_why(site: Site) -> None:
    write_png(site.inbox / "lonely.png")
    try:
        wait_for(lambda: "incomplete: missing a speech file" in site.client.get("/partials/live").text, timeout=60,
                 interval=0.2, what="the waiting stem and its reason on the page")
        doc = site.client.get("/api/v1/overview").json()
        assert [w["stem"] for w in doc["waiting"]] == ["lonely"]
        # the worker registry: the daemon's worker, its GPU model (the fake renderer's), idle
        [worker] = doc["workers"]
        assert worker["gpu"] == "fake device" and worker["job_id"] is None and worker["paused"] is None
        assert "(fake device): idle" in site.client.get("/partials/live").text
    finally:
        (site.inbox / "lonely.png").unlink()


def test_openapi_is_served(site: Site) -> None:
    doc = site.anon.get("/api/v1/openapi.json").json()
    assert "/api/v1/jobs" in doc["paths"] and "/api/v1/jobs/{job_id}/retry" in doc["paths"]


def test_survives_db_locked_and_daemon_stopped_and_stays_small(site: Site) -> None:
    db = sqlite3.connect(site.root / "state" / "jobs.db", timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # what any writer holds; the web's reads wait 2 s, then report it
        t0 = time.monotonic()
        r = site.client.get("/api/v1/jobs")
        assert r.status_code == 503 and "locked" in r.json()["error"]
        assert time.monotonic() - t0 < 25  # answered (2 s busy timeout), did not hang
        page = site.client.get("/partials/live")
        assert page.status_code == 200 and "cannot be read right now" in page.text
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert site.client.get("/api/v1/jobs").status_code == 200
    site.stop_daemon()
    wait_for(lambda: "seems stopped" in site.client.get("/partials/live").text, timeout=60, interval=0.3,
             what="the page to say the daemon stopped")
    assert site.client.get("/api/v1/jobs").status_code == 200
    assert site.web is not None and site.web.poll() is None
    assert rss_mb(site.web.pid) < 100
