"""Who may call the HTTP API (CONTRACT.md section 7): bearer token, login page and session cookie,
the separate ingest token, and no token in any log line."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router.http.auth import COOKIE, SESSION_S, Auth, AuthMiddleware
from router.http.context import route
from router.http.login import login_page
from tests.router.test_http import served, wait_status
from tests.support.natsserver import NatsServer

TOKEN = "read-T0ken-with:odd/chars=="
INGEST = "ingest-T0ken-42"


class _Client:
    """A synchronous face over httpx's ASGI transport (starlette's TestClient wants another package)."""

    def __init__(self, app: object) -> None:
        self.app = app

    def _call(self, method: str, path: str, **kw: object) -> httpx.Response:
        import anyio

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.request(method, path, **kw)  # type: ignore[arg-type]

        return anyio.run(go)

    def get(self, path: str, **kw: object) -> httpx.Response:
        return self._call("GET", path, **kw)

    def post(self, path: str, **kw: object) -> httpx.Response:
        return self._call("POST", path, **kw)


def _app(auth: Auth) -> _Client:
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    routes = [
        route("/public", ok, access="public"),
        route("/events/{kind}/{key}", ok, methods=["POST"], access="ingest"),
        route("/state/{kind}/{key}", ok),
        route("/", ok),
    ]
    return _Client(AuthMiddleware(Starlette(routes=routes), auth, routes, login_page))


def test_access_levels_with_both_tokens() -> None:
    client = _app(Auth(TOKEN, INGEST))
    read = {"Authorization": f"Bearer {TOKEN}"}
    ingest = {"Authorization": f"Bearer {INGEST}"}
    assert client.get("/public").status_code == 200
    r = client.get("/state/sku/A")
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/state/sku/A", headers=read).status_code == 200
    assert client.get("/state/sku/A", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert client.get("/state/sku/A", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
    assert client.get("/state/sku/A", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get(f"/state/sku/A?token={TOKEN}").status_code == 401  # never from a URL
    assert client.get("/state/sku/A", headers=ingest).status_code == 401  # a bridge cannot read
    assert client.get("/nowhere").status_code == 401  # a path no route claims is "read"
    assert client.post("/events/sku/A", content=b"{}").status_code == 401
    assert client.post("/events/sku/A", content=b"{}", headers=read).status_code == 401
    assert client.post("/events/sku/A", content=b"{}", headers=ingest).status_code == 200


def test_ingest_token_defaults_to_token_and_no_token_means_open() -> None:
    client = _app(Auth(TOKEN))
    assert client.post("/events/sku/A", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.post("/events/sku/A").status_code == 401
    open_client = _app(Auth(None))
    assert open_client.get("/state/sku/A").status_code == 200
    assert open_client.post("/events/sku/A").status_code == 200
    only_ingest = _app(Auth(None, INGEST))
    assert only_ingest.get("/state/sku/A").status_code == 200
    assert only_ingest.post("/events/sku/A").status_code == 401


def test_session_values_are_signed_and_expire() -> None:
    auth = Auth(TOKEN)
    now = time.time()
    value = auth.new_session(now)
    assert TOKEN not in value
    assert auth.session_valid(value, now)
    assert not auth.session_valid(value, now + SESSION_S + 1)
    expiry, _, mac = value.partition(".")
    assert not auth.session_valid(f"{int(expiry) + 1000}.{mac}", now)  # a later expiry: the MAC differs
    assert not auth.session_valid(f"{expiry}.{'0' * len(mac)}", now)
    assert not auth.session_valid("garbage", now)
    assert not Auth(TOKEN).session_valid(value, now)  # another process's key


def post(client: httpx.Client, path: str, **kw: object) -> httpx.Response:
    """A POST that keeps no cookie (the client's jar would authorize what follows)."""
    return httpx.post(f"{client.base_url}".rstrip("/") + path, **kw)  # type: ignore[arg-type]


def test_login_flow_against_a_router(tmp_path: Path, nats_server: NatsServer) -> None:
    http = {"listen": "127.0.0.1:0", "token": TOKEN, "ingest_token": INGEST}
    # At debug: no line of any level may carry a token or a session.
    with served(tmp_path, nats_server.url, http=http, log={"level": "debug"}) as (rp, client):
        assert client.get("/healthz").status_code == 200
        wait_status(client, "/readyz", 200)  # public
        assert client.get("/metrics").status_code == 401
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<form method="post" action="/login">' in page.text
        assert TOKEN not in page.text
        bad = post(client, "/login", data={"token": "wrong"})
        assert bad.status_code == 401
        assert "set-cookie" not in bad.headers
        good = post(client, "/login", data={"token": TOKEN})
        assert good.status_code == 303
        assert good.headers["location"] == "/"
        cookie = good.headers["set-cookie"]
        attrs = [a.strip().lower() for a in cookie.split(";")]
        assert "httponly" in attrs
        assert "samesite=strict" in attrs
        assert "path=/" in attrs
        assert "secure" not in attrs  # plain http
        value = cookie.split(";")[0].split("=", 1)[1]
        assert TOKEN not in value
        assert client.get("/readyz", headers={"Cookie": f"{COOKIE}={value}"}).status_code == 200
        assert (
            client.get("/nowhere", headers={"Cookie": f"{COOKIE}={value}"}).status_code == 404
        )  # authorized: past the guard
        assert client.get("/nowhere", headers={"Cookie": f"{COOKIE}={value}0"}).status_code == 401
        assert client.get("/nowhere", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
        # Behind a TLS-terminating proxy on loopback (trusted by default): the cookie is Secure.
        proxied = post(client, "/login", data={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"})
        assert "secure" in [a.strip().lower() for a in proxied.headers["set-cookie"].split(";")]
        event = b'{"type": "received", "location": "BLR-DS-4", "qty": 3}'
        stored = post(client, "/events/sku/SKU-AUTH", content=event, headers={"Authorization": f"Bearer {INGEST}"})
        assert stored.status_code == 202, stored.text
        assert post(client, "/events/sku/SKU-AUTH", content=event, headers={"Cookie": f"{COOKIE}={value}"}).status_code == 401
        assert client.get("/state/sku/SKU-AUTH", headers={"Authorization": f"Bearer {INGEST}"}).status_code == 401
        logout = post(client, "/logout", headers={"Cookie": f"{COOKIE}={value}"})
        assert logout.status_code == 303
        assert (
            'router_session=""' in logout.headers["set-cookie"]
            or "max-age=0" in logout.headers["set-cookie"].lower()
        )
    log = rp.log_text()
    assert "http_listening" in log
    # At debug, each refusal says what was presented (never its value), and nothing else holds a secret.
    refused = [e for e in rp.log_events() if e.get("event") == "http_refused"]
    assert refused
    assert all(e["level"] == "debug" for e in refused)
    assert any(e["path"] == "/nowhere" and e["session"] and not e["bearer"] and e["status"] == 401 for e in refused)
    assert any(e["path"] == "/events/sku/SKU-AUTH" and e["needs"] == "ingest" for e in refused)
    assert TOKEN not in log
    assert INGEST not in log
    assert value not in log


def test_untrusted_forwarded_proto_is_ignored(tmp_path: Path, nats_server: NatsServer) -> None:
    http = {"listen": "127.0.0.1:0", "token": TOKEN, "trusted_proxies": ["10.9.9.9"]}
    with served(tmp_path, nats_server.url, http=http) as (_, client):
        r = post(client, "/login", data={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 303
        assert "secure" not in [a.strip().lower() for a in r.headers["set-cookie"].split(";")]


def test_token_from_a_file_and_non_loopback_with_token(tmp_path: Path, nats_server: NatsServer) -> None:
    secret = tmp_path / "http_token"
    secret.write_text(TOKEN + "\n")
    http = {"listen": "0.0.0.0:0", "token_file": str(secret), "ingest_token_env": "NO_SUCH_VARIABLE_HERE"}
    from tests.support.procs import router_executable, write_config

    config = tmp_path / "config.toml"
    write_config(config, nats_server.url, http=http)
    import subprocess

    proc = subprocess.run(
        [router_executable(), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "http.ingest_token_env: environment variable NO_SUCH_VARIABLE_HERE is not set" in proc.stderr
    del http["ingest_token_env"]
    with served(tmp_path, nats_server.url, http=http) as (rp, client):
        assert client.get("/nowhere").status_code == 401
        assert str(client.base_url).startswith("http://0.0.0.0:")
        assert client.get("/nowhere", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert TOKEN not in rp.log_text()
