"""A partition's outbox: effects become exceptions, messages to other actors and dead letters, published
with deterministic ids, and tracked until JetStream confirms them.

A delivered message with effects to publish gets an `InFlight` entry; the partition
acknowledges (AckAll, cumulatively) only up to just before the first entry whose publishes
are not all confirmed (`ack_point`). `publish` is the one place an effect leaves the
partition: anything that must hold for every effect (a suppression after a crash, a fence)
belongs there.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import anyio
import msgspec
import structlog

from actors import Alert, Send, SetTimer
from contracts.decode import subject_kind_token
from contracts.events import encode_event
from contracts.exceptions import (
    ExceptionEvent,
    dead_letter_id,
    exception_id,
    exception_subject,
    fit_dead_letter,
    message_id,
)
from contracts.rules import SEVERITY
from contracts.times import rfc3339
from router.engine.open_index import OpenIndex
from router.engine.ownership import LeaseLost
from router.jetstream.publisher import Fence, Publisher
from router.jetstream.pull import reply_ts_ns
from router.jetstream.recovery import StoredEffects
from router.metrics import RouterMetrics

log = structlog.get_logger()

_EXC_ENCODER: Final = msgspec.json.Encoder()

Done = Callable[[], None]
Schedule = Callable[[int, str, str, str], None]


def alert_ids(kind: str, key: str, effects: Any, cause: str) -> list[tuple[str, str]]:
    """(subject, Nats-Msg-Id) of each exception among `effects`, as `Outbox.effects` publishes them."""
    return [
        (exception_subject(kind, e.rule, key), exception_id(kind, key, e.rule, e.location, e.status, cause))
        for e in effects
        if type(e) is Alert
    ]


class InFlight:
    """A delivered message with effects, until they are all confirmed. `prev_*` name the message
    delivered just before it: the furthest a cumulative ack may go while this one is pending."""

    __slots__ = ("outstanding", "prev_reply", "prev_seq", "reply", "seq")

    def __init__(self, seq: int, reply: bytes, prev_seq: int, prev_reply: bytes) -> None:
        self.seq = seq
        self.reply = reply
        self.prev_seq = prev_seq
        self.prev_reply = prev_reply
        self.outstanding = 0


class Outbox:
    """Effects out, confirmations in, for one partition."""

    def __init__(
        self,
        publisher: Publisher,
        now_us: Callable[[], int],
        schedule: Schedule,
        wake: Done,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._publisher = publisher
        metrics = metrics if metrics is not None else RouterMetrics()
        self._exceptions = metrics.exceptions  # by (kind, rule, status)
        self._dead_letters = metrics.dead_letters  # by (reason,)
        self._end_to_end = metrics.end_to_end
        self._counters: dict[tuple[str, ...], Any] = {}  # labelled children, bound once each
        self._now_us = now_us
        self._schedule = schedule  # where a SetTimer effect goes
        self._wake = wake  # an entry is fully confirmed: acks may advance
        self.inflight: deque[InFlight] = deque()
        # After a restart: effects of the last run's unacknowledged events that are stored already.
        self.stored_effects: StoredEffects | None = None
        self._changed: anyio.Event | None = None  # see wait_confirmed
        # Asked before a retry of every publish: once False, the partition may send nothing more.
        self.fence: Fence | None = None
        self.exceptions_sent = 0
        self.dead_lettered = 0
        # Where raises and clears go besides EXCEPTIONS (router.engine.open_index; set by the Snapshotter).
        self.open_index: OpenIndex | None = None

    # ------------------------------------------------------------------ tracking

    def track(self, seq: int, reply: bytes, prev_seq: int, prev_reply: bytes) -> InFlight:
        """Track a message with effects; acks stop before it until they are confirmed."""
        entry = InFlight(seq, reply, prev_seq, prev_reply)
        self.inflight.append(entry)
        return entry

    def ack_point(self, applied_seq: int, last_reply: bytes) -> tuple[int, bytes]:
        """(sequence, ack subject) of the furthest message a cumulative ack may cover now."""
        inflight = self.inflight
        while inflight and inflight[0].outstanding == 0:
            inflight.popleft()
        if inflight:
            return inflight[0].prev_seq, inflight[0].prev_reply
        return applied_seq, last_reply

    def confirmed_through(self, applied_seq: int) -> int:
        """Every message at or below this has all its effects confirmed (acks may lag behind)."""
        for entry in self.inflight:
            if entry.outstanding:
                return entry.prev_seq
        return applied_seq

    def first_pending(self) -> int | None:
        """The sequence of the first message with a publish not yet confirmed."""
        return next((e.seq for e in self.inflight if e.outstanding), None)

    def notify(self) -> None:
        """Something was confirmed: wake `wait_confirmed`."""
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    async def wait_confirmed(self, seq: int, pending_elsewhere: Callable[[], bool]) -> None:
        """Until the effects of every tracked message <= `seq` are confirmed and `pending_elsewhere()`
        (publishes tracked by someone else: timer firings) is False."""
        while True:
            pending = self.first_pending()
            if (pending is None or pending > seq) and not pending_elsewhere():
                return
            ev = self._changed
            if ev is None:
                ev = self._changed = anyio.Event()
            await ev.wait()

    def _done_cb(self, entry: InFlight, event_ns: int) -> Done:
        latency = self._end_to_end

        def done() -> None:
            if event_ns:  # an exception caused by an event: its end-to-end latency
                latency.observe(max(0, time.time_ns() - event_ns) / 1e9)
            entry.outstanding -= 1
            if entry.outstanding == 0:
                self._wake()
                self.notify()

        return done

    # ------------------------------------------------------------------ effects

    async def effects(
        self,
        entry: InFlight | None,
        kind: str,
        key: str,
        seq: int | None,
        ts_us: int,
        effects: Any,
        publish: bool,
        cause: str | None = None,
        done: Done | None = None,
    ) -> None:
        """Publish what `effects` say (unless `publish` is False: confirmed before a restart) and
        schedule their timers. `entry` tracks an event's publishes; a timer firing passes `done`."""
        cause = cause if cause is not None else str(seq)
        event_ns = -1  # the event's JetStream timestamp (0: none, a timer's firing), read at the first alert
        for eff in effects:
            if type(eff) is Alert:
                index = self.open_index
                if not publish and index is None:
                    continue
                exc_id = exception_id(kind, key, eff.rule, eff.location, eff.status, cause)
                severity = SEVERITY[eff.rule]
                payload = _EXC_ENCODER.encode(
                    ExceptionEvent(
                        id=exc_id,
                        kind=kind,
                        key=key,
                        rule=eff.rule,
                        status=eff.status,
                        severity=severity,
                        location=eff.location,
                        value=eff.value,
                        threshold=eff.threshold,
                        seq=seq,
                        event_ts=rfc3339(ts_us),
                        detected_at=rfc3339(self._now_us()),
                        message=eff.message,
                    )
                )
                if index is not None:  # published or not (confirmed before a restart): it is in force
                    index.note(kind, key, eff.rule, eff.location, eff.status == "raised", severity, payload)
                if not publish:
                    continue
                self.exceptions_sent += 1
                self._count(self._exceptions, kind, eff.rule, eff.status)
                if event_ns < 0:
                    event_ns = reply_ts_ns(entry.reply) if entry is not None else 0
                await self.publish(
                    entry, exception_subject(kind, eff.rule, key), payload, {"Nats-Msg-Id": exc_id}, done, event_ns
                )
            elif type(eff) is Send:
                if not publish:
                    continue
                etype = eff.event.__struct_config__.tag
                msg_id = message_id(kind, key, cause, etype, eff.kind, eff.key)
                await self.publish(
                    entry, f"events.{eff.kind}.{eff.key}", encode_event(eff.event), {"Nats-Msg-Id": msg_id}, done
                )
            elif type(eff) is SetTimer and eff.deadline_us is not None:
                self._schedule(eff.deadline_us, kind, key, eff.name)

    async def dead_letter(self, entry: InFlight, subject: str, data: bytes, code: str, detail: str) -> None:
        """Republish the original bytes on deadletter.<kind> with the reason (CONTRACT section 4)."""
        kind = subject_kind_token(subject)
        headers = {
            "Nats-Msg-Id": dead_letter_id(entry.seq),
            "Router-Error": code,
            "Router-Detail": detail.replace("\r", " ").replace("\n", " "),
            "Router-Subject": subject,
            "Router-Seq": str(entry.seq),
        }
        data = fit_dead_letter(data, headers, self._publisher.max_payload)
        self.dead_lettered += 1
        self._count(self._dead_letters, code)
        log.debug("dead_lettered", seq=entry.seq, subject=subject, error=code, detail=detail)
        await self.publish(entry, f"deadletter.{kind}", data, headers, None)

    def _count(self, counter: Any, *labels: str) -> None:
        child = self._counters.get(labels)
        if child is None:
            child = self._counters[labels] = counter.labels(*labels)
        child.inc()

    async def publish(
        self, entry: InFlight | None, subject: str, payload: bytes, headers: dict[str, str], done: Done | None,
        event_ns: int = 0,
    ) -> None:
        """The one way out for an effect: tracked by `entry` (an event's) or reported to `done` (a firing's).
        `event_ns`: the JetStream timestamp of the event that caused an exception (its latency is
        recorded when the stream confirms it)."""
        if entry is not None:
            stored = self.stored_effects
            if stored is not None:
                if entry.seq > stored.high:
                    self.stored_effects = None  # past what the last run could have published
                elif await stored.holds(subject, headers["Nats-Msg-Id"], entry.seq):
                    return  # stored before the crash: publishing it again could duplicate it
            entry.outstanding += 1
            done = self._done_cb(entry, event_ns)
        if self.fence is None:
            await self._publisher.publish(subject, payload, headers, done)
        elif self.fence():
            await self._publisher.publish(subject, payload, headers, done, fence=self.fence)
        else:
            raise LeaseLost("the partition's lease ended: nothing more is published for it")
