"""The read API: /healthz, /readyz, /state/<kind>/<key>, /exceptions/open, /metrics (CONTRACT.md section 7).

/state answers section 5's reply: from this process (router.engine.queries.state_reply) when
it runs the key's partition, else by asking its owner on `router.state.<kind>.<key>`. A kind
or key section 1 does not allow is `400 {"error": "bad_subject", "detail": ...}`; a key never
seen is `200` with `seq` 0 (never 404); no owner answering is `503` with `Retry-After`.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

import actors
from contracts import KEY_RE
from router import health as health_model
from router.engine.open_gather import BadFilter, Incomplete, gather_open
from router.engine.queries import state_reply
from router.http.context import HttpContext, route
from router.jetstream.streams import partition_of
from snapshots import StoreDamagedError

log = structlog.get_logger()

STATE_TIMEOUT_S: Final = 3.0
OPEN_WAIT_S: Final = 5.0
_INT_RE: Final = re.compile(r"^-?[0-9]{1,9}$")
_ENC: Final = msgspec.json.Encoder()
_DEC: Final = msgspec.json.Decoder(dict[str, Any])


class _Json(Response):
    media_type = "application/json"


def json_bytes(body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return _Json(body, status_code=status_code, headers=headers)


def error(status: int, code: str, detail: str, retry_after: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


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
                {
                    "partition": p.partition,
                    "caught_up": p.caught_up,
                    "applied_seq": p.applied_seq,
                    "lag": p.lag,
                }
                for p in h.partitions
            ],
        }
        return JSONResponse(body, status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        kind, key = request.path_params["kind"], request.path_params["key"]
        if kind not in actors.ACTORS or KEY_RE.match(key) is None:
            return error(
                400,
                "bad_subject",
                f"expected /state/<sku|shipment|campaign>/<key> with a key of 1-128 of A-Z a-z 0-9 _ -, "
                f"got /state/{kind[:40]}/{key[:140]}",
            )
        partition = partition_of(key, ctx.cfg.router.partitions)
        if rt.owns(partition) and len(rt.partitions) == ctx.cfg.router.partitions:
            try:
                body = await state_reply(rt.partitions, rt.store, rt.thresholds, kind, key)
            except StoreDamagedError as exc:
                rt.store_damaged(exc)
                return error(503, "store_damaged", "the snapshot store is being rebuilt; try again", 5)
            return json_bytes(_ENC.encode(body))
        try:
            reply = await ctx.nc.request(f"router.state.{kind}.{key}", b"", timeout=STATE_TIMEOUT_S)
        except Exception as exc:
            log.debug("http_state_forward_failed", kind=kind, partition=partition, error=repr(exc))
            return error(
                503, "unavailable", f"no router answered for partition {partition} ({type(exc).__name__})", 2
            )
        try:
            forwarded = _DEC.decode(reply.data)
        except msgspec.DecodeError:
            return error(502, "bad_reply", "the owner's reply is not a JSON object")
        if "error" in forwarded:
            return error(502, "owner_failed", str(forwarded["error"]))
        return json_bytes(reply.data)

    async def exceptions_open(request: Request) -> Response:
        """Section 5.1's reply with every partition covered (`router.engine.open_gather`).

        Query parameters are the filters; an absent or empty one is no filter. A bad filter is
        `400 {"error": ...}`; partitions whose owner did not answer in time, `503`."""
        try:
            filters = open_filters(request.query_params.multi_items())
            body = await gather_open(ctx.nc, filters, wait_s=OPEN_WAIT_S)
        except BadFilter as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Incomplete as exc:
            return JSONResponse(
                {"error": str(exc), "missing": exc.missing, "partition_count": exc.partition_count},
                status_code=503, headers={"Retry-After": "2"},
            )
        return json_bytes(_ENC.encode(body), headers={"Cache-Control": "no-store"})

    async def metrics(request: Request) -> Response:
        """Prometheus text exposition of the router's registry (OpenMetrics when the scraper asks)."""
        body, content_type = await rt.metrics.scrape(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    return [
        route("/healthz", healthz, access="public"),
        route("/readyz", readyz, access="public"),
        route("/state/{kind}/{key}", state),
        route("/exceptions/open", exceptions_open),
        route("/metrics", metrics),
    ]


def open_filters(items: list[tuple[str, str]]) -> dict[str, Any]:
    """The filters of `/exceptions/open`'s query: empty values left out, `limit` as a number.

    Checking the rest (names, values) is `router.engine.open_gather`'s, as for the NATS request."""
    filters: dict[str, Any] = {}
    for name, value in items:
        if name in filters:
            raise BadFilter(f"`{name[:40]}`: given twice")
        if value == "":
            continue
        if name == "limit" and _INT_RE.match(value):
            filters[name] = int(value)
        else:
            filters[name] = value
    return filters


def ready_now(h: health_model.Health) -> bool:
    """The health model's `ready`, and at least one partition running (none yet while starting)."""
    return h.ready and bool(h.partitions)
