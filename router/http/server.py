"""The HTTP service of `router run`: uvicorn in-process, on the router's event loop.

`http_service(cfg)` is a `router.engine.daemon.Service`: it binds `[http] listen` (a bind that
fails stops the start: `cannot listen on ... (http.listen)`), writes the URL it serves to
`<data>/http.url` (removed again at stop), and serves until cancelled, which the daemon does
after its graceful stop; then it stops accepting, tells long-lived responses to end
(`ctx.stopping`) and waits for open requests at most `GRACE_S`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import structlog
import uvicorn

from contracts.config import Config, parse_listen
from router.engine.daemon import Runtime, Service
from router.errors import FatalError
from router.http.app import build_app
from router.http.auth import Auth
from router.http.context import HttpContext
from router.secrets import resolve_secret

log = structlog.get_logger()

URL_FILE: Final = "http.url"
GRACE_S: Final = 2.0


def url_file(data_dir: Path) -> Path:
    return Path(data_dir) / URL_FILE


def read_url_file(data_dir: Path) -> str | None:
    """The URL in `<data_dir>/http.url`, or None."""
    try:
        text = url_file(data_dir).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text.splitlines()[0].strip() if text else None


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the router owns SIGTERM and SIGINT."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = anyio.Event()  # set once it accepts connections, or has ended

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()


def bind(listen: str) -> socket.socket:
    """A listening socket on `listen` ("host:port"); FatalError naming the key when it cannot."""
    parsed = parse_listen(listen)
    assert parsed is not None
    host, port = parsed
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
    except OSError as exc:
        raise FatalError(f"cannot listen on {listen} (http.listen): {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise FatalError(
            f"cannot listen on {listen} (http.listen): {exc.strerror or exc}; "
            'choose another port (e.g. listen = "127.0.0.1:8081"), or "127.0.0.1:0" for any free one'
        ) from None
    return sock


def served_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def http_service(cfg: Config) -> Service | None:
    """The service for `router.engine.daemon.run`, or None when `[http] listen = "off"`.

    The tokens are resolved now (a missing `_file` or `_env` is a config error at start)."""
    if parse_listen(cfg.http.listen) is None:
        return None
    auth = Auth(resolve_secret(cfg, "http", "token"), resolve_secret(cfg, "http", "ingest_token"))

    async def service(rt: Runtime, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        await serve(rt, auth, task_status=task_status)

    return service


async def serve(rt: Runtime, auth: Auth, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    cfg = rt.cfg
    sock = bind(cfg.http.listen)
    ctx = HttpContext(rt=rt, cfg=cfg, nc=rt.nc, auth=auth, url=served_url(sock))
    config = uvicorn.Config(
        build_app(ctx),
        http="h11",
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips=[p.strip() for p in cfg.http.trusted_proxies],
        timeout_graceful_shutdown=int(GRACE_S),
        timeout_keep_alive=30,
    )
    # uvicorn's own lines ("Started server process") are below the router's: warnings and errors only.
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
    server = _Server(config)
    done = anyio.Event()

    async def run_server() -> None:
        # Shielded: a stop cancels the service, and the server then closes gracefully (below).
        try:
            with anyio.CancelScope(shield=True):
                await server.serve(sockets=[sock])
        finally:
            done.set()
            server.up.set()

    path = url_file(cfg.data_dir)
    async with anyio.create_task_group() as tg:
        ctx.spawn = tg.start_soon
        tg.start_soon(run_server)
        try:
            with anyio.move_on_after(10):
                await server.up.wait()
            if not server.started:
                raise FatalError(f"the HTTP server on {cfg.http.listen} (http.listen) did not start")
            _write_atomic(path, ctx.url + "\n")
            log.info("http_listening", url=ctx.url, auth="token" if auth.required else "none")
            task_status.started()
            await anyio.sleep_forever()
        finally:
            ctx.stopping.set()
            server.should_exit = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(GRACE_S + 2):
                await done.wait()
            if not done.is_set():
                server.force_exit = True
            if read_url_file(cfg.data_dir) == ctx.url:
                with contextlib.suppress(OSError):
                    path.unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
