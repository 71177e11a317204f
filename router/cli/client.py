"""For client commands (pub, state, watch, dlq, simulate): find the server and connect to it."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import anyio
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoServersError

from contracts.config import Config
from contracts.secrets import redact
from router.jetstream.connection import connect_options
from router.jetstream.embedded import read_url_file, url_file

DEFAULT_CONNECT_TIMEOUT = 2.0


class ClientError(Exception):
    """A client command cannot go on (no server, connection refused); one line for the user."""


@dataclass(frozen=True)
class ServerURL:
    """A server URL and where it came from (`--server`, `NATS_URL`, the config, the URL file)."""

    url: str
    source: str

    def __str__(self) -> str:
        """The URL as shown to people: credentials in it are masked."""
        return str(redact(self.url))


def resolve_server(
    server: str | None,
    cfg: Config,
    env: Mapping[str, str] | None = None,
) -> ServerURL:
    """The URL a client command talks to.

    In order: the `--server` flag; the `NATS_URL` environment variable; `[nats] url` of the
    config when it is not "embedded"; the URL file `<data folder>/nats.url` that a running
    router with the embedded server writes (the data folder is that of `[snapshots] path`,
    relative to the config file). Raises ClientError when none applies.
    """
    env = os.environ if env is None else env
    if server:
        return ServerURL(server.strip(), "--server")
    from_env = env.get("NATS_URL", "").strip()
    if from_env:
        return ServerURL(from_env, "NATS_URL")
    configured = cfg.nats.url.strip()
    if configured != "embedded":
        return ServerURL(configured, "[nats] url")
    path = url_file(cfg.data_dir)
    recorded = read_url_file(cfg.data_dir)
    if recorded:
        return ServerURL(recorded, str(path))
    raise ClientError(
        f"no router running with the embedded server found at {path}; "
        "start one with `router run` or pass --server (or set NATS_URL)"
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


@contextlib.asynccontextmanager
async def connect(
    server: ServerURL | str,
    *,
    cfg: Config | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    name: str = "router-cli",
    ping_interval: float = 120.0,
) -> AsyncIterator[NATS]:
    """`async with connect(url) as nc:` a connection that does not reconnect, closed on exit.

    It is closed when the server goes away (two pings unanswered, `ping_interval` apart,
    or the socket closed): a subscription's messages then end.
    """
    if isinstance(server, str):
        server = ServerURL(server, "argument")
    errors: list[BaseException] = []

    async def error_cb(exc: Exception) -> None:
        # nats-py prints every socket error by default; keep them for one message instead.
        errors.append(exc)

    opts = connect_options(cfg, server.url, name=name, error_cb=error_cb)
    nc = NATS()
    try:
        # nats-py retries a refused server forever unless max_reconnect_attempts > 0; with
        # 1 it tries each server twice, reconnect_time_wait apart, then gives up.
        with anyio.fail_after(2 * len(opts["servers"]) * (connect_timeout + 0.2) + 1):
            opts.update(
                connect_timeout=connect_timeout,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                ping_interval=ping_interval,
                max_outstanding_pings=2,
            )
            await nc.connect(**opts)
    except (NoServersError, OSError, TimeoutError, NatsError) as exc:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1), contextlib.suppress(Exception):
            await nc.close()  # a half-open socket (a TLS handshake that never came) is not left behind
        hint = ""
        if server.source not in ("--server", "NATS_URL", "[nats] url", "argument"):
            hint = f" (URL from {server.source}; is the router running?)"
        cause = errors[-1] if errors and isinstance(exc, (NoServersError, TimeoutError)) else exc
        raise ClientError(f"cannot connect to {server}: {redact(_describe(cause))}{hint}") from None
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
