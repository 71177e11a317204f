"""Who may call what (CONTRACT.md section 7): the token, the login page and its session cookie.

With `[http] token` set, every request needs `Authorization: Bearer <token>` or the session
cookie, except the routes marked `"public"` (/healthz, /readyz, the login page) and `"ingest"`
(which need `Authorization: Bearer <ingest_token>`, by default the token). Without a token
(the default, on loopback only) everything is open; `ingest_token` alone guards only ingest.

The login page (`GET /` without credentials, or `GET /login`) posts the token to `/login`,
which answers with a cookie `router_session` (`HttpOnly; SameSite=Strict; Path=/`, `Secure`
when the request came over https, as seen through `[http] trusted_proxies`) and a redirect to
`/`. The cookie's value is not the token: `<expiry>.<HMAC-SHA256 of it under a key drawn at
random when the process starts>`, so it dies with the process, and after `SESSION_S`.
Every comparison is constant-time (`hmac.compare_digest`); no token is ever logged, and none
is read from a URL (a `?token=` is ignored).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

Access = Literal["read", "ingest", "public"]

COOKIE: Final = "router_session"
SESSION_S: Final = 12 * 3600


log = structlog.get_logger()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


class Auth:
    """The checker: tokens resolved at start (router.secrets), a per-process session key."""

    def __init__(self, token: str | None, ingest_token: str | None = None) -> None:
        self.token = token or None
        self.ingest_token = ingest_token or self.token
        self._key = secrets.token_bytes(32)

    @property
    def required(self) -> bool:
        return self.token is not None

    @staticmethod
    def bearer(headers: Mapping[str, str]) -> str | None:
        value = headers.get("authorization")
        if value is None:
            return None
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return None
        return credentials.strip()

    def _sign(self, expiry: int) -> str:
        return hmac.new(self._key, str(expiry).encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        expiry = int(now if now is not None else time.time()) + SESSION_S
        return f"{expiry}.{self._sign(expiry)}"

    def session_valid(self, value: str | None, now: float | None = None) -> bool:
        if not value:
            return False
        expiry_text, _, mac = value.partition(".")
        if not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        ok = hmac.compare_digest(mac.encode("ascii", "replace"), self._sign(expiry).encode())
        return ok and expiry > (now if now is not None else time.time())

    def token_matches(self, given: str | None) -> bool:
        return self.token is not None and given is not None and _same(given, self.token)

    def may_read(self, request: Request) -> bool:
        """Bearer token or a valid session cookie (always, when no token is set)."""
        if self.token is None:
            return True
        return self.token_matches(self.bearer(request.headers)) or self.session_valid(
            request.cookies.get(COOKIE)
        )

    def may_ingest(self, request: Request) -> bool:
        """`Authorization: Bearer <ingest_token>` (always, when neither token is set)."""
        if self.ingest_token is None:
            return True
        given = self.bearer(request.headers)
        return given is not None and _same(given, self.ingest_token)

    def allows(self, access: Access, request: Request) -> bool:
        if access == "public":
            return True
        if access == "ingest":
            return self.may_ingest(request)
        return self.may_read(request)


def _unauthorized(request: Request, ingest: bool) -> Response:
    what = (
        "Authorization: Bearer <ingest_token>"
        if ingest
        else "Authorization: Bearer <token> or a session (log in at /)"
    )
    return JSONResponse(
        {"error": "unauthorized", "detail": f"this path needs {what}"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="ops-router"'},
    )


class AuthMiddleware:
    """Plain ASGI (so streamed responses pass untouched): the access of the route that matches, else "read"."""

    def __init__(
        self, app: ASGIApp, auth: Auth, routes: Sequence[BaseRoute], login_page: Callable[[], Response]
    ) -> None:
        self.app = app
        self.auth = auth
        self.login_page = login_page  # what `GET /` without credentials serves
        self.marked: list[tuple[BaseRoute, Access]] = [
            (r, getattr(r, "access", "read")) for r in routes if getattr(r, "access", "read") != "read"
        ]

    def access_of(self, scope: Scope) -> Access:
        for r, access in self.marked:
            match, _ = r.matches(scope)
            if match == Match.FULL:
                return access
        return "read"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        access = self.access_of(scope)
        request = Request(scope)
        if self.auth.allows(access, request):
            await self.app(scope, receive, send)
            return
        if access == "read" and scope["method"] in ("GET", "HEAD") and scope["path"] == "/":
            response: Response = self.login_page()
        else:
            response = _unauthorized(request, access == "ingest")
        # Why a request was refused, for an operator at debug level: what it presented, never its value.
        log.debug(
            "http_refused",
            method=scope["method"],
            path=scope["path"],
            needs=access,
            bearer=Auth.bearer(request.headers) is not None,
            session=COOKIE in request.cookies,
            status=response.status_code,
        )
        await response(scope, receive, send)


__all__ = ["COOKIE", "SESSION_S", "Access", "Auth", "AuthMiddleware"]
