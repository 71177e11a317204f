"""Partner webhooks: `POST /sources/<name>`, mapped by `[sources.<name>]` (contracts/sources.py).

A source with `signature_header` and a secret is authenticated by its signature alone: the
HMAC-SHA256 of the raw body under the secret, in that header (hex or base64, after an
optional prefix), compared in constant time. A wrong or missing signature answers 401 and
nothing is kept. A source without one takes `Authorization: Bearer <ingest_token>` instead.

A signed payload is mapped onto events, each checked as `POST /events/<kind>/<key>` checks
one, and stored in payload order; the answer, 202, lists them (`{"events": [{"kind", "key",
"seq", "duplicate"}]}`). A payload the mapping cannot turn into valid events stores none of
its events: it is answered 202 with the reason (`{"error": "unmapped", "detail", ...}`) and
kept in DEADLETTER on `deadletter.unknown` with `Router-Error: unmapped`, the reason in
`Router-Detail`, the source's name in `Router-Subject` and a `Nats-Msg-Id` from the body's
SHA-256, so a partner that retries it is stored once. (A webhook sender that keeps getting
errors disables the webhook: the payload waits in DEADLETTER, `router dlq` shows it.)
503 with `Retry-After` when NATS is away: the partner retries, and the idempotency keys
(`idempotency_key` of the mapping) make the events stored before the failure duplicates.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from contracts.exceptions import fit_dead_letter
from contracts.sources import (
    Mapped,
    MappingError,
    SourceConfig,
    SourceMapping,
    body_id,
    compile_source,
    signature_ok,
)
from router.http.ingest import (
    PUBLISH_TIMEOUT_S,
    Ingestor,
    Outcome,
    ingestor,
    read_body,
    respond,
    too_large,
    unavailable,
)
from router.jetstream.publisher import publish_acked
from router.secrets import resolve_secret

if TYPE_CHECKING:
    from router.http.context import HttpContext

log = structlog.get_logger()

UNMAPPED: Final = "unmapped"


class Source:
    """One configured source: its compiled mapping and its secret (None: the ingest token)."""

    def __init__(self, name: str, src: SourceConfig, secret: str | None) -> None:
        self.name = name
        self.config = src
        self.mapping: SourceMapping = compile_source(name, src)
        self.secret = secret.encode() if secret is not None and src.signature_header else None


def load_sources(ctx: HttpContext) -> dict[str, Source]:
    cfg = ctx.cfg
    return {
        name: Source(name, src, resolve_secret(cfg, f"sources.{name}", "secret"))
        for name, src in cfg.sources.items()
    }


def routes(ctx: HttpContext) -> list[BaseRoute]:
    from router.http.context import route

    sources = load_sources(ctx)
    ing = ingestor(ctx)

    async def post_source(request: Request) -> Response:
        receipt_us = time.time_ns() // 1000
        name: str = request.path_params["name"]
        source = sources.get(name)
        if source is None:
            return JSONResponse({"error": "unknown_source", "detail": f"no source {name!r} is configured"}, 404)
        if source.secret is None and not ctx.auth.may_ingest(request):
            return _unauthorized("this source takes Authorization: Bearer <ingest_token>")
        body = await read_body(request, ing.max_payload)
        if body is None:
            return respond(too_large(int(request.headers.get("content-length") or 0), ing.max_payload))
        if source.secret is not None:
            sc = source.config
            given = request.headers.get(sc.signature_header)
            if not signature_ok(source.secret, body, given, sc.signature_encoding, sc.signature_prefix):
                ing.metrics.http_source_payloads.labels(name, "bad_signature").inc()
                log.info("source_signature_refused", source=name, header=sc.signature_header,
                         present=given is not None, client=request.client.host if request.client else None)
                return _unauthorized(f"the {sc.signature_header} signature does not match the body")
        return await accept(ing, source, body, dict(request.headers), receipt_us)

    return [route("/sources/{name}", post_source, methods=["POST"], access="public")]


def _unauthorized(detail: str) -> Response:
    return JSONResponse({"error": "unauthorized", "detail": detail}, status_code=401)


def map_payload(ing: Ingestor, source: Source, body: bytes, headers: dict[str, str], receipt_us: int) -> list[Mapped]:
    """The payload's events, each checked; MappingError with the reason when it has none that valid."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise MappingError(f"the payload is not JSON: {exc}") from None
    events = source.mapping.apply(doc, headers)
    for ev in events:  # checked as POST /events/<kind>/<key> checks one (contracts.decode.check_ingest)
        bad = ing.check(ev.kind, ev.key, ev.data, receipt_us, ev.idempotency_key)
        if bad is not None:
            raise MappingError(f"{ev.kind} {ev.key!r} from {ev.where}: {bad.error}: {bad.detail}")
    return events


async def accept(ing: Ingestor, source: Source, body: bytes, headers: dict[str, str], receipt_us: int) -> Response:
    counted = ing.metrics.http_source_payloads
    try:
        events = map_payload(ing, source, body, headers, receipt_us)
    except MappingError as exc:
        response = await _dead_letter(ing, source, body, str(exc))
        counted.labels(source.name, "unmapped" if response.status_code == 202 else "unavailable").inc()
        return response
    stored: list[dict[str, Any]] = []
    for ev in events:  # in payload order: one key's events keep theirs
        outcome = await ing.store_checked(ev.kind, ev.key, ev.data, ev.idempotency_key)
        if outcome.status != 202:
            counted.labels(source.name, "unavailable").inc()
            return respond(_partial(outcome, len(stored), len(events)))
        stored.append({"kind": ev.kind, "key": ev.key, "seq": outcome.seq, "duplicate": outcome.duplicate})
    counted.labels(source.name, "mapped").inc()
    return JSONResponse({"events": stored}, status_code=202)


def _partial(outcome: Outcome, done: int, total: int) -> Outcome:
    if done:
        outcome.detail = f"{outcome.detail} ({done} of {total} events stored before; retry the whole payload)"
    return outcome


async def _dead_letter(ing: Ingestor, source: Source, body: bytes, reason: str) -> Response:
    """Keep an unmappable payload in DEADLETTER (once per distinct body) and answer 202 with the reason."""
    detail = " ".join(reason.split())[:1000]
    if not ing.nc.is_connected:
        return respond(unavailable("NATS is not connected; the payload was not kept"))
    msg_id = body_id(source.name, body)
    headers = {
        "Nats-Msg-Id": msg_id,
        "Router-Error": UNMAPPED,
        "Router-Detail": detail,
        "Router-Subject": source.name,
    }
    data = fit_dead_letter(body, headers, ing.max_payload - len(f"Nats-Expected-Stream: {ing.cfg.streams.deadletter}\r\n"))
    try:
        headers["Nats-Expected-Stream"] = ing.cfg.streams.deadletter
        ack = await publish_acked(ing.nc, "deadletter.unknown", data, headers, PUBLISH_TIMEOUT_S)
    except Exception as exc:
        log.warning("source_dead_letter_unacknowledged", source=source.name, error=f"{type(exc).__name__}: {exc}"[:300])
        return respond(unavailable(f"the payload could not be kept ({type(exc).__name__}); retry"))
    log.info("source_unmapped", source=source.name, detail=detail, deadletter_seq=ack.seq)
    return JSONResponse(
        {"error": UNMAPPED, "detail": detail, "deadletter_seq": int(ack.seq), "duplicate": bool(ack.duplicate)},
        status_code=202,
    )
