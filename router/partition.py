"""One partition: a hand-driven pull consumer, in-order apply, effects, cumulative acks, snapshots, timers.

Everything that changes an actor runs in the partition's own task, one message or timer at a
time, so a key's events and timer firings are applied strictly in order. The nats-py
callback only queues messages. Effects are published with deterministic `Nats-Msg-Id`s and
a message is acknowledged (AckAll, cumulatively) only after every effect of it and of every
earlier message is confirmed by JetStream.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog
from nats.aio.msg import Msg

import actors
from actors._base import Alert, Send, SetTimer, Thresholds
from contracts.decode import ACTOR_ERROR, DecodeError, decode_event, subject_kind_token
from contracts.events import encode_event
from contracts.exceptions import ExceptionEvent, exception_id, exception_subject, timer_cause
from contracts.rules import SEVERITY
from contracts.times import ns_to_us, rfc3339, to_us
from router import streams
from snapshots import ActorRecord

if TYPE_CHECKING:
    from router.runtime import Runtime

log = structlog.get_logger()

_EXC_ENCODER = msgspec.json.Encoder()
_HDR_OVERHEAD = len("NATS/1.0\r\n\r\n")
# A waiting pull request expires after this; its 408 tells the partition it is caught up,
# which is what lets a timer fire (so keep it well under a second).
PULL_EXPIRES_NS = 400_000_000


class _Entry:
    """One delivered message, in delivery order, until all its effects are confirmed."""

    __slots__ = ("outstanding", "reply", "seq")

    def __init__(self, seq: int, reply: str) -> None:
        self.seq = seq
        self.reply = reply
        self.outstanding = 0


class Partition:
    """Owns the actors of one partition of EVENTS and its durable consumer."""

    def __init__(self, rt: Runtime, index: int) -> None:
        self.rt = rt
        self.index = index
        self.cfg = rt.cfg
        self.th: Thresholds = rt.thresholds
        self.stream = rt.cfg.streams.events
        self.consumer = streams.consumer_name(rt.cfg, index)
        self.resident: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.dirty: set[tuple[str, str]] = set()
        self._writing: set[tuple[str, str]] = set()
        self.cap = rt.cfg.snapshots.resident_actors
        # Sequences (stream sequence numbers).
        self.applied_seq = 0  # every message <= it was applied (or dead-lettered)
        self.effects_seq = 0  # effects of every message <= it are confirmed
        self.suppress_through = 0  # effects at or below were confirmed before a restart
        self.acked_seq = 0
        self.snapshot_seq = 0
        self.stream_ts_us = 0  # JetStream time of the last applied message
        self.caught_up_us = 0  # wall time at which the consumer last had nothing more for us
        # Delivery.
        self._inq: deque[Msg] = deque()
        self._wake = anyio.Event()
        self._inflight: deque[_Entry] = deque()
        self._inbox = ""
        self._requests: dict[str, int] = {}
        self._req_next = 0
        self._last_heard = time.monotonic()
        self._reposition = False
        self._stopping = False
        # Timers: a small heap of what is due soon; the rest waits in SQLite.
        self._heap: list[tuple[int, str, str, str]] = []
        self._heap_set: set[tuple[int, str, str, str]] = set()
        self._horizon_us = 0
        self._horizon_until = 0
        self._next_horizon = 0
        self._recovering_until_us = 0
        self._timer_confirmed: set[tuple[str, str]] = set()
        # Snapshots.
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._snapshot_running = False
        self._snapshot_done = anyio.Event()
        self._snapshot_done.set()
        self.processed = 0
        self.dead_lettered = 0
        self.exceptions_sent = 0
        self.ready = anyio.Event()
        self.finished = anyio.Event()

    # ------------------------------------------------------------------ start-up

    async def prepare(self) -> None:
        """Read the partition's marks and position the consumer just after the applied point."""
        rt = self.rt
        applied, effects = await rt.store.marks(self.index)
        info = await rt.jsm.stream_info(self.stream)
        first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
        if applied > last:
            raise rt.fatal(
                f"partition {self.index}: the snapshot store has applied through sequence {applied} "
                f"but stream {self.stream} ends at {last}: the stream was recreated or purged. "
                f"Move {rt.cfg.snapshot_path} aside to rebuild from what the stream holds"
            )
        if first > applied + 1 and info.state.messages:
            raise rt.fatal(
                f"partition {self.index}: the snapshot store has applied through sequence {applied} "
                f"but stream {self.stream} now starts at {first}: events {applied + 1}..{first - 1} were "
                f"removed before they were applied. Restore the snapshot file from a backup, or move it "
                f"aside and accept state rebuilt from sequence {first}"
            )
        floor = await streams.consumer_ack_floor(rt.jsm, rt.cfg, self.index)
        effects = min(max(effects, floor), last)
        if effects > applied:
            # Record it before the consumer (and its ack floor) is recreated.
            await rt.store.write_effects_mark(self.index, effects)
        self.applied_seq = self.acked_seq = self.snapshot_seq = applied
        self.effects_seq = self.suppress_through = effects
        self._received_through = applied
        await streams.position_consumer(rt.jsm, rt.cfg, self.index, applied + 1)
        self._horizon_us = rt.horizon_us
        self._recovering_until_us = rt.now_us()
        log.info(
            "partition_ready",
            partition=self.index,
            applied_seq=applied,
            effects_confirmed_seq=effects,
            stream_first=first,
            stream_last=last,
            backlog=max(0, last - applied),
        )

    # ------------------------------------------------------------------ delivery

    async def _on_msg(self, msg: Msg) -> None:
        self._inq.append(msg)
        self._wake.set()

    def on_reconnected(self) -> None:
        self._reposition = True
        self._wake.set()

    async def _send_pull(self) -> None:
        """Keep up to two pull requests outstanding, within the in-flight budget."""
        batch = self.cfg.router.fetch_batch
        if len(self._requests) >= 2 or sum(self._requests.values()) >= batch:
            return
        if len(self._inflight) + len(self._inq) > 4 * batch:
            return
        self._req_next += 1
        rid = f"{self._inbox}.{self._req_next}"
        self._requests[rid] = batch
        req = b'{"batch":%d,"expires":%d}' % (batch, PULL_EXPIRES_NS)
        try:
            await self.rt.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}", req, reply=rid)
        except Exception as exc:
            self._requests.pop(rid, None)
            log.warning("pull_failed", partition=self.index, error=repr(exc))

    # ------------------------------------------------------------------ the loop

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        rt = self.rt
        self._inbox = rt.nc.new_inbox()
        sub = await rt.nc.subscribe(
            self._inbox + ".*", cb=self._on_msg, pending_msgs_limit=0, pending_bytes_limit=0
        )
        self._received_through = self.applied_seq
        await self._load_horizon()
        self.ready.set()
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._loop()
                await self._snapshot_done.wait()
                tg.cancel_scope.cancel()
        finally:
            self.finished.set()
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except Exception:
                    pass

    async def _loop(self) -> None:
        rt = self.rt
        while True:
            if self._reposition and rt.nc.is_connected:
                await self._do_reposition()
            if not self._stopping:
                await self._send_pull()
            if self._inq:
                await self._drain()
            await self._advance_acks()
            await self._fire_due_timers()
            await self._maybe_snapshot()
            await self._write_timer_confirmed()
            if self._stopping and not self._inq:
                return
            if self._inq:
                continue
            self._wake = anyio.Event()
            if self._inq or self._reposition:
                continue
            with anyio.move_on_after(self._idle_wait()):
                await self._wake.wait()
            self._watchdog()

    def _idle_wait(self) -> float:
        wait = 0.25
        if self._heap:
            wait = min(wait, max(0.0, (self._heap[0][0] - self.rt.now_us()) / 1e6))
        return max(wait, 0.001)

    def _watchdog(self) -> None:
        if self._requests and time.monotonic() - self._last_heard > 5.0:
            log.warning("pull_requests_lost", partition=self.index, requests=len(self._requests))
            self._requests.clear()
            self._last_heard = time.monotonic()

    async def _do_reposition(self) -> None:
        self._reposition = False
        self._requests.clear()
        try:
            await streams.position_consumer(self.rt.jsm, self.cfg, self.index, self._received_through + 1)
        except Exception as exc:
            log.warning("consumer_reposition_failed", partition=self.index, error=repr(exc))
            self._reposition = True
            await anyio.sleep(0.5)
            return
        log.info("consumer_repositioned", partition=self.index, start_seq=self._received_through + 1)

    async def stop(self) -> None:
        """Stop fetching; the loop finishes what it received and returns."""
        self._stopping = True
        self._wake.set()

    # ------------------------------------------------------------------ applying

    async def _drain(self) -> None:
        batch: list[tuple[Msg, int, int, int]] = []  # msg, seq, ts_ns, pending
        inq = self._inq
        requests = self._requests
        self._last_heard = time.monotonic()
        while inq:
            msg = inq.popleft()
            reply = msg.reply
            if not reply or not reply.startswith("$JS.ACK."):
                self._on_status(msg, msg.subject)  # a status answers the request it names
                continue
            # A delivered message keeps its own subject; the server serves requests in order.
            if requests:
                rid = next(iter(requests))
                left = requests[rid]
                if left <= 1:
                    del requests[rid]
                else:
                    requests[rid] = left - 1
            tokens = reply.split(".")
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[...]
            if len(tokens) == 9:
                seq, ts_ns, pending = int(tokens[5]), int(tokens[7]), int(tokens[8])
            else:
                seq, ts_ns, pending = int(tokens[7]), int(tokens[9]), int(tokens[10])
            if seq <= self._received_through:
                if seq <= self.acked_seq:
                    await self.rt.nc.publish(reply, b"+ACK")
                continue
            self._received_through = seq
            batch.append((msg, seq, ts_ns, pending))
        if not batch:
            return
        await self._ensure_resident(batch)
        for msg, seq, ts_ns, pending in batch:
            await self._apply(msg, seq, ts_ns)
            if pending == 0:
                self.caught_up_us = max(self.caught_up_us, ns_to_us(ts_ns))
        self._evict()

    def _on_status(self, msg: Msg, rid: str) -> None:
        hdr = msg.headers or {}
        status = hdr.get("Status", "")
        if status in ("404", "408"):
            if rid in self._requests:
                del self._requests[rid]
                self.caught_up_us = self.rt.now_us()
        elif status == "409":
            self._requests.pop(rid, None)
            desc = hdr.get("Description", "")
            if "Deleted" in desc or "Leadership" in desc:
                self._reposition = True
            elif "Exceeded" not in desc and "Max" not in desc:
                log.info("pull_status", partition=self.index, status=status, description=desc)
        elif status == "100":
            pass  # heartbeat
        elif msg.data == b"" and not hdr:
            self._requests.pop(rid, None)

    async def _ensure_resident(self, batch: list[tuple[Msg, int, int, int]]) -> None:
        """Load, in one query, the stored actors of a batch that are not in memory."""
        resident = self.resident
        missing: set[tuple[str, str]] = set()
        for msg, _seq, _ts, _p in batch:
            parts = msg.subject.split(".")  # the subject as stored: events[.p].kind.key
            if len(parts) >= 3:
                k = (parts[-2], parts[-1])
                if k not in resident and k[0] in actors.STATE_TYPES:
                    missing.add(k)
        if missing:
            await self._load(missing)

    async def _load(self, keys: set[tuple[str, str]]) -> None:
        found = await self.rt.store.load_actors(list(keys))
        for k in keys:
            item = found.get(k)
            if item is not None:
                self.resident[k] = actors.decode_state(k[0], item[1])
            else:
                self.resident[k] = actors.ACTORS[k[0]].new(k[1])

    async def _apply(self, msg: Msg, seq: int, ts_ns: int) -> None:
        entry = _Entry(seq, msg.reply)
        self._inflight.append(entry)
        publish = seq > self.suppress_through
        subject = msg.subject
        try:
            kind, key, event = decode_event(subject, msg.data)
        except DecodeError as err:
            if publish:
                await self._dead_letter(entry, subject, msg.data, err.code, err.detail)
            self._applied(seq, ts_ns)
            return
        k = (kind, key)
        state = self.resident.get(k)
        if state is None:  # a key whose subject did not parse before decode (cannot happen)
            await self._load({k})
            state = self.resident[k]
        else:
            self.resident.move_to_end(k)
        if state.seq >= seq:
            self._applied(seq, ts_ns)
            return
        ts_us = to_us(event.ts) if event.ts is not None else ns_to_us(ts_ns)
        backup = actors.encode_state(state)
        try:
            effects = actors.step(kind, state, key, seq, event, ts_us, self.th)[1]
        except Exception as exc:  # a defect in an actor: report it, keep the partition going
            self.resident[k] = actors.decode_state(kind, backup)
            log.error("actor_error", kind=kind, key=key, seq=seq, error=repr(exc))
            if publish:
                detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
                await self._dead_letter(entry, subject, msg.data, ACTOR_ERROR, detail)
            self._applied(seq, ts_ns)
            return
        self.dirty.add(k)
        if effects:
            await self._effects(entry, kind, key, seq, ts_us, effects, publish)
        self._applied(seq, ts_ns)

    def _applied(self, seq: int, ts_ns: int) -> None:
        self.applied_seq = seq
        self._since_snapshot += 1
        self.processed += 1
        ts_us = ns_to_us(ts_ns)
        if ts_us > self.stream_ts_us:
            self.stream_ts_us = ts_us

    async def _effects(
        self,
        entry: _Entry | None,
        kind: str,
        key: str,
        seq: int | None,
        ts_us: int,
        effects: Any,
        publish: bool,
        cause: str | None = None,
        done: Callable[[], None] | None = None,
    ) -> None:
        cause = cause if cause is not None else str(seq)
        for eff in effects:
            if type(eff) is Alert:
                if not publish:
                    continue
                exc_id = exception_id(kind, key, eff.rule, eff.location, eff.status, cause)
                payload = _EXC_ENCODER.encode(
                    ExceptionEvent(
                        id=exc_id,
                        kind=kind,
                        key=key,
                        rule=eff.rule,
                        status=eff.status,
                        severity=SEVERITY[eff.rule],
                        location=eff.location,
                        value=eff.value,
                        threshold=eff.threshold,
                        seq=seq,
                        event_ts=rfc3339(ts_us),
                        detected_at=rfc3339(self.rt.now_us()),
                        message=eff.message,
                    )
                )
                self.exceptions_sent += 1
                await self._publish(
                    entry, exception_subject(kind, eff.rule, key), payload, {"Nats-Msg-Id": exc_id}, done
                )
            elif type(eff) is Send:
                if not publish:
                    continue
                etype = eff.event.__struct_config__.tag
                msg_id = f"msg:{kind}:{key}:{cause}:{etype}:{eff.kind}:{eff.key}"
                await self._publish(
                    entry, f"events.{eff.kind}.{eff.key}", encode_event(eff.event), {"Nats-Msg-Id": msg_id}, done
                )
            elif type(eff) is SetTimer:
                d = eff.deadline_us
                if d is not None and d <= self._horizon_until:
                    self._push_timer(d, kind, key, eff.name)

    async def _publish(
        self,
        entry: _Entry | None,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        done: Callable[[], None] | None,
    ) -> None:
        if entry is not None:
            entry.outstanding += 1
            done = self._done_cb(entry)
        await self.rt.publisher.publish(subject, payload, headers, done)

    def _done_cb(self, entry: _Entry) -> Callable[[], None]:
        def done() -> None:
            entry.outstanding -= 1
            if entry.outstanding == 0:
                self._wake.set()

        return done

    async def _dead_letter(self, entry: _Entry, subject: str, data: bytes, code: str, detail: str) -> None:
        kind = subject_kind_token(subject)
        headers = {
            "Nats-Msg-Id": f"dead:{entry.seq}",
            "Router-Error": code,
            "Router-Detail": detail.replace("\r", " ").replace("\n", " "),
            "Router-Subject": subject,
            "Router-Seq": str(entry.seq),
        }
        max_payload = self.rt.nc.max_payload
        hdr_len = _HDR_OVERHEAD + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
        if len(data) + hdr_len > max_payload:
            trunc = str(len(data))
            headers["Router-Truncated"] = trunc
            hdr_len += len("Router-Truncated") + len(trunc) + 4
            data = data[: max(0, max_payload - hdr_len - 64)]
        self.dead_lettered += 1
        log.info("dead_lettered", seq=entry.seq, subject=subject, error=code, detail=detail)
        await self._publish(entry, f"deadletter.{kind}", data, headers, None)

    async def _advance_acks(self) -> None:
        inflight = self._inflight
        last: _Entry | None = None
        while inflight and inflight[0].outstanding == 0:
            last = inflight.popleft()
        if last is None:
            return
        self.effects_seq = max(self.effects_seq, last.seq)
        self.acked_seq = last.seq
        try:
            await self.rt.nc.publish(last.reply, b"+ACK")
        except Exception as exc:  # disconnected: the next ack covers it (AckAll)
            log.debug("ack_deferred", partition=self.index, error=repr(exc))

    # ------------------------------------------------------------------ memory

    def _evict(self) -> None:
        resident = self.resident
        excess = len(resident) - self.cap
        if excess <= 0:
            return
        dirty, writing = self.dirty, self._writing
        for k in list(resident.keys())[: excess + len(dirty) + len(writing)]:
            if excess <= 0:
                break
            if k in dirty or k in writing:
                continue
            del resident[k]
            excess -= 1
        if excess > 0 and not self._snapshot_running:
            self._since_snapshot = self.cfg.snapshots.every_events  # write back soon

    # ------------------------------------------------------------------ snapshots

    async def _maybe_snapshot(self, force: bool = False) -> None:
        if self._snapshot_running:
            return
        due = self._since_snapshot >= self.cfg.snapshots.every_events or (
            time.monotonic() - self._last_snapshot >= self.rt.snapshot_every_s
        )
        if not force and not due:
            return
        if not self.dirty and self.applied_seq == self.snapshot_seq and self.effects_seq <= self._marked_effects:
            self._last_snapshot = time.monotonic()
            return
        self._snapshot_running = True
        self._snapshot_done = anyio.Event()
        writing, self.dirty = self.dirty, set()
        self._writing = writing
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        if force:
            await self._write_snapshot(writing, self.applied_seq, self.effects_seq)
        else:
            self._tg.start_soon(self._write_snapshot, writing, self.applied_seq, self.effects_seq)

    _marked_effects = 0

    async def _write_snapshot(self, keys: set[tuple[str, str]], applied: int, effects: int) -> None:
        started = time.monotonic()
        try:
            rows = []
            resident = self.resident
            n = 0
            for k in keys:
                st = resident.get(k)
                if st is None:
                    continue
                rows.append(ActorRecord(k[0], k[1], st.seq, actors.encode_state(st), actors.ACTORS[k[0]].timers(st)))
                n += 1
                if n % 5000 == 0:
                    await anyio.sleep(0)
            await self.rt.store.write_snapshot(self.index, rows, applied_seq=applied, effects_seq=effects)
            self.snapshot_seq = applied
            self._marked_effects = effects
            if rows:
                log.debug(
                    "snapshot_written",
                    partition=self.index,
                    actors=len(rows),
                    applied_seq=applied,
                    ms=round((time.monotonic() - started) * 1000, 1),
                )
        except BaseException:
            self.dirty |= keys  # not written: keep them dirty
            raise
        finally:
            self._writing = set()
            self._snapshot_running = False
            self._snapshot_done.set()

    async def final_snapshot(self) -> None:
        await self._snapshot_done.wait()
        await self._advance_acks()
        await self._maybe_snapshot(force=True)

    # ------------------------------------------------------------------ timers

    def _push_timer(self, deadline: int, kind: str, key: str, name: str) -> None:
        item = (deadline, kind, key, name)
        if item not in self._heap_set:
            self._heap_set.add(item)
            heapq.heappush(self._heap, item)

    async def _load_horizon(self) -> None:
        now = self.rt.now_us()
        until = now + self._horizon_us
        rows = await self.rt.store.due_timers(self.index, until, 100_000)
        for deadline, kind, key, name in rows:
            self._push_timer(deadline, kind, key, name)
        self._horizon_until = until
        self._next_horizon = now + self._horizon_us // 2

    async def _fire_due_timers(self) -> None:
        now = self.rt.now_us()
        if now >= self._next_horizon:
            # Timers beyond the old horizon live only in the store: make it current, then look ahead.
            await self._snapshot_done.wait()
            await self._maybe_snapshot(force=True)
            await self._load_horizon()
        heap = self._heap
        if not heap:
            return
        limit = min(now, max(self.caught_up_us, self.stream_ts_us))
        while heap and heap[0][0] <= limit:
            item = heapq.heappop(heap)
            self._heap_set.discard(item)
            deadline, kind, key, name = item
            k = (kind, key)
            st = self.resident.get(k)
            if st is None:
                await self._load({k})
                st = self.resident[k]
            if actors.ACTORS[kind].timers(st).get(name) != deadline:
                continue  # moved or cancelled since it was set
            effects = actors.fire(kind, st, name, deadline, self.th)
            if not effects:
                continue
            self.dirty.add(k)
            cause = timer_cause(deadline)
            publish = True
            if deadline < self._recovering_until_us:
                publish = not await self._timer_already_published(kind, key, effects, cause)
            await self._effects(
                None, kind, key, None, deadline, effects, publish, cause=cause, done=lambda k=k: self._timer_done(k)
            )
            if publish:
                log.info("timer_fired", kind=kind, key=key, timer=name, deadline=rfc3339(deadline))

    def _timer_done(self, k: tuple[str, str]) -> None:
        self._timer_confirmed.add(k)
        self._wake.set()

    async def _write_timer_confirmed(self) -> None:
        """Write an actor as soon as a timer's effects are confirmed: a later restart must not refire."""
        if not self._timer_confirmed:
            return
        keys, self._timer_confirmed = self._timer_confirmed, set()
        for k in keys:
            st = self.resident.get(k)
            if st is not None:
                await self.rt.store.write_actor(
                    self.index, ActorRecord(k[0], k[1], st.seq, actors.encode_state(st), actors.ACTORS[k[0]].timers(st))
                )

    async def _timer_already_published(self, kind: str, key: str, effects: Any, cause: str) -> bool:
        """After a restart, a timer due while the router was away may have fired before the crash."""
        for eff in effects:
            if type(eff) is not Alert:
                continue
            want = exception_id(kind, key, eff.rule, eff.location, eff.status, cause)
            try:
                last = await self.rt.jsm.get_last_msg(
                    self.cfg.streams.exceptions, exception_subject(kind, eff.rule, key)
                )
            except Exception:
                return False
            if (last.headers or {}).get("Nats-Msg-Id") != want:
                return False
        return True
