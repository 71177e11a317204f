"""The read API: /healthz, /readyz (CONTRACT.md section 7)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from router import health as health_model
from router.http.context import HttpContext, route


def routes(ctx: HttpContext) -> list[BaseRoute]:
    rt = ctx.rt

    async def healthz(request: Request) -> Response:
        """200 while the process runs (and serves HTTP)."""
        return JSONResponse({"status": "alive", "pid": rt.health().pid})

    async def readyz(request: Request) -> Response:
        """200 once connected, streams ready and the backlog present at start applied, else 503.

        The body is the health model's summary either way (`router.health` has it all)."""
        h = rt.health()
        ready = ready_now(h)
        body = {
            "ready": ready,
            "status": h.status,
            "nats": h.nats,
            "role": h.role,
            "partitions": [
                {"partition": p.partition, "caught_up": p.caught_up, "applied_seq": p.applied_seq, "lag": p.lag}
                for p in h.partitions
            ],
        }
        return JSONResponse(body, status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})

    return [
        route("/healthz", healthz, access="public"),
        route("/readyz", readyz, access="public"),
    ]


def ready_now(h: health_model.Health) -> bool:
    """The health model's `ready`, and at least one partition running (none yet while starting)."""
    return h.ready and bool(h.partitions)
