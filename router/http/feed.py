"""`GET /feed`: server-sent events for the live page (text/event-stream, UTF-8).

Events (each `event: <name>` then one `data:` line of JSON, then a blank line):

- `hello`, once at the start: `{"instance": "...", "partition_count": P, "tick_s": 1.0}`.
- `raise` and `clear`: an exception as published on `exceptions.<kind>.<rule>.<key>`
  (CONTRACT.md section 3.1, the payload's bytes unchanged), `raise` for `"status": "raised"`,
  `clear` for `"cleared"`. Live only: what was raised before the client connected comes
  from `/exceptions/open`, so a page loads that first and then applies these.
- `tick`, every second (the first at once):

      {"ts": "2026-12-02T11:00:00.000000Z",   # when it was made (RFC 3339, UTC)
       "events_per_s": 412.0,                 # events applied over the last tick, per second
       "exceptions_per_s": 3.0,               # exceptions published, per second
       "dead_letters": 7,                     # dead-lettered since this process started
       "resident_actors": 1234,
       "last_snapshot_age_s": 0.8,            # the oldest partition's
       "as_of_seq": 10234,                    # "as of stream sequence S, lag L"
       "lag": 0,                              # events stored and not yet applied (all partitions)
       "ready": true, "status": "ok",         # as /readyz and router.health say
       "partitions": [{"partition": 0, "applied_seq": 10234, "lag": 0, "caught_up": true}]}

  `as_of_seq` is the highest sequence at or below which every event is applied: the
  lowest `applied_seq` of the partitions that lag, or the highest of all when none lags.
  Counters are this instance's (the partitions it runs).

A comment line (`: keep-alive`) goes out every `HEARTBEAT_S` seconds so proxies keep the
connection open; `retry: 2000` asks the browser to reconnect after 2 s.

Cost: one core NATS subscription on `exceptions.>` per process, made when the first client
connects and dropped when the last leaves; the tick runs only while someone listens. Each
message is framed once and handed to every client's bounded buffer (`CLIENT_BUFFER` frames):
a client whose buffer is full (it does not read) is dropped, never waited for. The stream
ends when the server stops (`ctx.stopping`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Final

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.msg import Msg
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from router import health as health_model
from router.http.context import HttpContext, route

log = structlog.get_logger()

TICK_S: Final = 1.0
HEARTBEAT_S: Final = 15.0
CLIENT_BUFFER: Final = 512
MAX_CLIENTS: Final = 200
SUBJECT: Final = "exceptions.>"
_INCOMPLETE: Final = "ASGI callable returned without completing response."


class _Status(msgspec.Struct):
    status: str = ""


_STATUS: Final = msgspec.json.Decoder(_Status)
_ENC: Final = msgspec.json.Encoder()


def frame(event: str, data: bytes) -> bytes:
    """One server-sent event: `event:` and `data:` lines (a line per line of `data`)."""
    lines = data.rstrip(b"\n").split(b"\n")
    return b"event: " + event.encode() + b"\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


class _Client:
    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[bytes](CLIENT_BUFFER)
        self.scope = anyio.CancelScope()
        self.dropped = False


class Feed:
    """The fan-out: one NATS subscription and one tick loop for every client of this server."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.clients: set[_Client] = set()
        self._sub: Any = None
        self._tick_scope: anyio.CancelScope | None = None
        self._last: tuple[float, int, int] | None = None  # (monotonic, processed, exceptions)
        self.dropped = 0
        self.delivered = 0

    # --- clients ------------------------------------------------------------------------------

    async def _join(self, client: _Client) -> None:
        self.clients.add(client)
        if len(self.clients) == 1:
            await self._start()

    async def _leave(self, client: _Client) -> None:
        self.clients.discard(client)
        client.send.close()
        if not self.clients:
            await self._stop()

    def _broadcast(self, data: bytes) -> None:
        for client in list(self.clients):
            try:
                client.send.send_nowait(data)
            except anyio.WouldBlock:
                self._drop(client)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                self.clients.discard(client)

    def _drop(self, client: _Client) -> None:
        """A client that does not read: its response ends now (never waited for)."""
        self.dropped += 1
        client.dropped = True
        self.clients.discard(client)
        client.scope.cancel()
        log.info("feed_client_dropped", reason="not reading", buffered=CLIENT_BUFFER)

    # --- sources -------------------------------------------------------------------------------

    async def _start(self) -> None:
        async def on_exception(msg: Msg) -> None:
            try:
                status = _STATUS.decode(msg.data).status
            except msgspec.DecodeError:
                return
            event = "raise" if status == "raised" else "clear" if status == "cleared" else None
            if event is not None:
                self.delivered += 1
                self._broadcast(frame(event, msg.data))

        self._sub = await self.ctx.nc.subscribe(SUBJECT, cb=on_exception, pending_msgs_limit=65536)
        self._last = None
        scope = anyio.CancelScope()
        self._tick_scope = scope
        # The tick loop lives in the server's task group (see `serve`), not in a request's.
        self.ctx.spawn(self._tick_loop, scope)

    async def _stop(self) -> None:
        sub, self._sub = self._sub, None
        if self._tick_scope is not None:
            self._tick_scope.cancel()
            self._tick_scope = None
        if sub is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _tick_loop(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                self._broadcast(frame("tick", _ENC.encode(self.tick())))
                await anyio.sleep(TICK_S)

    def tick(self) -> dict[str, Any]:
        h = self.ctx.rt.health()
        now = time.monotonic()
        processed = sum(p.processed for p in h.partitions)
        exceptions = sum(p.exceptions for p in h.partitions)
        events_per_s = exceptions_per_s = 0.0
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            events_per_s = max(processed - self._last[1], 0) / dt
            exceptions_per_s = max(exceptions - self._last[2], 0) / dt
        self._last = (now, processed, exceptions)
        return {
            "ts": health_model.now_rfc3339(),
            "events_per_s": round(events_per_s, 1),
            "exceptions_per_s": round(exceptions_per_s, 1),
            "dead_letters": sum(p.dead_lettered for p in h.partitions),
            "resident_actors": sum(p.resident_actors for p in h.partitions),
            "last_snapshot_age_s": max((p.last_snapshot_age_s for p in h.partitions), default=None),
            "as_of_seq": as_of_seq(h.partitions),
            "lag": sum(p.lag for p in h.partitions),
            "ready": h.ready and bool(h.partitions),
            "status": h.status,
            "partitions": [
                {
                    "partition": p.partition,
                    "applied_seq": p.applied_seq,
                    "lag": p.lag,
                    "caught_up": p.caught_up,
                }
                for p in h.partitions
            ],
        }

    # --- the response --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            body = (
                b'{"error": "too_many_clients", "detail": "the feed serves at most %d clients"}' % MAX_CLIENTS
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        client = _Client()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
                ],
            }
        )
        hello = {
            "instance": self.ctx.rt.instance,
            "partition_count": self.ctx.cfg.router.partitions,
            "tick_s": TICK_S,
        }
        await send(
            {
                "type": "http.response.body",
                "body": b"retry: 2000\n\n" + frame("hello", _ENC.encode(hello)),
                "more_body": True,
            }
        )
        await self._join(client)
        try:
            with client.scope:
                async with anyio.create_task_group() as tg:

                    async def disconnected() -> None:
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        tg.cancel_scope.cancel()

                    async def stopping() -> None:
                        await self.ctx.stopping.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(disconnected)
                    tg.start_soon(stopping)
                    await self._pump(client, send)
        finally:
            await self._leave(client)
        if not client.dropped:
            with anyio.move_on_after(1):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, client: _Client, send: Send) -> None:
        receive: MemoryObjectReceiveStream[bytes] = client.receive
        while True:
            with anyio.move_on_after(HEARTBEAT_S):
                data = await receive.receive()
                # Whatever else is already buffered goes out in the same write.
                chunks = [data]
                while True:
                    try:
                        chunks.append(receive.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                continue
            await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})


def as_of_seq(parts: list[health_model.PartitionHealth]) -> int:
    """The stream sequence at or below which every event is applied (see the module docstring)."""
    lagging = [p.applied_seq for p in parts if p.lag > 0]
    if lagging:
        return min(lagging)
    return max((p.applied_seq for p in parts), default=0)


class _DropIncompleteNotice(logging.Filter):
    """uvicorn says "returned without completing response" for a dropped feed client: expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _INCOMPLETE


def routes(ctx: HttpContext) -> list[BaseRoute]:
    feed = Feed(ctx)
    ctx.extras["feed"] = feed
    logging.getLogger("uvicorn.error").addFilter(_DropIncompleteNotice())

    # A plain ASGI app: the response streams until the client or the server leaves.
    return [route("/feed", feed)]


__all__ = ["Feed", "as_of_seq", "frame", "routes"]
