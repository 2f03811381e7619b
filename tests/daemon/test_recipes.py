"""A worker renders only jobs of its own recipe (docs/daemon.md §4.9): it records the recipe in the
worker registry, leaves other recipes' jobs queued for a worker that has them, and ``doctor`` says
when live workers disagree or a queued job has no live worker of its recipe."""

from __future__ import annotations

import dataclasses

from daemon import doctor
from daemon.jobs import JobStatus
from daemon.store_fleet import WorkerInfo
from tests.daemon.conftest import Env, wait_for


def test_a_worker_leaves_jobs_of_another_recipe_queued(env: Env) -> None:
    alien, _ = env.store.add(fingerprint="f" * 64, stem="alien", inputs=[], params={},
                             identity="another-engine/1 dtype=fp16", max_attempts=3)
    env.drop("alice")
    env.start()
    env.wait_status("alice", JobStatus.DONE)
    assert env.renderer is not None
    mine = env.renderer.identity()
    [me] = wait_for(lambda: [w for w in env.store.list_workers() if w.recipe], what="the worker's recipe")
    assert me.recipe == mine and me.gpu == "fake device"  # the GPU model, once the engine is loaded
    job = env.store.get(alien.id)
    assert job is not None and job.status is JobStatus.QUEUED and job.attempts == 0
    check = doctor.check_recipes(env.store.list_workers(), env.store.queued_by_recipe(), stale_after_s=60)
    assert check.status == "bad" and "1 queued job(s)" in check.text
    assert any("no live worker renders it" in d for d in check.details)
    env.stop()


def _worker(name: str, recipe: str, age_s: float = 1.0) -> WorkerInfo:
    return WorkerInfo(name=name, token="t", host="h", pid=1, device="cuda:0", gpu="", version="1", recipe=recipe,
                      started_at=0.0, heartbeat_at=0.0, stopped_at=None, job_id=None, age_s=age_s)


def test_doctor_reports_live_workers_that_disagree() -> None:
    a, b = _worker("h/cuda:0", "engine;dit=a"), _worker("h/cuda:1", "engine;dit=a")
    assert doctor.check_recipes([a, b], {"engine;dit=a": 4}, stale_after_s=30).status == "ok"
    c = dataclasses.replace(b, recipe="engine;dit=a;dit_gemm=fp8")
    check = doctor.check_recipes([a, c], {}, stale_after_s=30)
    assert check.status == "bad" and "disagree" in check.text and len(check.details) == 2
    # a dead worker's recipe does not count, and one that has not loaded its engine is not judged
    gone = dataclasses.replace(c, age_s=600)
    assert doctor.check_recipes([a, gone], {}, stale_after_s=30).status == "ok"
    assert doctor.check_recipes([dataclasses.replace(a, recipe="")], {}, stale_after_s=30).status == "info"
