"""What every route may use (`HttpContext`) and how a route is made (`route`): see router.http."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from nats.aio.client import Client as NATS
from starlette.routing import BaseRoute, Route

from contracts.config import Config
from router.engine.daemon import Runtime
from router.http.auth import Access, Auth


@dataclass
class HttpContext:
    """What every route may use; one per server (per life of the Runtime)."""

    rt: Runtime
    cfg: Config
    nc: NATS
    auth: Auth
    stopping: anyio.Event = field(default_factory=anyio.Event)
    url: str = ""  # the URL served, once bound
    # Starts a task that lives as long as the server (not a request): `ctx.spawn(fn, *args)`.
    spawn: Callable[..., Any] = field(default=lambda *_: None)
    # Per module, anything it wants to keep for the server's life (e.g. a feed's subscription).
    extras: dict[str, Any] = field(default_factory=dict)


def route(
    path: str,
    endpoint: Callable[..., Any],
    *,
    methods: Sequence[str] = ("GET",),
    access: Access = "read",
    name: str | None = None,
) -> Route:
    """A Starlette route that `AuthMiddleware` guards with `access` (see router.http)."""
    r = Route(path, endpoint, methods=list(methods), name=name)
    r.access = access  # type: ignore[attr-defined]
    return r


RouteModule = Callable[[HttpContext], list[BaseRoute]]
