"""The page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
log in, submit through the form, watch a running job's progress change, play a finished job's
video (its duration read from the element), read a failure's reason; a screenshot is saved.

Skipped when no browser is installed, except under CI=true, where that is a failure.
Set WEB_SCREENSHOT=path to keep the screenshot (the README's was made that way).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.jobs import JobStatus
from tests.daemon.conftest import wait_for, write_png, write_wav
from tests.web.conftest import TOKEN, Site

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
STEPS = 40  # fake renderer: 40 steps of 0.15 s, a 1.6 s video at 25 fps


def _browser_missing() -> str | None:
    if CHROMIUM is None or DRIVER is None:
        return "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {missing}")
        pytest.skip(missing)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=900,1300", "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(str(DRIVER)), options=options)  # explicit paths: nothing is downloaded
    d.set_script_timeout(30)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def page_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("browser"))
    try:
        s.start_daemon(steps=STEPS, step_s=0.15)
        s.start_web()
        yield s
    finally:
        s.stop()


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    try:
        return str(found[0].text) if found else ""
    except Exception:  # replaced by the next refresh between find and read: read again
        return ""


def test_page_in_a_real_browser(driver: Any, page_site: Site, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    site = page_site
    failing = site.submit("gina", settings={"prompt": "FAIL:render"})["job_id"]
    site.wait_status(failing, JobStatus.FAILED)

    driver.get(site.url + "/")
    assert driver.current_url.endswith("/login")
    driver.find_element(By.NAME, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait_for(lambda: driver.find_elements(By.ID, "submit-form"), timeout=60, what="the page after logging in")

    # Submit through the form (multipart upload from the page's script, with its CSRF value).
    src = tmp_path / "upload"
    src.mkdir()
    form = driver.find_element(By.ID, "submit-form")
    form.find_element(By.NAME, "portrait").send_keys(str(write_png(src / "frank.png", color=(40, 90, 160))))
    form.find_element(By.NAME, "speech").send_keys(str(write_wav(src / "frank.wav", seconds=0.5)))
    form.find_element(By.CSS_SELECTOR, "details summary").click()  # the settings, with their defaults
    form.find_element(By.NAME, "s_seed").send_keys("7")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: "Submitted as frank" in text_of(driver, "#submit-result"), timeout=60,
             what="the submission's answer")
    job_id = wait_for(lambda: site.client.get("/api/v1/submissions/frank").json()["job_id"], timeout=60,
                      interval=0.2, what="frank to be ingested")
    assert site.job(job_id)["params"]["seed"] == 7  # the form's setting reached the job through the sidecar

    # A running job's progress changes on the page without a reload.
    sel = f'.job.running[data-job="{job_id}"] .progress-text'
    first = wait_for(lambda: "step" in (t := text_of(driver, sel)) and t, timeout=60, what="progress on the page")
    wait_for(lambda: (t := text_of(driver, sel)) and "step" in t and t != first, timeout=60,
             what=f"the progress text to change from {first!r}")

    # The finished job's video plays; its duration comes from the element.
    site.wait_status(job_id, JobStatus.DONE)
    video = f'.result[data-job="{job_id}"] video'
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, video), timeout=60, what="the result's <video>")
    duration = wait_for(lambda: driver.execute_script(
        "const v = document.querySelector(arguments[0]); return v && v.readyState >= 1 && !v.error && v.duration",
        video), timeout=60, what="the video's metadata")
    assert abs(duration - STEPS / 25) < 0.1, duration
    played = driver.execute_async_script(
        "const done = arguments[1]; const v = document.querySelector(arguments[0]); v.muted = true;"
        "v.play().then(() => done(true)).catch(e => done(String(e)));", video)
    assert played is True, played
    poster = driver.execute_script("return document.querySelector(arguments[0]).poster", video)
    assert poster.endswith(f"/api/v1/jobs/{job_id}/poster.jpg")

    # The failure shows its one-line reason, with a retry button.
    reason = text_of(driver, f'.job.failed[data-job="{failing}"] .reason')
    assert "the fake renderer was told to fail" in reason
    assert driver.find_elements(By.CSS_SELECTOR, f'.job.failed[data-job="{failing}"] button[data-action=retry]')

    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    if os.environ.get("WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["WEB_SCREENSHOT"])
