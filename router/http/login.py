"""The login page and its routes: `GET /login`, `POST /login` (sets the session cookie), `POST /logout`.

See router.http.auth for the cookie and the rules.
"""

from __future__ import annotations

import html
from typing import Final
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute

from router.http.auth import COOKIE, SESSION_S
from router.http.context import HttpContext, route

_MAX_FORM: Final = 8192


_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ops-router: log in</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f4f5f7;display:flex;min-height:100vh;margin:0;
align-items:center;justify-content:center}}
form{{background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px #0002;width:min(22rem,90vw)}}
h1{{font-size:1.2rem;margin:0 0 1rem}} label{{display:block;margin-bottom:.4rem}}
input{{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem;margin-bottom:1rem}}
button{{padding:.5rem 1rem;font-size:1rem}} .error{{color:#b00020;margin:0 0 1rem}}
</style></head>
<body><form method="post" action="/login">
<h1>ops-router console</h1>{error}
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Log in</button>
</form></body></html>
"""


def login_page(error: str = "", status_code: int = 200) -> HTMLResponse:
    body = _PAGE.format(error=f'<p class="error">{html.escape(error)}</p>' if error else "")
    return HTMLResponse(body, status_code=status_code, headers={"Cache-Control": "no-store"})


def routes(ctx: HttpContext) -> list[BaseRoute]:
    auth = ctx.auth

    async def get_login(request: Request) -> Response:
        return login_page()

    async def post_login(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM:
                return login_page("That is not the token.", 413)
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        given = (fields.get("token") or [""])[0].strip()
        if not auth.required:
            return RedirectResponse("/", status_code=303)
        if not auth.token_matches(given):
            return login_page("That is not the token.", 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            auth.new_session(),
            max_age=SESSION_S,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def post_logout(request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(
            COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    return [
        route("/login", get_login, access="public"),
        route("/login", post_login, methods=["POST"], access="public"),
        route("/logout", post_logout, methods=["POST"], access="public"),
    ]
