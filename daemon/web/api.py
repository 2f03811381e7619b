"""``/api/v1``: JSON over HTTP. Authentication: ``Authorization: Bearer <token>`` (or the page's
session cookie); state-changing calls from a browser also need the CSRF value (see .security)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from daemon.inbox import split_name
from daemon.jobs import Job, JobStatus
from daemon.ops import OpError, retry_job
from daemon.store import Store
from daemon.web import files
from daemon.web.context import Ctx, ctx_of
from daemon.web.state import Unavailable, daemon_seen, job_doc, read_inbox_status, snapshot, workers
from daemon.web.submit import (
    SubmitError,
    TooLarge,
    Upload,
    check_settings,
    choose_stem,
    sanitize_stem,
    write_submission,
)

__all__ = ["router", "require_auth", "require_csrf", "unavailable"]


def require_auth(request: Request) -> Ctx:
    ctx = ctx_of(request)
    if not ctx.auth.authenticated(request):
        raise HTTPException(401, "missing or wrong token (Authorization: Bearer <token>, or log in on the page)",
                            headers={"www-authenticate": "Bearer"})
    return ctx


def require_csrf(request: Request, ctx: Annotated[Ctx, Depends(require_auth)]) -> Ctx:
    problem = ctx.auth.csrf_problem(request)
    if problem is not None:
        raise HTTPException(403, problem)
    return ctx


Authed = Annotated[Ctx, Depends(require_auth)]
Changing = Annotated[Ctx, Depends(require_csrf)]
router = APIRouter()


def unavailable(exc: Unavailable) -> HTTPException:
    return HTTPException(503, f"job database unavailable: {exc}")


class JobOut(BaseModel):
    id: int
    stem: str
    status: JobStatus
    attempts: int
    max_attempts: int
    progress: float = Field(description="0..1")
    progress_text: str = Field(description="stage, chunk, step and, once known, the time left")
    cancel_requested: bool
    error: str | None = Field(description="the one-line reason of a failed or cancelled job")
    outputs: dict[str, str] = Field(description="result file names in the outbox, by kind (mp4, json, log)")
    worker: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    rejected: bool = Field(description="refused at ingest (never rendered)")
    params: dict[str, Any]
    resumed_from_chunk: int | None = Field(None, description="where the latest attempt continued after a "
                                           "checkpoint (0-based); null: it started at chunk 0")
    chunks_rendered: int = Field(0, description="chunks rendered over all attempts")
    redo_of: int | None = Field(None, description="the job a redo (`infinitetalkd redo`) re-renders")


class JobList(BaseModel):
    jobs: list[JobOut]


class Submitted(BaseModel):
    stem: str = Field(description="the stem the files were written under in the inbox")
    files: list[str]
    job_id: int | None = Field(description="the job, once the daemon has ingested the files")
    status: str = Field(description="'waiting' (in the inbox), 'gone' (ingested as a duplicate of an earlier "
                                    "job), or the job's status")
    waiting: str | None = Field(description="why the daemon is still waiting, when it says so")


class Health(BaseModel):
    ok: bool
    database: str
    daemon_seen_s_ago: float | None
    daemon_alive: bool


def _job(ctx: Ctx, job_id: int) -> Job:
    try:
        job: Job | None = ctx.access.call(Store.get, job_id)
    except Unavailable as exc:
        raise unavailable(exc) from None
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.get("/health", response_model=Health)
def health(request: Request) -> Health:
    """Liveness for monitors (no token needed; says nothing about jobs)."""
    ctx = ctx_of(request)
    inbox = read_inbox_status(ctx.cfg)
    try:
        running = snapshot(ctx.access).running
        database = "ok"
    except Unavailable as exc:
        running, database = [], f"unavailable: {exc}"
    seen = daemon_seen(ctx.cfg, inbox, running)
    return Health(ok=database == "ok", database=database, daemon_seen_s_ago=seen["seen_s_ago"],
                  daemon_alive=seen["alive"])


@router.get("/jobs", response_model=JobList)
def list_jobs(ctx: Authed, status: JobStatus | None = None, limit: int = 50) -> JobList:
    limit = max(1, min(limit, 500))
    try:
        jobs: list[Job] = ctx.access.call(Store.list_jobs, [status] if status else [], limit)
    except Unavailable as exc:
        raise unavailable(exc) from None
    return JobList(jobs=[JobOut(**job_doc(j)) for j in jobs])


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(ctx: Authed, job_id: int) -> JobOut:
    return JobOut(**job_doc(_job(ctx, job_id)))


def _result(ctx: Ctx, job: Job, kind: str, request: Request) -> Response:
    name = job.outputs.get(kind)
    if job.status is not JobStatus.DONE or not isinstance(name, str):
        raise HTTPException(404, f"job {job.id} has no {kind} result (it is {job.status.value})")
    opened = files.open_in(ctx.cfg.paths.outbox, name) if files.safe_name(name, (kind,)) else None
    if opened is None:
        raise HTTPException(404, f"{name} is not in the outbox (moved or deleted?)")
    return files.file_response(*opened, name, request.headers.get("range"))


@router.get("/jobs/{job_id}/result", response_class=Response,
            responses={200: {"content": {"video/mp4": {}}, "description": "the rendered mp4"}})
def get_result(ctx: Authed, job_id: int, request: Request) -> Response:
    return _result(ctx, _job(ctx, job_id), "mp4", request)


@router.get("/jobs/{job_id}/result.json", response_class=Response,
            responses={200: {"content": {"application/json": {}}, "description": "the result document"}})
def get_result_json(ctx: Authed, job_id: int, request: Request) -> Response:
    return _result(ctx, _job(ctx, job_id), "json", request)


@router.get("/jobs/{job_id}/log", response_class=PlainTextResponse)
def get_log(ctx: Authed, job_id: int) -> PlainTextResponse:
    """The job's log: from the outbox when it is done, from its failed/ folder otherwise."""
    job = _job(ctx, job_id)
    opened = None
    name = job.outputs.get("log")
    if job.status is JobStatus.DONE and isinstance(name, str) and files.safe_name(name, ("log",)):
        opened = files.open_in(ctx.cfg.paths.outbox, name)
    elif job.failed_dir:
        opened = files.failure_log(ctx.cfg.paths.failed, job.failed_dir, job.stem)
    if opened is None:
        raise HTTPException(404, f"job {job.id} has no log to show")
    return PlainTextResponse(files.read_tail(*opened))


@router.get("/jobs/{job_id}/poster.jpg", response_class=Response)
def get_poster(ctx: Authed, job_id: int) -> Response:
    """The first frame of the result (made once, cached in the state folder)."""
    job = _job(ctx, job_id)
    name = job.outputs.get("mp4")
    opened = (files.open_in(ctx.cfg.paths.outbox, name)
              if job.status is JobStatus.DONE and isinstance(name, str) and files.safe_name(name, ("mp4",)) else None)
    if opened is None:
        raise HTTPException(404, f"job {job.id} has no video")
    fd, st = opened
    path = files.poster(ctx.cfg.paths.state / "web" / "posters", f"{job.id}-{st.st_ino}-{st.st_mtime_ns}", fd)
    if path is None:
        raise HTTPException(404, f"no frame could be read from {name}")
    again = files.open_in(path.parent, path.name)
    if again is None:
        raise HTTPException(404, "poster vanished")
    response = files.file_response(*again, path.name, None)
    response.headers["cache-control"] = "private, max-age=86400"
    return response


def _submission(ctx: Ctx, stem: str, names: list[str]) -> Submitted:
    inbox = read_inbox_status(ctx.cfg)
    reason = next((str(w.get("reason")) for w in inbox.get("waiting", []) if w.get("stem") == stem), None)
    try:
        job: Job | None = ctx.access.call(Store.find, stem)
    except Unavailable:
        job = None
    if job is None:
        if reason is None and not _in_inbox(ctx, stem):
            return Submitted(stem=stem, files=names, job_id=None, status="gone",
                             waiting="the files left the inbox without a job of this name: most likely the same "
                                     "inputs and settings as an earlier job, whose result stands")
        return Submitted(stem=stem, files=names, job_id=None, status="waiting", waiting=reason)
    return Submitted(stem=stem, files=names, job_id=job.id, status=job.status.value, waiting=None)


def _in_inbox(ctx: Ctx, stem: str) -> bool:
    try:
        return any(split_name(p.name) == (stem, p.suffix[1:].lower()) for p in ctx.cfg.paths.inbox.iterdir())
    except OSError:
        return True  # cannot tell: say it waits


def _settings(text: str) -> dict[str, object]:
    try:
        doc = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise HTTPException(400, f"settings: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise HTTPException(400, "settings: must be a JSON object of setting: value")
    return doc


@router.post("/jobs", status_code=202, response_model=Submitted)
def submit(ctx: Changing, portrait: Annotated[UploadFile, File(description="portrait image or source video")],
           speech: Annotated[UploadFile, File(description="speech file")],
           speech2: Annotated[UploadFile | None, File(description="second speaker's speech file")] = None,
           stem: Annotated[str, Form(description="job name (default: the portrait's file name)")] = "",
           settings: Annotated[str, Form(description="JSON object of sidecar settings")] = "",
           wait_s: Annotated[float, Form(description="wait up to this long for the job id (max 30)")] = 0,
           ) -> Submitted:
    """Write the files into the inbox (temporary names, renamed, committed with ``<stem>.ready``)."""
    cfg = ctx.cfg
    doc = _settings(settings)
    try:
        check_settings(doc, cfg.render)
        wanted = sanitize_stem(stem or (portrait.filename or "job").rsplit(".", 1)[0])
        try:
            final = choose_stem(wanted, cfg.paths.inbox,
                                lambda s: ctx.access.call(Store.find, s) is not None)
        except Unavailable as exc:
            raise unavailable(exc) from None
        except OSError as exc:
            raise HTTPException(503, f"the inbox cannot be read ({exc.strerror or exc})") from None
        uploads = [Upload(role, f.filename or "", f.file)
                   for role, f in (("portrait", portrait), ("speech", speech), ("speech2", speech2)) if f is not None]
        names = write_submission(cfg.paths.inbox, final, uploads, doc, cfg.jobs.max_input_mb << 20)
    except TooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except SubmitError as exc:
        raise HTTPException(400, str(exc)) from None
    except OSError as exc:  # inbox gone (share not mounted), full or read-only; nothing was left behind
        raise HTTPException(503, f"cannot write into the inbox {cfg.paths.inbox}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + max(0.0, min(wait_s, 30.0))
    while True:
        out = _submission(ctx, final, names)
        if out.job_id is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.2)


@router.get("/submissions/{stem}", response_model=Submitted)
def get_submission(ctx: Authed, stem: str) -> Submitted:
    """A submitted stem: still waiting in the inbox (and why), or its job."""
    return _submission(ctx, stem, [])


def _act(ctx: Ctx, job_id: int, action: str) -> JSONResponse:
    job = _job(ctx, job_id)
    try:
        if action == "cancel":
            new: Job | None = ctx.access.call(Store.request_cancel, job.id)
            if new is None:
                raise HTTPException(409, f"job {job.id} is already {job.status.value}")
            return JSONResponse(job_doc(new))
        done = ctx.access.call(lambda store: retry_job(ctx.cfg, store, job))
    except Unavailable as exc:
        raise unavailable(exc) from None
    except OpError as exc:
        raise HTTPException(409, str(exc)) from None
    except OSError as exc:
        raise HTTPException(500, f"could not move the inputs back: {exc}") from None
    body = job_doc(done.job)
    body["moved_back"] = done.moved
    body["rescan"] = done.rescan
    return JSONResponse(body)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel(ctx: Changing, job_id: int) -> JSONResponse:
    """Cancel a queued job, or stop a running one at its next step (as ``infinitetalkd cancel``)."""
    return _act(ctx, job_id, "cancel")


@router.post("/jobs/{job_id}/retry", response_model=JobOut)
def retry(ctx: Changing, job_id: int) -> JSONResponse:
    """Queue a failed or cancelled job again, its inputs moved back from failed/ (as ``infinitetalkd retry``)."""
    return _act(ctx, job_id, "retry")


def overview_doc(ctx: Ctx) -> dict[str, Any]:
    snap = snapshot(ctx.access)
    inbox = read_inbox_status(ctx.cfg)
    return {"counts": snap.counts, "running": [job_doc(j) for j in snap.running],
            "queued": [job_doc(j) for j in snap.queued], "done": [job_doc(j) for j in snap.done],
            "failed": [job_doc(j) for j in snap.failed], "waiting": inbox.get("waiting", []),
            "inbox_missing": bool(inbox.get("inbox_missing")), "workers": workers(ctx.cfg, snap),
            "daemon": daemon_seen(ctx.cfg, inbox, snap.running), "finished_version": snap.finished_version}


@router.get("/overview")
def overview(ctx: Authed) -> dict[str, Any]:
    """Everything the page shows, in one document."""
    try:
        return overview_doc(ctx)
    except Unavailable as exc:
        raise unavailable(exc) from None
