"""HTTP ingestion (CONTRACT.md section 7): `POST /events/<kind>/<key>` and the NDJSON batch `POST /events`.

Every event is checked exactly as the router checks it once stored (`contracts.decode.check_ingest`:
the subject, the payload, the future-`ts` guard against the time of receipt) before anything is
stored; then published into EVENTS with a JetStream publish of the body's bytes, unchanged, and
answered only after the PubAck. An `Idempotency-Key` makes the `Nats-Msg-Id`
`http:<kind>:<key>:<Idempotency-Key>` and is remembered for `[http] idempotency_ttl`
(router.jetstream.idempotency), so a retry hours later is answered with the first copy's seq.

Statuses: 202 `{"seq", "duplicate"}`; 400 `{"error", "detail"}` (a dead-letter code of section 4,
or `bad_idempotency_key`), nothing stored; 413 over the server's maximum payload; 503 with
`Retry-After` when NATS is away or the publish was not acknowledged (nothing claimed stored).

The batch form takes NDJSON lines `{"kind", "key", "event", "idempotency_key"?}` (`event` is the
payload object; its bytes as written in the line are what is stored) and answers `200` with
NDJSON, one line per input line in the same order: `{"line": N, "status": 202, "seq",
"duplicate"}` or `{"line": N, "status": 400|413|503, "error", "detail"}`. Lines are published
concurrently (several keys at once); two lines for one key are published one after the other,
in line order, so their stream order is the batch's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from contracts.config import Config, duration_us
from contracts.decode import BAD_SUBJECT, INVALID, MALFORMED, DecodeError, check_ingest, ingest_subject
from contracts.exceptions import header_bytes
from contracts.sources import IDEMPOTENCY_RE
from router.jetstream.idempotency import IdempotencyStore, IdempotencyUnavailable, bucket_name
from router.jetstream.publisher import publish_acked
from router.metrics import RouterMetrics

if TYPE_CHECKING:
    from router.http.context import HttpContext

log = structlog.get_logger()

# How long a publish waits for its PubAck before the answer is 503.
PUBLISH_TIMEOUT_S: Final = 5.0
RETRY_AFTER_S: Final = 2
# The batch form: at most this many bytes and lines in one request (larger: 413), and this
# many publishes in flight at once.
BATCH_MAX_BYTES: Final = 32 * 1024 * 1024
BATCH_MAX_LINES: Final = 20_000
BATCH_CONCURRENCY: Final = 128
BAD_IDEMPOTENCY_KEY: Final = "bad_idempotency_key"
LOG_EVERY_S: Final = 10.0
NDJSON: Final = "application/x-ndjson"


@dataclass
class Outcome:
    """What one event's ingestion came to: its HTTP status and body."""

    status: int
    seq: int | None = None
    duplicate: bool = False
    error: str | None = None
    detail: str | None = None

    def body(self) -> dict[str, Any]:
        if self.status == 202:
            return {"seq": self.seq, "duplicate": self.duplicate}
        return {"error": self.error, "detail": self.detail}


def unavailable(detail: str) -> Outcome:
    return Outcome(503, error="unavailable", detail=detail)


def too_large(size: int, limit: int) -> Outcome:
    return Outcome(413, error="too_large", detail=f"{size} bytes with headers; the NATS server takes at most {limit}")


def msg_id(kind: str, key: str, idem: str) -> str:
    """The `Nats-Msg-Id` of an event with an idempotency key (CONTRACT section 7)."""
    return f"http:{kind}:{key}:{idem}"


def idempotency_problem(value: str) -> str | None:
    if IDEMPOTENCY_RE.match(value):
        return None
    return f"Idempotency-Key must be 1-128 printable ASCII characters, got {len(value)} characters"


class Ingestor:
    """Checks, publishes and remembers; shared by `/events`, its batch form and `/sources/<name>`."""

    def __init__(self, nc: NATS, cfg: Config, metrics: RouterMetrics | None = None,
                 store: IdempotencyStore | None = None) -> None:
        self.nc = nc
        self.cfg = cfg
        self.max_skew_us = duration_us(cfg.rules.max_future_skew)
        self.store = store or IdempotencyStore(
            nc, bucket_name(cfg.router.consumer), duration_us(cfg.http.idempotency_ttl) / 1e6, cfg.streams.replicas
        )
        self.metrics = metrics or RouterMetrics()
        counter = self.metrics.http_ingested
        self._stored, self._duplicate = counter.labels("stored"), counter.labels("duplicate")
        self._rejected, self._too_large = counter.labels("rejected"), counter.labels("too_large")
        self._unavailable = counter.labels("unavailable")
        self._logged: dict[str, tuple[float, int]] = {}

    def _warn(self, event: str, **fields: Any) -> None:
        """A warning at most every LOG_EVERY_S per kind of event (an outage fails every request)."""
        now = time.monotonic()
        last, count = self._logged.get(event, (-LOG_EVERY_S, 0))
        if now - last < LOG_EVERY_S:
            self._logged[event] = (last, count + 1)
            return
        log.warning(event, **fields, since_last_line=count)
        self._logged[event] = (now, 0)

    def reject(self) -> None:
        self._rejected.inc()

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload or 1024 * 1024)

    def check(self, kind: str, key: str, data: bytes, receipt_us: int, idem: str | None) -> Outcome | None:
        """The 400 or 413 of an event, or None when it may be stored."""
        if idem is not None and (problem := idempotency_problem(idem)) is not None:
            self._rejected.inc()
            return Outcome(400, error=BAD_IDEMPOTENCY_KEY, detail=problem)
        try:
            check_ingest(kind, key, data, receipt_us, self.max_skew_us)
        except DecodeError as err:
            self._rejected.inc()
            return Outcome(400, error=err.code, detail=err.detail)
        size = len(data) + header_bytes(self.headers(kind, key, idem))
        if size > self.max_payload:
            self._too_large.inc()
            return too_large(size, self.max_payload)
        return None

    def headers(self, kind: str, key: str, idem: str | None) -> dict[str, str]:
        headers = {"Nats-Expected-Stream": self.cfg.streams.events}
        if idem is not None:
            headers["Nats-Msg-Id"] = msg_id(kind, key, idem)
        return headers

    async def ingest(self, kind: str, key: str, data: bytes, idem: str | None, receipt_us: int) -> Outcome:
        """Check, then store one event (see the module's text)."""
        bad = self.check(kind, key, data, receipt_us, idem)
        if bad is not None:
            return bad
        return await self.store_checked(kind, key, data, idem)

    async def known(self, msg_ids: set[str]) -> dict[str, int | Outcome]:
        """The first seqs of the ids already stored (one lookup for many); every id mapped to a
        503 when the lookup cannot be made."""
        if not msg_ids:
            return {}
        failed: Outcome | None = None
        if not self.nc.is_connected:
            failed = unavailable("NATS is not connected; nothing was stored")
        else:
            try:
                return dict(await self.store.first_seqs(msg_ids))
            except IdempotencyUnavailable as exc:
                failed = unavailable(f"the idempotency record could not be read: {exc}")
        self._unavailable.inc(len(msg_ids))
        return dict.fromkeys(msg_ids, failed)

    def duplicate(self) -> None:
        self._duplicate.inc()

    async def store_checked(self, kind: str, key: str, data: bytes, idem: str | None, *,
                            looked_up: bool = False) -> Outcome:
        """Store an event `check` passed: the idempotency record (unless `looked_up` already),
        the publish, the record again."""
        if not self.nc.is_connected:
            self._unavailable.inc()
            return unavailable("NATS is not connected; nothing was stored")
        mid = msg_id(kind, key, idem) if idem is not None else None
        try:
            if mid is not None and not looked_up:
                first = await self.store.first_seq(mid)
                if first is not None:
                    self._duplicate.inc()
                    return Outcome(202, seq=first, duplicate=True)
            subject = f"events.{kind}.{key}"
            ack = await publish_acked(self.nc, subject, data, self.headers(kind, key, idem), PUBLISH_TIMEOUT_S)
            if mid is not None:
                await self.store.remember(mid, int(ack.seq))
        except IdempotencyUnavailable as exc:
            self._unavailable.inc()
            self._warn("ingest_idempotency_unavailable", error=str(exc)[:300])
            return unavailable(f"the idempotency record could not be read or written: {exc}")
        except Exception as exc:  # a timeout, no responders, an API error, the connection lost
            self._unavailable.inc()
            self._warn("ingest_unacknowledged", subject=f"events.{kind}.{key}", error=f"{type(exc).__name__}: {exc}"[:300])
            return unavailable(f"the publish was not acknowledged ({type(exc).__name__}); nothing is claimed stored")
        (self._duplicate if ack.duplicate else self._stored).inc()
        return Outcome(202, seq=int(ack.seq), duplicate=bool(ack.duplicate))


def respond(outcome: Outcome) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if outcome.status == 503 else None
    return JSONResponse(outcome.body(), status_code=outcome.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None once it runs over `limit` bytes (the rest is not read)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _Line(msgspec.Struct, forbid_unknown_fields=False):
    kind: str
    key: str
    event: msgspec.Raw
    idempotency_key: str | None = None


_LINE: Final = msgspec.json.Decoder(_Line)


def ingestor(ctx: HttpContext) -> Ingestor:
    """The server's one Ingestor (its idempotency bucket is bound on first use)."""
    found = ctx.extras.get("ingest")
    if found is None:
        found = ctx.extras["ingest"] = Ingestor(ctx.nc, ctx.cfg, ctx.rt.metrics)
    assert isinstance(found, Ingestor)
    return found


def routes(ctx: HttpContext) -> list[BaseRoute]:
    from router.http.context import route

    ing = ingestor(ctx)

    async def post_event(request: Request) -> Response:
        receipt_us = time.time_ns() // 1000
        rest: str = request.path_params["rest"]
        kind, _, key = rest.partition("/")
        try:
            ingest_subject(kind, key)
        except DecodeError as err:
            ing.reject()
            return respond(Outcome(400, error=BAD_SUBJECT, detail=err.detail))
        body = await read_body(request, ing.max_payload)
        if body is None:
            ing.metrics.http_ingested.labels("too_large").inc()
            return respond(too_large(int(request.headers.get("content-length") or 0) or ing.max_payload + 1,
                                     ing.max_payload))
        idem = request.headers.get("idempotency-key")
        return respond(await ing.ingest(kind, key, body, idem, receipt_us))

    async def post_batch(request: Request) -> Response:
        receipt_us = time.time_ns() // 1000
        body = await read_body(request, BATCH_MAX_BYTES)
        if body is None:
            return respond(Outcome(413, error="too_large", detail=f"a batch is at most {BATCH_MAX_BYTES} bytes"))
        lines = body.split(b"\n")
        if len(lines) > BATCH_MAX_LINES + 1:
            return respond(Outcome(413, error="too_large", detail=f"a batch is at most {BATCH_MAX_LINES} lines"))
        if not any(line.strip() for line in lines):
            return respond(Outcome(400, error="empty", detail='a batch is NDJSON: one {"kind","key","event"} object per line'))
        answers = await batch(ing, lines, receipt_us)
        retry = any(a.get("status") == 503 for a in answers)
        text = b"".join(msgspec.json.encode(a) + b"\n" for a in answers)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
        return Response(text, status_code=200, media_type=NDJSON, headers=headers)

    return [
        route("/events", post_batch, methods=["POST"], access="ingest"),
        route("/events/{rest:path}", post_event, methods=["POST"], access="ingest"),
    ]


async def batch(ing: Ingestor, lines: list[bytes], receipt_us: int) -> list[dict[str, Any]]:
    """One answer per non-blank line, in line order; lines of one key stored in line order.

    The idempotency keys of the whole batch are looked up first, in one request per
    MULTI_LAST keys; then each key's lines are published in line order, keys concurrently."""
    answers: list[dict[str, Any]] = []
    todo: list[tuple[dict[str, Any], _Line, bytes]] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        answer: dict[str, Any] = {"line": number}
        answers.append(answer)
        try:
            line = _LINE.decode(raw)
        except msgspec.ValidationError as exc:
            answer.update(status=400, error=INVALID, detail=f"line {number}: {exc}")
            ing.reject()
            continue
        except msgspec.DecodeError as exc:
            answer.update(status=400, error=MALFORMED, detail=f"line {number} is not one JSON object: {exc}")
            ing.reject()
            continue
        data = bytes(line.event)
        bad = ing.check(line.kind, line.key, data, receipt_us, line.idempotency_key)
        if bad is not None:
            answer.update(status=bad.status, **bad.body())
            continue
        todo.append((answer, line, data))

    known = await ing.known({msg_id(ln.kind, ln.key, ln.idempotency_key) for _, ln, _ in todo
                             if ln.idempotency_key is not None})
    # Per key, the lines to publish in line order: a chain run by one task.
    chains: dict[tuple[str, str], list[tuple[dict[str, Any], _Line, bytes]]] = {}
    for answer, line, data in todo:
        first = known.get(msg_id(line.kind, line.key, line.idempotency_key)) if line.idempotency_key else None
        if isinstance(first, Outcome):  # the lookup failed
            answer.update(status=first.status, **first.body())
        elif first is not None:
            ing.duplicate()
            answer.update(status=202, seq=first, duplicate=True)
        else:
            chains.setdefault((line.kind, line.key), []).append((answer, line, data))

    limiter = anyio.CapacityLimiter(BATCH_CONCURRENCY)

    async def run_chain(jobs: list[tuple[dict[str, Any], _Line, bytes]]) -> None:
        async with limiter:
            for answer, line, data in jobs:
                outcome = await ing.store_checked(line.kind, line.key, data, line.idempotency_key, looked_up=True)
                answer.update(status=outcome.status, **outcome.body())

    async with anyio.create_task_group() as tg:
        for jobs in chains.values():
            tg.start_soon(run_chain, jobs)
    return answers
