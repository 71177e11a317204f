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
connection open; `retry: 2000` asks the browser to reconnect after 2 s. A client's events
are written in batches, at most every `FLUSH_S` (0.1 s).

Cost: one core NATS subscription on `exceptions.>` per process (its messages handed over by
the protocol parser, headers unparsed), made when the first client
connects and dropped when the last leaves; the tick runs only while someone listens. Each
message is framed once into one bounded list of frames (`BACKLOG`) that every client reads
from with its own cursor: a client that falls more than `BACKLOG` frames behind (it does not
read) is dropped, never waited for. The stream ends when the server stops (`ctx.stopping`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from typing import Any, Final

import anyio
import msgspec
import structlog
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from router import health as health_model
from router.http.context import HttpContext, route

log = structlog.get_logger()

TICK_S: Final = 1.0
FIRST_TICK_S: Final = 0.25  # the first tick: soon, but over a reading the rates can be taken from
HEARTBEAT_S: Final = 15.0
# A client's writes are gathered for this long: at most ~10 writes a second per client,
# whatever the rate of exceptions (a browser does not see the difference).
FLUSH_S: Final = 0.1
# Frames kept for the clients: one that falls further behind (it does not read) is dropped.
BACKLOG: Final = 4096
MAX_CLIENTS: Final = 200
SUBJECT: Final = "exceptions.>"
_INCOMPLETE: Final = "ASGI callable returned without completing response."
_RAISED: Final = b'"status":"raised"'
_CLEARED: Final = b'"status":"cleared"'


class _Status(msgspec.Struct):
    status: str = ""


_STATUS: Final = msgspec.json.Decoder(_Status)
_ENC: Final = msgspec.json.Encoder()


def frame(event: str, data: bytes) -> bytes:
    """One server-sent event: `event:` and `data:` lines (a line per line of `data`)."""
    lines = data.rstrip(b"\n").split(b"\n")
    return b"event: " + event.encode() + b"\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def event_of(payload: bytes) -> str | None:
    """`raise`, `clear` or None for an exception payload (the router writes compact JSON)."""
    if _RAISED in payload:
        return "raise"
    if _CLEARED in payload:
        return "clear"
    try:
        status = _STATUS.decode(payload).status
    except msgspec.DecodeError:
        return None
    return "raise" if status == "raised" else "clear" if status == "cleared" else None


class _Client:
    def __init__(self, cursor: int) -> None:
        self.cursor = cursor  # the sequence of the next frame it has not been sent
        self.scope = anyio.CancelScope()
        self.dropped = False


class Feed:
    """The fan-out: one NATS subscription, one tick loop and one list of frames for every client.

    A frame is appended once (`frames`, numbered from `first_seq`); each client keeps a cursor
    into it and writes what it has not sent, at most every FLUSH_S. Appending costs the same
    with one client or two hundred. The tick loop drops the clients that fell more than
    BACKLOG frames behind (their writes are blocked: they do not read)."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.clients: set[_Client] = set()
        self.frames: deque[bytes] = deque()
        self.first_seq = 0  # the sequence of frames[0]
        self.next_seq = 0
        self.wake = anyio.Event()
        self._sub: Any = None
        self._tick_scope: anyio.CancelScope | None = None
        self._last: tuple[float, int, int] | None = None  # (monotonic, processed, exceptions)
        self.dropped = 0
        self.delivered = 0

    # --- frames ---------------------------------------------------------------------------------

    def append(self, data: bytes) -> None:
        self.frames.append(data)
        self.next_seq += 1
        if len(self.frames) > BACKLOG:
            self.frames.popleft()
            self.first_seq += 1
        if not self.wake.is_set():
            self.wake.set()

    def pending(self, client: _Client) -> bytes | None:
        """What `client` has not been sent (advancing its cursor), or None when it fell too far behind."""
        if client.cursor < self.first_seq:
            return None
        start = client.cursor - self.first_seq
        chunk = b"".join(itertools.islice(self.frames, start, None))
        client.cursor = self.next_seq
        return chunk

    # --- clients ------------------------------------------------------------------------------

    async def _join(self, client: _Client) -> None:
        self.clients.add(client)
        if len(self.clients) == 1:
            await self._start()

    async def _leave(self, client: _Client) -> None:
        self.clients.discard(client)
        if not self.clients:
            await self._stop()

    def _drop_laggards(self) -> None:
        for client in list(self.clients):
            if client.cursor < self.first_seq:
                self._drop(client)

    def _drop(self, client: _Client) -> None:
        """A client that does not read: its response ends now, unfinished (never waited for)."""
        if client.dropped:
            return
        self.dropped += 1
        client.dropped = True
        self.clients.discard(client)
        client.scope.cancel()
        log.info("feed_client_dropped", reason="not reading", behind_frames=self.next_seq - client.cursor)

    # --- sources -------------------------------------------------------------------------------

    def on_exception(self, subject: bytes, reply: bytes, payload: bytes, headers: Any) -> None:
        """Called by the protocol parser for each message (no nats-py Msg, no header parsing)."""
        event = event_of(payload)
        if event is not None:
            self.delivered += 1
            self.append(frame(event, payload))

    async def _start(self) -> None:
        self.frames.clear()
        self.first_seq = self.next_seq
        # Straight from the protocol parser (Runtime.raw_path), header block unparsed: nats-py's
        # own path would parse every exception's headers (~80 us each) for nothing.
        self._sub = await self.ctx.nc.subscribe(SUBJECT)
        self.ctx.rt.raw_path(self._sub, self.on_exception, raw=True)
        self._last = None
        scope = anyio.CancelScope()
        self._tick_scope = scope
        # The tick loop lives in the server's task group (see router.http.server), not in a request's.
        self.ctx.spawn(self._tick_loop, scope)

    async def _stop(self) -> None:
        sub, self._sub = self._sub, None
        if self._tick_scope is not None:
            self._tick_scope.cancel()
            self._tick_scope = None
        self.frames.clear()
        self.first_seq = self.next_seq
        if sub is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await sub.unsubscribe()
            self.ctx.rt.raw_path(sub, None)

    async def _tick_loop(self, scope: anyio.CancelScope) -> None:
        with scope:
            # The rates are differences between two readings: take the first one now, so the first
            # tick a client sees already has them (it said 0.0 while events flowed).
            self.tick()
            await anyio.sleep(FIRST_TICK_S)
            while True:
                self._drop_laggards()
                self.append(frame("tick", _ENC.encode(self.tick())))
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
                {"partition": p.partition, "applied_seq": p.applied_seq, "lag": p.lag, "caught_up": p.caught_up}
                for p in h.partitions
            ],
        }

    # --- the response --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            body = b'{"error": "too_many_clients", "detail": "the feed serves at most %d clients"}' % MAX_CLIENTS
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")]})
            await send({"type": "http.response.body", "body": body})
            return
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
            ],
        })
        hello = {"instance": self.ctx.rt.instance, "partition_count": self.ctx.cfg.router.partitions, "tick_s": TICK_S}
        await send({"type": "http.response.body", "body": b"retry: 2000\n\n" + frame("hello", _ENC.encode(hello)),
                    "more_body": True})
        first = not self.clients
        client = _Client(self.next_seq)
        await self._join(client)
        if not first:  # the newest tick at once (the first client's tick loop starts with one)
            tick = next((f for f in reversed(self.frames) if f.startswith(b"event: tick")), None)
            if tick is not None:
                await send({"type": "http.response.body", "body": tick, "more_body": True})
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
        while True:
            if client.cursor == self.next_seq:
                with anyio.move_on_after(HEARTBEAT_S) as idle:
                    await self.wake.wait()
                if idle.cancelled_caught:
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                    continue
            await anyio.sleep(FLUSH_S)  # gather what else comes meanwhile into the same write
            if self.wake.is_set():
                self.wake = anyio.Event()  # the next append wakes the clients that wait again
            chunk = self.pending(client)
            if chunk is None:
                self._drop(client)
                return
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})


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


_DROP_INCOMPLETE: Final = _DropIncompleteNotice()


def routes(ctx: HttpContext) -> list[BaseRoute]:
    feed = Feed(ctx)
    ctx.extras["feed"] = feed
    logging.getLogger("uvicorn.error").addFilter(_DROP_INCOMPLETE)  # (once: the same filter is not added twice)

    # A plain ASGI app: the response streams until the client or the server leaves.
    return [route("/feed", feed)]


__all__ = ["Feed", "as_of_seq", "frame", "routes"]
