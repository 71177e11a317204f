"""After a crash: which effects of the previous run's unacknowledged events JetStream already stored.

A message is acknowledged only once all its effects are confirmed, so on restart everything
at or below the consumer's ack floor is known to be published and is suppressed. Above it,
up to the last sequence the consumer delivered, the previous run may have published effects
whose PubAcks (or whose acks) it never processed. Re-publishing them is harmless while the
streams' duplicate window remembers their `Nats-Msg-Id`s, but not after a longer outage.
`StoredEffects` answers, for an effect of an event in that range, whether a copy is stored:

- EXCEPTIONS and DEADLETTER are read once, from shortly before the JetStream time of the
  first unacknowledged event (an effect is stored after its cause), and their ids kept.
- Actor messages go into EVENTS under the target's subject: they are looked up by subject,
  from just after the causing event to the stream's end at start-up.

Reads use batched direct gets (`$JS.API.DIRECT.GET`, nats-server 2.11+, streams created
with `allow_direct`, as the router creates them). When a read fails, `holds()` answers
False and the effect is published again: a duplicate is possible then, a loss never.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
import structlog

from contracts.exceptions import effect_cause
from router.jetstream.streams import stored_subject_filter

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

log = structlog.get_logger()

# Effects are stored after their cause; the margin covers clocks of different cluster nodes.
CLOCK_MARGIN_NS: Final = 10_000_000_000
BATCH: Final = 1000
_TIMEOUT: Final = 10.0
_STREAM_HEADERS: Final = ("Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp")


def _rfc3339(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


def timestamp_ns(text: str) -> int:
    """Epoch nanoseconds of a JetStream time stamp such as `2026-11-22T18:58:51.530232162Z`."""
    head, _, frac = text.rstrip("Z").partition(".")
    whole = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
    return int(whole.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


async def direct_batches(nc: NATS, stream: str, request: dict[str, Any], upto: int) -> AsyncGenerator[Any, None]:
    """Messages of `stream` from a direct-get `request` (`seq` or `start_time`, optional
    `next_by_subj`), batch after batch, up to stream sequence `upto`."""
    replies: list[Any] = []
    arrived = anyio.Event()

    async def on_reply(msg: Any) -> None:
        replies.append(msg)
        arrived.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        req = {**request, "batch": BATCH}
        while True:
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode(req), reply=inbox)
            last = 0
            with anyio.fail_after(_TIMEOUT):
                while True:
                    while not replies:
                        arrived = anyio.Event()
                        await arrived.wait()
                    msg = replies.pop(0)
                    hdr = msg.headers or {}
                    status = hdr.get("Status")
                    if status == "204":  # end of this batch
                        break
                    if status is not None:  # 404: nothing more; anything else: give up
                        if status != "404":
                            raise RuntimeError(
                                f"direct get on {stream}: {status} {hdr.get('Description', '')}"
                            )
                        return
                    seq = int(hdr["Nats-Sequence"])
                    if seq > upto:
                        return
                    last = seq
                    yield msg
            if last == 0 or last >= upto:
                return
            req = {k: v for k, v in request.items() if k != "start_time"}
            req.update(seq=last + 1, batch=BATCH)
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()


class StoredEffects:
    """Ids of effects already stored for events in (low, high] of one partition."""

    def __init__(self, nc: NATS, cfg: Any, low: int, high: int, events_last: int) -> None:
        self.nc = nc
        self.cfg = cfg
        self.low = low
        self.high = high
        self.events_last = events_last
        self.ids: set[str] = set()
        self._by_subject: dict[str, tuple[int, set[str]]] = {}
        self.ok = True

    @classmethod
    async def load(cls, nc: NATS, cfg: Any, low: int, high: int, events_last: int) -> StoredEffects:
        self = cls(nc, cfg, low, high, events_last)
        try:
            async with aclosing(direct_batches(nc, cfg.streams.events, {"seq": low + 1}, high)) as it:
                first = await anext(it, None)
            if first is None:
                return self
            since = timestamp_ns(first.headers["Nats-Time-Stamp"]) - CLOCK_MARGIN_NS
            for stream in (cfg.streams.exceptions, cfg.streams.deadletter):
                info = await nc.jsm().stream_info(stream)
                end = int(info.state.last_seq or 0)
                async with aclosing(direct_batches(nc, stream, {"start_time": _rfc3339(since)}, end)) as it:
                    async for msg in it:
                        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
                        cause = effect_cause(msg_id)
                        if cause is not None and low < cause <= high:
                            self.ids.add(msg_id)
        except Exception as exc:
            self.ok = False
            log.warning("stored_effects_unreadable", error=repr(exc), low=low, high=high)
        return self

    async def holds(self, subject: str, msg_id: str, cause: int) -> bool:
        """True when the effect `msg_id` (caused by event `cause`) is stored already."""
        if not self.ok or not self.low < cause <= self.high:
            return False
        if not subject.startswith("events."):
            return msg_id in self.ids
        # An actor message: stored in EVENTS under its target's subject, after its cause.
        cached = self._by_subject.get(subject)
        if cached is None or cached[0] > cause + 1:
            filt = stored_subject_filter(subject, self.cfg.router.partitions)
            found: set[str] = set()
            try:
                request = {"seq": cause + 1, "next_by_subj": filt}
                stream = self.cfg.streams.events
                async with aclosing(direct_batches(self.nc, stream, request, self.events_last)) as it:
                    async for msg in it:
                        mid = (msg.headers or {}).get("Nats-Msg-Id")
                        if mid:
                            found.add(mid)
            except Exception as exc:
                log.warning("stored_effects_unreadable", subject=subject, error=repr(exc))
                return False
            cached = (cause + 1, found)
            self._by_subject[subject] = cached
        return msg_id in cached[1]


async def last_ids_stored(jsm: Any, stream: str, checks: dict[int, list[tuple[str, str]]]) -> set[int]:
    """Which checks hold: for each, every `(subject, Nats-Msg-Id)` pair names the last message
    `stream` stores on that subject (an empty list holds). Looked up concurrently; a failed
    lookup does not hold, so the caller publishes again (a duplicate is possible, a loss never).

    After a restart a timer due while the router was away may have fired before the crash:
    its exceptions are the last ones on their subjects then.
    """
    found: set[int] = set()
    if not checks:
        return found
    limiter = anyio.Semaphore(64)

    async def check(i: int, pairs: list[tuple[str, str]]) -> None:
        async with limiter:
            for subject, want in pairs:
                try:
                    last = await jsm.get_last_msg(stream, subject)
                except Exception:
                    return
                if (last.headers or {}).get("Nats-Msg-Id") != want:
                    return
            found.add(i)

    async with anyio.create_task_group() as tg:
        for i, pairs in checks.items():
            tg.start_soon(check, i, pairs)
    return found
