"""One partition: a hand-driven pull consumer, in-order apply, effects, cumulative acks, snapshots, timers.

Everything that changes an actor runs in the partition's own task, one message or timer at a
time, so a key's events and timer firings are applied strictly in order. The nats-py
callback only queues messages. Effects are published with deterministic `Nats-Msg-Id`s and
a message is acknowledged (AckAll, cumulatively) only after every effect of it and of every
earlier message is confirmed by JetStream.

The partition owns the loop, the actors in memory and the marks; narrow parts do the rest
and know nothing of it: `router.jetstream.pull` (pull requests and their statuses),
`router.engine.outbox` (effects out, confirmations in), `router.engine.snapshotter` (what is
written to the store, and when) and `router.engine.timers` (what is due). The hot path,
`_drain`, stays one loop with its locals; only the rare outcomes cross into those parts.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final

import anyio
import msgspec
import structlog

import actors
from actors import Alert, Send, SetTimer
from contracts.decode import (
    ACTOR_ERROR,
    MAX_DEPTH,
    DecodeError,
    Rejected,
    decode_payload,
    read_subject,
)
from contracts.events import DECODERS
from contracts.exceptions import timer_cause
from contracts.times import ns_to_us, rfc3339, to_us
from router.engine.deps import PartitionDeps
from router.engine.keyfilter import KeyFilter
from router.engine.meter import CountedSubject, PartitionMeter, counted
from router.engine.outbox import Outbox, alert_ids
from router.engine.rebuild import rebuild_state
from router.engine.skew import FutureGuard
from router.engine.snapshotter import Snapshotter, record
from router.engine.startup import check_marks, delivered_through
from router.engine.timers import Timers
from router.jetstream import streams
from router.jetstream.pull import PULL_EXPIRES_NS, PullRequests, reply_ts_ns
from router.jetstream.recovery import StoredEffects, last_ids_stored

__all__ = ["PULL_EXPIRES_NS", "Partition"]

log = structlog.get_logger()

# Distinct subjects whose reading is cached (cleared when full).
SUBJECT_CACHE: Final = 65_536

# Queued by on_disconnected: what follows it in the queue came over a new connection.
_FENCE: Final[tuple[bytes, bytes, bytes, dict[str, str] | None]] = (b"", b"", b"", {})


class Partition:
    """Owns the actors of one partition of EVENTS and its durable consumer."""

    def __init__(self, deps: PartitionDeps, index: int) -> None:
        self.d = deps
        self.index = index
        cfg = deps.cfg
        self.cfg = cfg
        self.th = deps.thresholds
        self.stream = cfg.streams.events
        self.consumer = streams.consumer_name(cfg, index)
        self.resident: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.cap = cfg.snapshots.resident_actors
        self.stored = KeyFilter()  # keys the store may hold: a miss needs no SQLite lookup
        # Sequences (stream sequence numbers).
        self.applied_seq = 0  # every message <= it was applied (or dead-lettered)
        self.effects_seq = 0  # effects of every message <= it are confirmed
        self.suppress_through = 0  # effects at or below were confirmed before a restart
        self.acked_seq = 0
        self._received_through = 0  # every message <= it was received (applied or queued)
        self.stream_ts_ns = 0  # JetStream time of the last applied message
        self.future = FutureGuard(cfg.rules.max_future_skew)  # a ts from the future is invalid
        self.last_reply = b""  # ack subject of the last applied message
        # Move actors to the LRU end only once the resident set nears its cap.
        self._lru_from = int(self.cap * 0.8)
        self.caught_up_us = 0  # wall time at which the consumer last had nothing more for us
        # Delivery.
        self._inq: deque[tuple[bytes, bytes, bytes, dict[str, str] | None]] = deque()
        self._subjects: dict[bytes, CountedSubject | Rejected] = {}
        # The newest queued message the last prefetch looked at (see _prefetch).
        self._prefetched: object = None
        self._wake = anyio.Event()
        self._reposition = False
        self._fenced = False  # see on_disconnected
        self._stopping = False
        # The parts.
        self.timers = Timers(horizon_us=deps.horizon_us)
        self.pulls = PullRequests(self.stream, self.consumer, index)
        self.meter = PartitionMeter(deps.metrics, index)
        self.outbox = Outbox(deps.publisher, deps.now_us, self.timers.schedule, self._set_wake, deps.metrics)
        self.snapshots = Snapshotter(
            deps.store, index, self.resident, cfg.snapshots.every_events, deps.snapshot_every_s,
            self.outbox, self.timers, self._set_wake, on_written=self.meter.snapshot_written,
        )
        self.processed = 0
        self.ready = anyio.Event()
        self.finished = anyio.Event()
        self._log = log.bind(partition=index)

    def _set_wake(self) -> None:
        self._wake.set()

    @property
    def snapshot_seq(self) -> int:
        """The stored state holds every event at or below this (the last snapshot written)."""
        return self.snapshots.snapshot_seq

    # ------------------------------------------------------------------ start-up

    async def prepare(self) -> None:
        """Read the partition's marks and position the consumer just after the applied point."""
        d = self.d
        applied, effects = await self.snapshots.start_marks()  # (restored from the cluster copy when behind)
        info = await d.jsm.stream_info(self.stream)
        first, last = check_marks(self.index, applied, info, self.cfg)
        floor, delivered = await streams.consumer_marks(d.jsm, self.cfg, self.index)
        effects = min(max(effects, floor), last)
        self.pulls.fence()  # (its lease: raises once this instance may not own the partition)
        if effects > applied:
            # Record it before the consumer (and its ack floor) is recreated.
            await d.store.write_effects_mark(self.index, effects)
        delivered = min(await delivered_through(d.store, self.index, delivered, effects), last)
        if delivered > effects:
            # Received by the last run but not acknowledged: some effects may be stored already.
            stored = await StoredEffects.load(d.nc, self.cfg, effects, delivered, last)
            self.outbox.stored_effects = stored
            self._log.info(
                "unacknowledged_effects_checked", events=f"{effects + 1}..{delivered}", stored=len(stored.ids)
            )
        self.applied_seq = self.acked_seq = self.snapshots.snapshot_seq = applied
        self.effects_seq = self.suppress_through = effects
        self._received_through = applied
        self.meter.start(max(0, last - applied))
        await self.snapshots.mark_start(applied, effects, delivered)
        self.pulls.fence()
        await streams.position_consumer(d.jsm, self.cfg, self.index, applied + 1)
        await self.snapshots.restore_key_filter(self.stored)
        self.timers.recovering_until_us = d.now_us()
        self._log.info(
            "partition_ready", applied_seq=applied, effects_confirmed_seq=effects, stream_first=first,
            stream_last=last, backlog=max(0, last - applied),
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
        if len(self.pulls.requests) >= 2 or self._reposition:
            return  # (a pull sent before the consumer is recreated would reach the old one)
        if len(self.outbox.inflight) + len(self._inq) > 4 * batch or self._over_cap():
            return
        await self.pulls.send(self.d.nc, batch, self.d.now_us())

    def _on_status(self, hdr: dict[str, str] | None, data: bytes, rid: str) -> None:
        """A status on one of our pull requests (see PullRequests.on_status)."""
        seen, reposition = self.pulls.on_status(hdr, data, rid, self.d.now_us())
        if seen > self.caught_up_us:
            self.caught_up_us = seen
        if reposition:
            self._reposition = True

    # ------------------------------------------------------------------ the loop

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe the pull inbox, load the timers due soon, then loop until stopped.

        The snapshot writer and (for a store whose keys are not known yet) the key-filter fill
        run beside the loop, in this task's group.
        """
        d = self.d
        self.pulls.inbox = d.nc.new_inbox()
        sub = await d.nc.subscribe(self.pulls.inbox + ".*", pending_msgs_limit=0, pending_bytes_limit=0)
        d.raw_path(sub, self.on_raw)
        self._received_through = self.applied_seq
        await self._load_horizon(d.now_us())
        self.ready.set()
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.snapshots.serve)
                if not self.stored.ready:
                    tg.start_soon(self.snapshots.fill_key_filter, self.stored)
                await self._loop()
                await self.snapshots.done.wait()
                tg.cancel_scope.cancel()
        finally:
            self.finished.set()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _loop(self) -> None:
        nc = self.d.nc
        while True:
            if self._reposition and nc.is_connected:
                await self._do_reposition()
            if not self._stopping:
                await self._send_pull()
            if self._inq:
                await self._drain()
            await self._advance_acks()
            await self._fire_due()
            await self._maybe_snapshot()
            await self._write_fired()
            if len(self.resident) > self.cap:
                self.snapshots.evict(self.cap)
            if self._stopping and not self._inq:
                return
            if self._inq:
                continue
            if not self._stopping:
                await self._send_pull()  # the drain may have used up the outstanding requests
            self._wake = anyio.Event()
            if self._inq or (self._reposition and nc.is_connected):
                continue  # (while disconnected, on_reconnected wakes the loop)
            with anyio.move_on_after(self._idle_wait()):
                await self._wake.wait()
            self.pulls.lost()

    def _idle_wait(self) -> float:
        wait = 0.25
        due = self.timers.next_due()
        if due is not None:
            until_due = (due - self.d.now_us()) / 1e6
            # A timer already due waits for the stream to be seen up to it: a pull status or a
            # message brings that, and wakes the loop. Polling for it meanwhile would spin.
            if until_due > 0:
                wait = min(wait, until_due)
        return max(wait, 0.001)

    async def _do_reposition(self) -> None:
        self.pulls.fence()
        self._reposition = False
        self.pulls.clear()
        # The new consumer's ack floor is start - 1, and a restart trusts that floor: start
        # after what is confirmed, not after what was received (redeliveries are skipped).
        start = min(self._received_through, self.outbox.confirmed_through(self.applied_seq)) + 1
        try:
            await streams.position_consumer(self.d.jsm, self.cfg, self.index, start)
        except Exception as exc:
            self._log.warning("consumer_reposition_failed", error=repr(exc))
            self._reposition = True
            await anyio.sleep(0.5)
            return
        # Whatever is queued came from the old consumer after a lost connection: not to be trusted.
        self._inq.clear()
        self._fenced = False
        self._log.info("consumer_repositioned", start_seq=start)

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
        self.pulls.fence()
        inq = self._inq
        resident = self.resident
        subjects = self._subjects
        apply_fns = _APPLY
        decoders = DECODERS
        th = self.th
        dirty = self.snapshots.dirty
        stored = self.stored
        new_state = _NEW
        schedule = self.timers.schedule
        received = self._received_through
        applied, last_reply, future, future_bound = self.applied_seq, self.last_reply, self.future, self.future.bound
        lru = len(resident) >= self._lru_from
        delivered = tally = 0  # tally: events applied, one weight per kind (see router.engine.meter)
        caught_up_reply = b""
        self.pulls.last_heard = started = time.monotonic()
        while inq:
            subject, reply, data, hdr = inq.popleft()
            if not reply.startswith(b"$JS.ACK."):  # see router.jetstream.pull
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
                    await self.pulls.ack(self.d.nc, reply)
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
            ts = event.ts
            ts_us = to_us(ts) if ts is not None else (reply_ts_ns(reply) + 500) // 1000
            if ts_us > future_bound and ts is not None:  # perhaps too far ahead: the exact check
                if (rejected := future.check(ts_us, reply, parsed[0])) is not None:
                    await self._rare(seq, reply, prev_seq, prev_reply, rejected, data, None, None, None, 0)
                    continue
                future_bound = future.bound
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
            try:
                effects = apply_fns[kind](state, event, ts_us, th)
            except Exception as exc:  # a defect in an actor: report it, keep the partition going
                await self._rare(seq, reply, prev_seq, prev_reply, parsed, data, event, exc, None, ts_us)
                continue
            state.seq = seq
            dirty.add(k)
            tally += parsed[4]
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
            ts_ns = reply_ts_ns(last_reply)
            if ts_ns > self.stream_ts_ns:
                self.stream_ts_ns = ts_ns
        self.applied_seq, self.last_reply = applied, last_reply
        self.snapshots.since += delivered
        self.processed += delivered
        self.pulls.account(delivered)
        self.meter.batch(tally, last_reply if delivered else b"", len(inq), started)
        if caught_up_reply:
            self.caught_up_us = max(self.caught_up_us, ns_to_us(reply_ts_ns(caught_up_reply)))
        if len(resident) > self.cap:
            self.snapshots.evict(self.cap)

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

    def _subject(self, subject: bytes) -> CountedSubject | Rejected:
        """(subject, kind, key, (kind, key), weight) of a stored subject, or why it is a bad_subject; cached."""
        cached = self._subjects.get(subject)
        if cached is None:
            cached = counted(read_subject(subject))
            if len(self._subjects) >= SUBJECT_CACHE:
                self._subjects.clear()
            self._subjects[subject] = cached
        return cached

    async def _load(self, keys: set[tuple[str, str]]) -> None:
        found = await self.d.store.load_actors(list(keys))
        for k in keys:
            item = found.get(k)
            if item is not None:
                self.resident[k] = actors.decode_state(k[0], item[1])
            else:
                self.resident[k] = actors.ACTORS[k[0]].new(k[1])
                self.stored.add(k)

    async def _rare(
        self, seq: int, reply: bytes, prev_seq: int, prev_reply: bytes, parsed: Any, data: bytes,
        event: Any, exc: Exception | None, effects: Any, ts_us: int,
    ) -> None:
        """The uncommon outcomes of one message: dead letter, actor error, effects to publish."""
        publish = seq > self.suppress_through
        outbox = self.outbox
        if isinstance(parsed, Rejected):
            if publish:
                entry = outbox.track(seq, reply, prev_seq, prev_reply)
                await outbox.dead_letter(entry, parsed.subject, data, parsed.code, parsed.detail)
            return
        text, kind, key, k = parsed[:4]
        if event is None:  # the payload did not decode
            try:
                decode_payload(kind, data)
            except DecodeError as err:
                if publish:
                    entry = outbox.track(seq, reply, prev_seq, prev_reply)
                    await outbox.dead_letter(entry, text, data, err.code, err.detail)
                return
            raise AssertionError("decode_payload accepted what the decoder refused")  # pragma: no cover
        if exc is not None:
            self._log.error("actor_error", kind=kind, key=key, seq=seq, error=repr(exc))
            # The actor may have changed the state before raising: as if the event never came.
            self.resident[k] = await rebuild_state(self.d.store, self.d.nc, self.cfg, self.th, kind, key, seq)
            self.snapshots.dirty.add(k)
            if publish:
                entry = outbox.track(seq, reply, prev_seq, prev_reply)
                detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
                await outbox.dead_letter(entry, text, data, ACTOR_ERROR, detail)
            return
        outward = publish and any(type(e) is not SetTimer for e in effects)
        tracked = outbox.track(seq, reply, prev_seq, prev_reply) if outward else None
        await outbox.effects(tracked, kind, key, seq, ts_us, effects, publish)

    async def _advance_acks(self) -> None:
        """Ack (AckAll) up to just before the first message whose effects are not all confirmed."""
        seq, reply = self.outbox.ack_point(self.applied_seq, self.last_reply)
        if seq <= self.acked_seq or not reply:
            return
        self.effects_seq = max(self.effects_seq, seq)
        self.acked_seq = seq
        await self.pulls.ack(self.d.nc, reply)

    # ------------------------------------------------------------------ timers

    async def _load_horizon(self, now: int) -> None:
        until, limit = self.timers.horizon(now)
        self.timers.add_horizon(await self.d.store.due_timers(self.index, until, limit), now, until)

    async def _fire_due(self) -> None:
        """Fire the timers due up to where the stream has been seen, in chunks."""
        t = self.timers
        now = self.d.now_us()
        if t.horizon_due(now):
            await self._load_horizon(now)
        limit = min(now, max(self.caught_up_us, ns_to_us(self.stream_ts_ns)))
        heap = t.heap
        while heap and heap[0][0] <= limit:
            await self._fire(t.pop_due(limit))
        # Every timer due up to here has been fired (or found stale): what a caller can wait on.
        t.fired_through_us = min(limit, t.horizon_until)

    async def _fire(self, due: list[tuple[int, str, str, str]]) -> None:
        resident, t = self.resident, self.timers
        missing = {(kind, key) for _d, kind, key, _n in due if (kind, key) not in resident}
        if missing:
            await self._load(missing)  # one query for the actors not in memory
        fired: list[tuple[int, str, str, str, Any]] = []
        for deadline, kind, key, name in due:
            st = resident[(kind, key)]
            if actors.ACTORS[kind].timers(st).get(name) != deadline:
                continue  # moved or cancelled since it was set
            effects = actors.fire(kind, st, name, deadline, self.th)
            if effects:
                fired.append((deadline, kind, key, name, effects))
        # Due while the router was away: it may have fired before a crash. Ask EXCEPTIONS, all at once.
        published = await last_ids_stored(
            self.d.jsm,
            self.cfg.streams.exceptions,
            {i: alert_ids(kind, key, eff, timer_cause(d)) for i, (d, kind, key, _n, eff) in enumerate(fired) if d < t.recovering_until_us},
        )
        dirty = self.snapshots.dirty
        for i, (deadline, kind, key, name, effects) in enumerate(fired):
            k = (kind, key)
            dirty.add(k)
            publish = i not in published
            outward = sum(1 for e in effects if type(e) is Alert or type(e) is Send) if publish else 0
            if outward:
                # What to store once these are confirmed (see _write_fired).
                t.fired_unconfirmed(k, record(k, resident[k]), outward, self.snapshots.generation)
            done = self._firing_confirmed(k)
            await self.outbox.effects(None, kind, key, None, deadline, effects, publish, cause=timer_cause(deadline), done=done)
            t.fired += 1
            if publish:
                log.debug("timer_fired", kind=kind, key=key, timer=name, deadline=rfc3339(deadline))

    def _firing_confirmed(self, k: tuple[str, str]) -> Callable[[], None]:
        def done() -> None:
            if self.timers.confirm(k):
                self._wake.set()
                self.outbox.notify()

        return done

    async def _write_fired(self) -> None:
        """Store a fired actor as soon as the firing's exceptions are confirmed: a restart must not
        refire it (see Timers.take_confirmed)."""
        if not self.timers.has_confirmed or self.snapshots.running:
            return
        await self.snapshots.write_fired(self.timers.take_confirmed(self.effects_seq, self.snapshots.generation))

    # ------------------------------------------------------------------ memory

    def _over_cap(self) -> bool:
        """Too many actors in memory to fetch more until a snapshot lets dirty ones go."""
        return len(self.resident) > self.cap + self.cfg.router.fetch_batch

    # ------------------------------------------------------------------ snapshots

    async def _maybe_snapshot(self, force: bool = False) -> None:
        """Start a snapshot when one is due (or `force`d: then written before this returns)."""
        snap = self.snapshots
        if snap.running or not (force or snap.due()):
            return
        if force:
            job = snap.start(self.applied_seq, self.effects_seq)
            if job is not None:
                await snap.write(*job)
        else:
            snap.start_in_background(self.applied_seq, self.effects_seq)

    async def final_snapshot(self) -> None:
        """At a stop, after the loop returned: acknowledge what is confirmed, write everything, save the key filter."""
        await self.snapshots.done.wait()
        await self._advance_acks()
        await self._maybe_snapshot(force=True)
        await self.snapshots.save_key_filter(self.stored)


_APPLY: Final[dict[str, Callable[..., Any]]] = {kind: mod.apply for kind, mod in actors.ACTORS.items()}
_NEW: Final = {kind: mod.new for kind, mod in actors.ACTORS.items()}
