"""What every route needs: the config, the token check, the store, the templates."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from jinja2 import Environment

from daemon.config import Config
from daemon.web.security import Auth
from daemon.web.state import StoreAccess

__all__ = ["API_PREFIX", "Ctx", "ctx_of", "error"]

API_PREFIX = "/api/v1"


@dataclass
class Ctx:
    cfg: Config
    auth: Auth
    access: StoreAccess
    templates: Environment


def ctx_of(request: Request) -> Ctx:
    ctx: Ctx = request.app.state.ctx
    return ctx


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)
