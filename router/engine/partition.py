"""One partition: a hand-driven pull consumer, in-order apply, effects, cumulative acks, snapshots, timers.

Everything that changes an actor runs in the partition's own task, one message or timer at a
time, so a key's events and timer firings are applied strictly in order. The nats-py
callback only queues messages. Effects are published with deterministic `Nats-Msg-Id`s and
a message is acknowledged (AckAll, cumulatively) only after every effect of it and of every
earlier message is confirmed by JetStream.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
import msgspec
import structlog

import actors
from actors import Alert, Send, SetTimer, Thresholds
from contracts.decode import (
    ACTOR_ERROR,
    MAX_DEPTH,
    DecodeError,
    Rejected,
    StoredSubject,
    decode_event,
    decode_payload,
    read_subject,
    subject_kind_token,
)
from contracts.events import DECODERS, encode_event
from contracts.exceptions import ExceptionEvent, exception_id, exception_subject
from contracts.rules import SEVERITY
from contracts.times import ns_to_us, rfc3339, to_us
from router.engine.keyfilter import KeyFilter
from router.engine.timers import Timers
from router.jetstream import streams
from router.jetstream.recovery import StoredEffects
from snapshots import ActorRecord

if TYPE_CHECKING:
    from router.engine.daemon import Runtime

log = structlog.get_logger()

_EXC_ENCODER = msgspec.json.Encoder()
_HDR_OVERHEAD = len("NATS/1.0\r\n\r\n")
KEY_FILTER_PAGE = 4_000
# Distinct subjects whose reading is cached (cleared when full).
SUBJECT_CACHE: Final = 65_536
# A waiting pull request expires after this; its 408 tells the partition it is caught up,
# which is what lets a timer fire (so keep it well under a second).
PULL_EXPIRES_NS = 400_000_000


# Queued by on_disconnected: what follows it in the queue came over a new connection.
_FENCE: Final[tuple[bytes, bytes, bytes, dict[str, str] | None]] = (b"", b"", b"", {})

# The longest the snapshot's row building runs before the loop gets a turn.
_SLICE_S: Final = 0.0003


class _Entry:
    """A delivered message with effects, until they are all confirmed. `prev_*` name the message
    delivered just before it: the furthest a cumulative ack may go while this one is pending."""

    __slots__ = ("outstanding", "prev_reply", "prev_seq", "reply", "seq")

    def __init__(self, seq: int, reply: bytes, prev_seq: int, prev_reply: bytes) -> None:
        self.seq = seq
        self.reply = reply
        self.prev_seq = prev_seq
        self.prev_reply = prev_reply
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
        self.stored = KeyFilter()  # keys the store may hold: a miss needs no SQLite lookup
        # Sequences (stream sequence numbers).
        self.applied_seq = 0  # every message <= it was applied (or dead-lettered)
        self.effects_seq = 0  # effects of every message <= it are confirmed
        self.suppress_through = 0  # effects at or below were confirmed before a restart
        self.acked_seq = 0
        self.snapshot_seq = 0
        self.stream_ts_ns = 0  # JetStream time of the last applied message
        self.last_reply = b""  # ack subject of the last applied message
        # Move actors to the LRU end only once the resident set nears its cap.
        self._lru_from = int(self.cap * 0.8)
        self.caught_up_us = 0  # wall time at which the consumer last had nothing more for us
        # Delivery.
        self._inq: deque[tuple[bytes, bytes, bytes, dict[str, str] | None]] = deque()
        self._subjects: dict[bytes, StoredSubject | Rejected] = {}
        # The newest queued message the last prefetch looked at (see _prefetch).
        self._prefetched: object = None
        self._wake = anyio.Event()
        self._inflight: deque[_Entry] = deque()
        self._inbox = ""
        self._requests: dict[str, int] = {}
        self._req_sent: dict[str, int] = {}  # request -> rt.now_us() when sent
        self._req_next = 0
        self._last_heard = time.monotonic()
        self._reposition = False
        self._fenced = False  # see on_disconnected
        self._stopping = False
        self.timers = Timers(self)
        self._stored_effects: StoredEffects | None = None  # see prepare()
        self._snapshot_gen = 0  # snapshots started so far
        # Snapshots.
        self._since_snapshot = 0
        self._marked_effects = 0  # effects_seq as last written to the store
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
                f"removed before they were applied, so state cannot be brought up to date. Restore "
                f"{rt.cfg.snapshot_path} from a backup that has applied through sequence {first - 1} or later"
            )
        floor, delivered = await streams.consumer_marks(rt.jsm, rt.cfg, self.index)
        effects = min(max(effects, floor), last)
        if effects > applied:
            # Record it before the consumer (and its ack floor) is recreated.
            await rt.store.write_effects_mark(self.index, effects)
        delivered = min(delivered, last)
        if delivered > effects:
            # Received by the last run but not acknowledged: some effects may be stored already.
            self._stored_effects = await StoredEffects.load(rt.nc, rt.cfg, effects, delivered, last)
            log.info(
                "unacknowledged_effects_checked",
                partition=self.index,
                events=f"{effects + 1}..{delivered}",
                stored=len(self._stored_effects.ids),
            )
        self.applied_seq = self.acked_seq = self.snapshot_seq = applied
        self.effects_seq = self.suppress_through = effects
        self._received_through = applied
        await streams.position_consumer(rt.jsm, rt.cfg, self.index, applied + 1)
        saved = await rt.store.take_blob(self._filter_name)  # used once: a crash later must not reuse it
        if not await rt.store.actor_keys(self.index, limit=1):
            self.stored.ready = True  # an empty store: no lookups until something is written
        elif saved is not None and self.stored.load(saved):
            log.info("key_filter_restored", partition=self.index, keys=self.stored.count)
        self.timers.horizon_us = rt.horizon_us
        self.timers.recovering_until_us = rt.now_us()
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

    def on_raw(self, subject: bytes, reply: bytes, data: bytes, hdr: dict[str, str] | None) -> None:
        """The raw path: straight from nats-py's protocol parser, in wire order, no Msg objects."""
        inq = self._inq
        if not inq:
            self._wake.set()  # otherwise the loop is awake or will see the queue before waiting
        inq.append((subject, reply, data, hdr))

    def on_disconnected(self) -> None:
        """The connection is lost. Deliveries in flight are lost with it, and once reconnected the old
        consumer goes on after them: a gap that AckAll would acknowledge. So nothing queued after
        this point is applied until the consumer is recreated after what was received."""
        self._reposition = True
        self._inq.append(_FENCE)
        self._wake.set()

    def on_reconnected(self) -> None:
        self._reposition = True
        self._wake.set()

    async def _send_pull(self) -> None:
        """Keep two pull requests outstanding (one being delivered, one queued), within the in-flight budget."""
        batch = self.cfg.router.fetch_batch
        if len(self._requests) >= 2 or self._reposition:
            return  # (a pull sent before the consumer is recreated would reach the old one)
        if len(self._inflight) + len(self._inq) > 4 * batch or self._over_cap():
            return
        self._req_next += 1
        rid = f"{self._inbox}.{self._req_next}"
        self._requests[rid] = batch
        sent = self._req_sent
        if len(sent) >= 8:  # answered or abandoned requests
            for old in [r for r in sent if r not in self._requests]:
                del sent[old]
        sent[rid] = self.rt.now_us()
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
            self._inbox + ".*", pending_msgs_limit=0, pending_bytes_limit=0
        )
        rt.raw_path(sub, self.on_raw)
        self._received_through = self.applied_seq
        await self.timers.load_horizon()
        self.ready.set()
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if not self.stored.ready:
                    tg.start_soon(self._fill_key_filter)
                await self._loop()
                await self._snapshot_done.wait()
                tg.cancel_scope.cancel()
        finally:
            self.finished.set()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

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
            await self.timers.fire_due()
            await self._maybe_snapshot()
            await self.timers.write_confirmed()
            if len(self.resident) > self.cap:
                self._evict()
            if self._stopping and not self._inq:
                return
            if self._inq:
                continue
            if not self._stopping:
                await self._send_pull()  # the drain may have used up the outstanding requests
            self._wake = anyio.Event()
            if self._inq or (self._reposition and rt.nc.is_connected):
                continue  # (while disconnected, on_reconnected wakes the loop)
            with anyio.move_on_after(self._idle_wait()):
                await self._wake.wait()
            self._watchdog()

    def _idle_wait(self) -> float:
        wait = 0.25
        due = self.timers.next_due()
        if due is not None:
            until_due = (due - self.rt.now_us()) / 1e6
            # A timer already due waits for the stream to be seen up to it: a pull status or a
            # message brings that, and wakes the loop. Polling for it meanwhile would spin.
            if until_due > 0:
                wait = min(wait, until_due)
        return max(wait, 0.001)

    def _watchdog(self) -> None:
        if self._requests and time.monotonic() - self._last_heard > 5.0:
            log.warning("pull_requests_lost", partition=self.index, requests=len(self._requests))
            self._requests.clear()
            self._last_heard = time.monotonic()

    async def _do_reposition(self) -> None:
        self._reposition = False
        self._requests.clear()
        # The new consumer's ack floor is start - 1, and a restart trusts that floor: start
        # after what is confirmed, not after what was received (redeliveries are skipped).
        start = min(self._received_through, self._confirmed_through()) + 1
        try:
            await streams.position_consumer(self.rt.jsm, self.cfg, self.index, start)
        except Exception as exc:
            log.warning("consumer_reposition_failed", partition=self.index, error=repr(exc))
            self._reposition = True
            await anyio.sleep(0.5)
            return
        # Whatever is queued came from the old consumer after a lost connection: not to be trusted.
        self._inq.clear()
        self._fenced = False
        log.info("consumer_repositioned", partition=self.index, start_seq=start)

    async def stop(self) -> None:
        """Stop fetching; the loop finishes what it received and returns."""
        self._stopping = True
        self._wake.set()

    # ------------------------------------------------------------------ applying

    async def _drain(self) -> None:
        """Apply everything received so far, in delivery order.

        This is the hot path: one tight loop, no per-message awaits or method calls unless a
        message is bad, its actor must be loaded, or it has alerts or messages to publish.
        """
        if self._fenced:  # the connection was lost: wait for the consumer to be recreated
            self._inq.clear()
            return
        inq = self._inq
        resident = self.resident
        subjects = self._subjects
        apply_fns = _APPLY
        decoders = DECODERS
        th = self.th
        dirty = self.dirty
        stored = self.stored
        new_state = _NEW
        schedule = self.timers.schedule
        received = self._received_through
        applied, last_reply = self.applied_seq, self.last_reply
        lru = len(resident) >= self._lru_from
        delivered = 0
        caught_up_reply = b""
        self._last_heard = time.monotonic()
        while inq:
            subject, reply, data, hdr = inq.popleft()
            if not reply.startswith(b"$JS.ACK."):
                if hdr is _FENCE[3] and not reply and not subject:  # see on_disconnected
                    inq.clear()
                    self._fenced = True
                    break
                self._on_status(hdr, data, subject.decode("utf-8", "replace"))  # a status names its request
                continue
            delivered += 1
            tokens = reply.split(b".")
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
            # (with a domain and account hash after ACK in the 12-token form)
            short = len(tokens) == 9
            seq = int(tokens[5] if short else tokens[7])
            if seq <= received:
                if seq <= self.acked_seq:
                    await self.rt.nc.publish(reply.decode(), b"+ACK")
                continue
            received = seq
            if (tokens[8] if short else tokens[10]) == b"0":
                caught_up_reply = reply
            parsed = subjects.get(subject)
            if parsed is None:
                parsed = self._subject(subject)
            prev_seq, prev_reply = applied, last_reply
            applied, last_reply = seq, reply
            if type(parsed) is not tuple:
                await self._rare(seq, reply, prev_seq, prev_reply, parsed, data, None, None, None, 0)
                continue
            kind = parsed[1]
            try:
                if data.count(b"[") + data.count(b"{") > MAX_DEPTH:  # maybe_deep, inline
                    event = decode_payload(kind, data)  # may nest too deeply: the contract's check
                else:
                    event = decoders[kind].decode(data)
                    if not data.isascii():
                        data.decode("utf-8")  # msgspec does not check the UTF-8 of fields it skips
            except (msgspec.DecodeError, UnicodeDecodeError, DecodeError, RecursionError):
                await self._rare(seq, reply, prev_seq, prev_reply, parsed, data, None, None, None, 0)
                continue
            k = parsed[3]
            state = resident.get(k)
            if state is None:
                if k in stored:
                    await self._prefetch(k)  # this key and the queued ones not in memory
                    state = resident[k]
                else:
                    state = resident[k] = new_state[kind](parsed[2])
                    stored.add(k)  # it will be written: from now on ask the store
            elif lru:
                resident.move_to_end(k)
            if state.seq >= seq:
                continue  # already applied before a restart (the stored state is ahead)
            ts = event.ts
            ts_us = to_us(ts) if ts is not None else (_reply_ts_ns(reply) + 500) // 1000
            try:
                effects = apply_fns[kind](state, event, ts_us, th)
            except Exception as exc:  # a defect in an actor: report it, keep the partition going
                await self._rare(seq, reply, prev_seq, prev_reply, parsed, data, event, exc, None, ts_us)
                continue
            state.seq = seq
            dirty.add(k)
            if effects:
                for eff in effects:
                    if type(eff) is not SetTimer:
                        await self._rare(seq, reply, prev_seq, prev_reply, parsed, data, event, None, effects, ts_us)
                        break
                else:  # only timers changed: no publishing, no ack tracking
                    for eff in effects:
                        if eff.deadline_us is not None:
                            schedule(eff.deadline_us, kind, parsed[2], eff.name)
        self._received_through = received
        if applied > self.applied_seq:
            ts_ns = _reply_ts_ns(last_reply)
            if ts_ns > self.stream_ts_ns:
                self.stream_ts_ns = ts_ns
        self.applied_seq, self.last_reply = applied, last_reply
        self._since_snapshot += delivered
        self.processed += delivered
        self._account(delivered)
        if caught_up_reply:
            self.caught_up_us = max(self.caught_up_us, ns_to_us(_reply_ts_ns(caught_up_reply)))
        if len(resident) > self.cap:
            self._evict()

    async def _prefetch(self, first: tuple[str, str]) -> None:
        """Load `first` and, in the same query, the actors not in memory of the queued messages
        that no earlier prefetch looked at.

        Newest first, up to the newest message the last one saw: rescanning the whole queue at
        every miss probed the key filter again for every new key still waiting to be applied,
        14% of the loop's time when catching up after a restart with 1M actors stored. A
        message seen before whose actor is gone again by its turn is loaded then, as `first`.
        """
        keys = {first}
        resident, stored = self.resident, self.stored
        inq = self._inq
        seen = self._prefetched
        if inq:
            self._prefetched = inq[-1]
        for item in reversed(inq):
            if item is seen:
                break
            parsed = self._subject(item[0])
            if type(parsed) is tuple:
                k = parsed[3]
                if k not in resident and k in stored:
                    keys.add(k)
        await self._load(keys)

    def _account(self, delivered: int) -> None:
        """Count delivered messages against the pull requests, oldest first (the server serves them in order)."""
        requests = self._requests
        while delivered and requests:
            rid = next(iter(requests))
            left = requests[rid]
            if left <= delivered:
                delivered -= left
                del requests[rid]
            else:
                requests[rid] = left - delivered
                delivered = 0

    def _on_status(self, hdr: dict[str, str] | None, data: bytes, rid: str) -> None:
        hdr = hdr or {}
        status = hdr.get("Status", "")
        if status in ("404", "408"):
            if rid in self._requests:
                del self._requests[rid]
                # The server expired the request no sooner than PULL_EXPIRES after we sent it, and had
                # nothing more for us then: everything stored before that moment was delivered ahead of
                # this status. (The time we read the status is later, and events stored in between
                # may still be on their way: counting them as seen could fire a timer too early.)
                sent = self._req_sent.pop(rid, None)
                if sent is not None:
                    seen = min(self.rt.now_us(), sent + PULL_EXPIRES_NS // 1000) if status == "408" else sent
                    self.caught_up_us = max(self.caught_up_us, seen)
        elif status == "409":
            current = self._requests.pop(rid, None) is not None  # not one to an old consumer
            desc = hdr.get("Description", "")
            if ("Deleted" in desc or "Leadership" in desc) and current:
                self._reposition = True
            elif "Exceeded" not in desc and "Max" not in desc:
                log.info("pull_status", partition=self.index, status=status, description=desc)
        elif status == "100":
            pass  # heartbeat
        elif data == b"" and not hdr:
            self._requests.pop(rid, None)

    def _subject(self, subject: bytes) -> StoredSubject | Rejected:
        """(subject, kind, key, (kind, key)) of a stored subject, or why it is a bad_subject; cached."""
        cached = self._subjects.get(subject)
        if cached is None:
            cached = read_subject(subject)
            if len(self._subjects) >= SUBJECT_CACHE:
                self._subjects.clear()
            self._subjects[subject] = cached
        return cached

    async def _fill_key_filter(self) -> None:
        """Read the stored keys into the filter in the background; lookups use SQLite meanwhile."""
        started = time.monotonic()
        after = ("", "")
        n = 0
        while True:
            # Small pages: actor loads share the store's read connection and queue behind each page.
            page = await self.rt.store.actor_keys(self.index, after, KEY_FILTER_PAGE)
            for k in page:
                self.stored.add(k)
            n += len(page)
            if len(page) < KEY_FILTER_PAGE:
                break
            after = page[-1]
        self.stored.ready = True
        log.info("key_filter_ready", partition=self.index, keys=n, s=round(time.monotonic() - started, 2))

    async def _load(self, keys: set[tuple[str, str]]) -> None:
        found = await self.rt.store.load_actors(list(keys))
        for k in keys:
            item = found.get(k)
            if item is not None:
                self.resident[k] = actors.decode_state(k[0], item[1])
            else:
                self.resident[k] = actors.ACTORS[k[0]].new(k[1])
                self.stored.add(k)

    def _entry(self, seq: int, reply: bytes, prev_seq: int, prev_reply: bytes) -> _Entry:
        """Track a message with effects; acks stop before it until they are confirmed."""
        entry = _Entry(seq, reply, prev_seq, prev_reply)
        self._inflight.append(entry)
        return entry

    async def _rare(
        self, seq: int, reply: bytes, prev_seq: int, prev_reply: bytes, parsed: Any, data: bytes,
        event: Any, exc: Exception | None, effects: Any, ts_us: int,
    ) -> None:
        """The uncommon outcomes of one message: dead letter, actor error, effects to publish."""
        publish = seq > self.suppress_through
        if isinstance(parsed, Rejected):
            if publish:
                entry = self._entry(seq, reply, prev_seq, prev_reply)
                await self._dead_letter(entry, parsed.subject, data, parsed.code, parsed.detail)
            return
        text, kind, key, _k = parsed
        if event is None:  # the payload did not decode
            try:
                decode_payload(kind, data)
            except DecodeError as err:
                if publish:
                    entry = self._entry(seq, reply, prev_seq, prev_reply)
                    await self._dead_letter(entry, text, data, err.code, err.detail)
                return
            raise AssertionError("decode_payload accepted what the decoder refused")  # pragma: no cover
        if exc is not None:
            log.error("actor_error", kind=kind, key=key, seq=seq, error=repr(exc))
            await self._rebuild_actor(kind, key, seq)
            if publish:
                entry = self._entry(seq, reply, prev_seq, prev_reply)
                detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
                await self._dead_letter(entry, text, data, ACTOR_ERROR, detail)
            return
        outward = publish and any(type(e) is not SetTimer for e in effects)
        tracked = self._entry(seq, reply, prev_seq, prev_reply) if outward else None
        await self._effects(tracked, kind, key, seq, ts_us, effects, publish)

    async def _rebuild_actor(self, kind: str, key: str, upto: int) -> None:
        """An actor raised midway: rebuild its state from the store plus its events in the stream
        before `upto`, so the failed event leaves the state unchanged (CONTRACT section 4)."""
        k = (kind, key)
        found = await self.rt.store.load_actors([k])
        item = found.get(k)
        state = actors.decode_state(kind, item[1]) if item is not None else actors.ACTORS[kind].new(key)
        filt = f"events.{kind}.{key}" if self.cfg.router.partitions <= 1 else f"events.*.{kind}.{key}"
        seq = state.seq + 1
        while seq < upto:
            try:
                m = await self.rt.jsm.get_msg(self.stream, seq=seq, subject=filt, next=True)
            except Exception:
                break
            if m.seq is None or m.seq >= upto:
                break
            seq = m.seq + 1
            try:
                _k, _key, event = decode_event(str(m.subject), bytes(m.data or b""))
            except DecodeError:
                continue  # dead-lettered the first time too
            ts_us = to_us(event.ts) if event.ts is not None else _msg_time_us(m)
            backup = actors.encode_state(state)
            try:
                actors.step(kind, state, key, m.seq, event, ts_us, self.th)
            except Exception:
                state = actors.decode_state(kind, backup)  # failed (and dead-lettered) the first time too
        self.resident[k] = state
        self.dirty.add(k)

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
            elif type(eff) is SetTimer and eff.deadline_us is not None:
                self.timers.schedule(eff.deadline_us, kind, key, eff.name)

    async def _publish(
        self,
        entry: _Entry | None,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
        done: Callable[[], None] | None,
    ) -> None:
        if entry is not None:
            if self._stored_effects is not None:
                if entry.seq > self._stored_effects.high:
                    self._stored_effects = None  # past what the last run could have published
                elif await self._stored_effects.holds(subject, headers["Nats-Msg-Id"], entry.seq):
                    return  # stored before the crash: publishing it again could duplicate it
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
        """Republish the original bytes on deadletter.<kind> with the reason (CONTRACT section 4)."""
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
        """Ack (AckAll) up to just before the first message whose effects are not all confirmed."""
        inflight = self._inflight
        while inflight and inflight[0].outstanding == 0:
            inflight.popleft()
        if inflight:
            seq, reply = inflight[0].prev_seq, inflight[0].prev_reply
        else:
            seq, reply = self.applied_seq, self.last_reply
        if seq <= self.acked_seq or not reply:
            return
        self.effects_seq = max(self.effects_seq, seq)
        self.acked_seq = seq
        try:
            await self.rt.nc.publish(reply.decode(), b"+ACK")
        except Exception as exc:  # disconnected: the next ack covers it (AckAll)
            log.debug("ack_deferred", partition=self.index, error=repr(exc))

    # ------------------------------------------------------------------ memory

    def _evict(self) -> None:
        """Drop least recently used clean actors down to 90% of the cap (they reload from SQLite).

        Dirty actors stay until a snapshot has written them: being over the cap asks for one
        at once, and `_send_pull` stops fetching while the excess waits for it.
        """
        resident = self.resident
        excess = len(resident) - int(self.cap * 0.9)
        if excess <= 0:
            return
        dirty, writing = self.dirty, self._writing
        limit = excess + len(dirty) + len(writing)  # scan no further than this many
        victims: list[tuple[str, str]] = []
        for i, k in enumerate(resident):  # least recently used first
            if i >= limit or len(victims) >= excess:
                break
            if k not in dirty and k not in writing:
                victims.append(k)
        for k in victims:
            del resident[k]
        if len(resident) > self.cap and not self._snapshot_running:
            self._since_snapshot = self.cfg.snapshots.every_events  # write back now

    def _over_cap(self) -> bool:
        """Too many actors in memory to fetch more until a snapshot lets dirty ones go."""
        return len(self.resident) > self.cap + self.cfg.router.fetch_batch

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
        # Timers beyond the horizon set since the last snapshot: this one stores them.
        self.timers.snapshot_started()
        self._snapshot_gen += 1
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        if force:
            await self._write_snapshot(writing, self.applied_seq, self.effects_seq)
        else:
            self._tg.start_soon(self._write_snapshot, writing, self.applied_seq, self.effects_seq)

    async def _write_snapshot(self, keys: set[tuple[str, str]], applied: int, effects: int) -> None:
        started = time.monotonic()
        try:
            rows = []
            resident = self.resident
            record = self.record
            n = 0
            top = applied  # the highest sequence any stored state holds
            slice_end = time.perf_counter() + _SLICE_S
            for k in keys:
                st = resident.get(k)
                if st is None:
                    continue
                rows.append(record(k, st))
                if st.seq > top:
                    top = st.seq
                n += 1
                if not n & 63 and time.perf_counter() >= slice_end:
                    # Short slices: an event's way through the router takes several turns of the
                    # loop, and each turn waits for the slice running then.
                    await anyio.lowlevel.checkpoint()
                    slice_end = time.perf_counter() + _SLICE_S
            # Stored states must not run ahead of confirmed effects: a restart resumes after
            # `applied` (and skips what a stored state already holds), so an effect of an event
            # they include that was not yet stored would be lost for good (NATS away, a
            # rejected publish, then a crash).
            effects = max(effects, await self._confirmed(top, keys))
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
            while len(rows) > 256:  # freeing 100k records at once would hold up the loop for ~20 ms
                del rows[-256:]
                await anyio.lowlevel.checkpoint()
        except BaseException:
            self.dirty |= keys  # not written: keep them dirty
            self.timers.snapshot_failed()  # and their far timers in view
            raise
        finally:
            self.timers.snapshot_ended()
            self._writing = set()
            self._snapshot_running = False
            self._snapshot_done.set()
            self._wake.set()  # written actors may be evicted now, and fetching may resume

    @staticmethod
    def record(k: tuple[str, str], st: Any) -> ActorRecord:
        """What the store keeps of an actor: its state, and its timers when its kind keeps any."""
        timers = _TIMERS[k[0]]
        return ActorRecord(k[0], k[1], st.seq, actors.encode_state(st), timers(st) if timers is not None else None)

    def _confirmed_through(self) -> int:
        """Every message at or below this has all its effects confirmed (acks may lag behind)."""
        for entry in self._inflight:
            if entry.outstanding:
                return entry.prev_seq
        return self.applied_seq

    async def _confirmed(self, seq: int, keys: set[tuple[str, str]]) -> int:
        """Wait until the effects of every message <= `seq` (applied already), and of timer firings
        of `keys`, are confirmed; return `seq`.

        An applied message with effects has its entry in `_inflight` before the drain can
        suspend, so this holds once no entry at or below `seq` is outstanding; it does not wait
        for a long drain to end (`applied_seq` is only brought up to date after one).
        """
        while True:
            pending = next((e.seq for e in self._inflight if e.outstanding), None)
            if (pending is None or pending > seq) and not any(
                p[1] and k in keys for k, p in self.timers.unconfirmed.items()
            ):
                return seq
            await anyio.sleep(0.005)

    async def final_snapshot(self) -> None:
        await self._snapshot_done.wait()
        await self._advance_acks()
        await self._maybe_snapshot(force=True)
        if self.stored.ready:
            # Every stored key is in the filter (keys are added when their actor is created),
            # so the next start can skip reading them all. It takes the filter back out at
            # once, so a crash after that start never trusts a filter older than the store.
            await self.rt.store.save_blob(self._filter_name, self.stored.dump())

    @property
    def _filter_name(self) -> str:
        return f"key_filter:{self.index}"

def _apply_fns() -> dict[str, Callable[..., Any]]:
    return {kind: mod.apply for kind, mod in actors.ACTORS.items()}


_APPLY: Final = _apply_fns()
_NEW: Final = {kind: mod.new for kind, mod in actors.ACTORS.items()}
# A snapshot asks only the kinds that keep timers for them (see ActorRecord.timers).
_TIMERS: Final = {kind: mod.timers if kind in actors.TIMED_KINDS else None for kind, mod in actors.ACTORS.items()}


def _reply_ts_ns(reply: bytes) -> int:
    """The JetStream timestamp (ns) in a message's ack subject."""
    tokens = reply.split(b".")
    return int(tokens[7] if len(tokens) == 9 else tokens[9])


def _msg_time_us(m: Any) -> int:
    """The JetStream timestamp of a message read with a direct/stream get."""
    t = getattr(m, "time", None)
    if t is None:
        return 0
    if isinstance(t, (int, float)):
        return int(t) // 1000
    return to_us(t)
