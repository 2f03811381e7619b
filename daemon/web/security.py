"""Who may use the page and the API, and which browser requests may change something.

- A bearer token (``web.token_file``, else the environment variable ``web.token_env``) is required
  whenever the server binds anything but loopback; :func:`check_bind` refuses to start otherwise.
  Without a token (loopback only) anyone on this host may use it, as with the CLI.
- API clients send ``Authorization: Bearer <token>``. The page logs in once with the token and
  gets a session cookie (HttpOnly, SameSite=Strict) that is an HMAC of the token, so changing the
  token logs every browser out and the cookie never contains the token itself.
- Cross-site request forgery: a request that changes something and is not authenticated by the
  bearer header (which a cross-site page cannot send without a CORS preflight this app never
  answers) must carry the page's CSRF value (header ``X-CSRF-Token`` or form field
  ``csrf_token``) equal to its ``itd_csrf`` cookie, and must not come from another origin
  (``Origin`` / ``Sec-Fetch-Site``). Requests with none of a browser's signs (no cookie, no
  Origin, no Sec-Fetch-Site: curl, scripts) need only the token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from daemon.config import WebConfig

__all__ = ["TokenError", "Auth", "load_token", "is_loopback", "check_bind", "SESSION_COOKIE", "CSRF_COOKIE"]

SESSION_COOKIE = "itd_session"
CSRF_COOKIE = "itd_csrf"
CSRF_HEADER = "x-csrf-token"


class TokenError(ValueError):
    """The token cannot be read, or is required and missing. The message names the key."""


def load_token(web: WebConfig) -> str | None:
    """The bearer token: the first line of ``web.token_file``, else ``$web.token_env``; None if unset."""
    if web.token_file is not None:
        try:
            text = web.token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenError(f"web.token_file {web.token_file}: cannot read it ({exc.strerror or exc})") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if len(token) < 16:
            raise TokenError(f"web.token_file {web.token_file}: the token must be at least 16 characters "
                             "(make one with: openssl rand -hex 32)")
        return token
    token = os.environ.get(web.token_env, "").strip()
    if token and len(token) < 16:
        raise TokenError(f"${web.token_env} (web.token_env): the token must be at least 16 characters")
    return token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(web: WebConfig, token: str | None) -> None:
    if token is None and not is_loopback(web.host):
        raise TokenError(f"web.host is {web.host!r}, not a loopback address, and no token is set: put one in "
                         f"web.token_file or ${web.token_env} (e.g. openssl rand -hex 32), or bind 127.0.0.1")


def _same_origin(request: Request, origin: str) -> bool:
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    return bool(host) and parts.netloc == host and parts.scheme in ("http", "https")


@dataclass(frozen=True)
class Auth:
    token: str | None

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def session_value(self) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), b"infinitetalkd-web-session-v1", hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def bearer_ok(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def authenticated(self, request: Request) -> bool:
        if not self.enabled or self.bearer_ok(request):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.session_value().encode())

    @staticmethod
    def cross_site(request: Request) -> bool:
        """A browser says this request comes from another site (or an opaque origin)."""
        origin = request.headers.get("origin")
        if origin is not None and not _same_origin(request, origin):
            return True
        return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")

    def csrf_problem(self, request: Request, form_value: str | None = None) -> str | None:
        """Why a state-changing request is refused as possibly forged; None when it may go ahead."""
        if self.enabled and self.bearer_ok(request):
            return None
        if self.cross_site(request):
            return "cross-site request refused"
        browser = bool(request.cookies) or "origin" in request.headers or "sec-fetch-site" in request.headers
        if not browser:
            return None
        cookie = request.cookies.get(CSRF_COOKIE, "")
        given = request.headers.get(CSRF_HEADER) or form_value or ""
        if not cookie or not given or not hmac.compare_digest(cookie.encode(), given.encode()):
            return "missing or wrong CSRF token (reload the page)"
        return None


def new_csrf_value() -> str:
    return secrets.token_urlsafe(32)
