"""The HTML page: server-rendered with autoescaping Jinja2, refreshed by static/app.js, which
replaces two fragments (live: running/queued/waiting; finished: results and failures) by polling.
The finished fragment is fetched only when a job finished or was retried, so a playing <video>
is not replaced under the viewer."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

from daemon.progress import format_duration
from daemon.web import files
from daemon.web.api import overview_doc
from daemon.web.context import Ctx, ctx_of, error
from daemon.web.security import CSRF_COOKIE, SESSION_COOKIE, new_csrf_value
from daemon.web.state import Unavailable, settings_fields

__all__ = ["router"]

router = APIRouter(include_in_schema=False)
RESULT_EXTS = ("mp4", "json", "log")


def _cookie(response: Response, name: str, value: str, request: Request) -> None:
    response.set_cookie(name, value, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https", max_age=30 * 86400)


def _html(ctx: Ctx, template: str, **values: Any) -> str:
    return ctx.templates.get_template(template).render(fmt_duration=format_duration, fmt_time=_fmt_time, **values)


def _fmt_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _live_values(ctx: Ctx) -> dict[str, Any]:
    try:
        return {"ov": overview_doc(ctx), "db_error": None}
    except Unavailable as exc:
        return {"ov": None, "db_error": str(exc)}


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> Response:
    ctx = ctx_of(request)
    if not ctx.auth.authenticated(request):
        return RedirectResponse("/login", status_code=303)
    csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_value()
    body = _html(ctx, "index.html", csrf=csrf, auth=ctx.auth.enabled, fields=settings_fields(ctx.cfg),
                 max_upload_mb=ctx.cfg.web.max_upload_mb, max_input_mb=ctx.cfg.jobs.max_input_mb,
                 **_live_values(ctx))
    response = HTMLResponse(body, headers={"cache-control": "no-store"})
    _cookie(response, CSRF_COOKIE, csrf, request)
    return response


@router.get("/partials/live", response_class=HTMLResponse)
def live(request: Request) -> Response:
    ctx = ctx_of(request)
    if not ctx.auth.authenticated(request):
        return error(401, "log in again")
    values = _live_values(ctx)
    ov = values["ov"]
    version = "" if ov is None else str(ov["finished_version"])
    return HTMLResponse(_html(ctx, "live.html", **values),
                        headers={"x-finished-version": version, "cache-control": "no-store"})


@router.get("/partials/finished", response_class=HTMLResponse)
def finished(request: Request) -> Response:
    ctx = ctx_of(request)
    if not ctx.auth.authenticated(request):
        return error(401, "log in again")
    return HTMLResponse(_html(ctx, "finished.html", **_live_values(ctx)), headers={"cache-control": "no-store"})


@router.get("/files/{name:path}")
def result_file(request: Request, name: str) -> Response:
    """A result file from the outbox: one plain name (mp4, json, log); anything else is 404."""
    ctx = ctx_of(request)
    if not ctx.auth.authenticated(request):
        return error(401, "missing or wrong token")
    opened = files.open_in(ctx.cfg.paths.outbox, name) if files.safe_name(name, RESULT_EXTS) else None
    if opened is None:
        raise HTTPException(404, "no such result file")
    return files.file_response(*opened, name, request.headers.get("range"))


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    ctx = ctx_of(request)
    return HTMLResponse(_html(ctx, "login.html", failed=False))


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, token: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    if ctx.auth.cross_site(request):
        return error(403, "cross-site request refused")
    if not ctx.auth.enabled:
        return RedirectResponse("/", status_code=303)
    if not ctx.auth.token_ok(token.strip()):
        return HTMLResponse(_html(ctx, "login.html", failed=True), status_code=401)
    response = RedirectResponse("/", status_code=303)
    _cookie(response, SESSION_COOKIE, ctx.auth.session_value(), request)
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    problem = ctx.auth.csrf_problem(request, csrf_token)
    if problem is not None:
        return error(403, problem)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


