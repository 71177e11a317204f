"""The app: built from the route lists of `route_modules()` (see router.http for the extension point)."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from router.http import console, core, feed, ingest, login, sources
from router.http.auth import AuthMiddleware
from router.http.context import HttpContext, RouteModule, route

__all__ = ["HttpContext", "RouteModule", "build_app", "route", "route_modules"]


def route_modules() -> list[RouteModule]:
    """Every module's `routes`, in order: the first route that matches a request serves it.

    To add routes: write `routes(ctx: HttpContext) -> list[BaseRoute]` in a module of this
    package (routes made with `router.http.context.route`) and name it here.
    """
    # Ingestion first: its POSTs are the requests that come by the thousand (each route tried costs a match).
    return [ingest.routes, sources.routes, core.routes, feed.routes, login.routes, console.routes]


def build_app(ctx: HttpContext, modules: Sequence[RouteModule] | None = None) -> ASGIApp:
    routes: list[BaseRoute] = []
    for module in route_modules() if modules is None else modules:
        routes.extend(module(ctx))
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return AuthMiddleware(app, ctx.auth, routes, login.login_page)
