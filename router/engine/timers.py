"""A partition's wall-clock timers: the heap of what is due soon, firing, and storing what fired.

Deadlines live with their actors in the snapshot store (the timers table). In memory there
is only a heap of what is due within the horizon (`[router] timer_horizon`), read from the
store in one query and refreshed every half horizon, plus the deadlines set beyond it that
no committed snapshot holds yet. A timer fires once the stream has been seen up to its
deadline, through the partition's own loop, in order with its key's events (see
docs/timers.md).
"""

from __future__ import annotations

import functools
import heapq
from typing import TYPE_CHECKING, Any, Final

import anyio
import structlog

import actors
from actors import Alert, Send
from contracts.exceptions import exception_id, exception_subject, timer_cause
from contracts.times import ns_to_us, rfc3339
from snapshots import ActorRecord

if TYPE_CHECKING:
    from router.engine.partition import Partition

log = structlog.get_logger()

# At most this many timers are read from the store into the heap at once.
HORIZON_ROWS: Final = 100_000
# Due timers are fired in chunks of this many: one store read for their actors, checks at once.
FIRE_CHUNK: Final = 1000

Key = tuple[str, str]


class Timers:
    """The timers of one partition; `p` owns the actors they fire on."""

    def __init__(self, p: Partition) -> None:
        self.p = p
        self.heap: list[tuple[int, str, str, str]] = []
        self._heap_set: set[tuple[int, str, str, str]] = set()
        self.horizon_us = 0
        self.horizon_until = 0  # the heap holds every timer due up to here
        # Timers set beyond the horizon and not yet in a committed snapshot (key -> deadline).
        self.far: dict[tuple[str, str, str], int] = {}
        self._far_writing: dict[tuple[str, str, str], int] = {}
        self._next_horizon = 0
        self._horizon_full = False  # the last horizon load stopped at HORIZON_ROWS
        self.recovering_until_us = 0  # due before this (the start): may have fired before a crash
        # Every timer due up to here has been fired (its effects handed to the publisher) or
        # found stale, as of the last fire_due: what a caller can wait on.
        self.fired_through_us = 0
        # Firings whose exceptions are not all confirmed yet:
        # key -> [ActorRecord right after the firing, publishes outstanding, snapshot generation then].
        self.unconfirmed: dict[Key, list[Any]] = {}
        self._confirmed: set[Key] = set()

    def next_due(self) -> int | None:
        return self.heap[0][0] if self.heap else None

    def push(self, deadline: int, kind: str, key: str, name: str) -> None:
        item = (deadline, kind, key, name)
        if item not in self._heap_set:
            self._heap_set.add(item)
            heapq.heappush(self.heap, item)

    def schedule(self, deadline: int, kind: str, key: str, name: str) -> None:
        """A timer an actor set: into the heap when due within the horizon, else kept for the next snapshot."""
        if deadline <= self.horizon_until:
            self.push(deadline, kind, key, name)
        else:
            self.far[(kind, key, name)] = deadline

    # A snapshot stores the far timers set before it started: they stay in view until it is committed.
    def snapshot_started(self) -> None:
        self._far_writing, self.far = self.far, {}

    def snapshot_failed(self) -> None:
        self.far.update(self._far_writing)

    def snapshot_ended(self) -> None:
        self._far_writing = {}

    async def load_horizon(self) -> None:
        p = self.p
        now = p.rt.now_us()
        until = now + self.horizon_us
        rows = await p.rt.store.due_timers(p.index, until, HORIZON_ROWS)
        for deadline, kind, key, name in rows:
            self.push(deadline, kind, key, name)
        # Far timers set since the last committed snapshot are not in the store yet.
        for far in (self.far, self._far_writing):
            for (kind, key, name), deadline in list(far.items()):
                if deadline <= until:
                    self.push(deadline, kind, key, name)
        self._horizon_full = len(rows) >= HORIZON_ROWS
        if self._horizon_full:
            # More are due within the horizon than one load takes: the heap covers up to the last
            # deadline read, and the next load comes as soon as it has fired down to there.
            until = rows[-1].deadline_us
        self.horizon_until = until
        self._next_horizon = now + self.horizon_us // 2

    async def fire_due(self) -> None:
        p = self.p
        now = p.rt.now_us()
        if now >= self._next_horizon or (
            self._horizon_full and (not self.heap or self.heap[0][0] > self.horizon_until)
        ):
            # Look further ahead: the store, plus far timers set since the last snapshot
            # (no snapshot is forced here: that would hold up the partition).
            await self.load_horizon()
        heap = self.heap
        limit = min(now, max(p.caught_up_us, ns_to_us(p.stream_ts_ns)))
        while heap and heap[0][0] <= limit:
            due: list[tuple[int, str, str, str]] = []
            while heap and heap[0][0] <= limit and len(due) < FIRE_CHUNK:
                item = heapq.heappop(heap)
                self._heap_set.discard(item)
                due.append(item)
            missing = {(kind, key) for _d, kind, key, _n in due if (kind, key) not in p.resident}
            if missing:
                await p._load(missing)  # one query for the actors not in memory
            fired: list[tuple[int, str, str, str, Any]] = []
            for deadline, kind, key, name in due:
                st = p.resident[(kind, key)]
                if actors.ACTORS[kind].timers(st).get(name) != deadline:
                    continue  # moved or cancelled since it was set
                effects = actors.fire(kind, st, name, deadline, p.th)
                if effects:
                    fired.append((deadline, kind, key, name, effects))
            # Due while the router was away: it may have fired before a crash. Ask EXCEPTIONS, all at once.
            published = await self._already_published(
                {
                    i: (kind, key, eff, timer_cause(d))
                    for i, (d, kind, key, _n, eff) in enumerate(fired)
                    if d < self.recovering_until_us
                }
            )
            for i, (deadline, kind, key, name, effects) in enumerate(fired):
                k = (kind, key)
                st = p.resident[k]
                p.dirty.add(k)
                cause = timer_cause(deadline)
                publish = i not in published
                outward = sum(1 for e in effects if type(e) is Alert or type(e) is Send) if publish else 0
                if outward:
                    # What to store once these are confirmed (see write_confirmed).
                    record = p.record(k, st)
                    pending = self.unconfirmed.get(k)
                    self.unconfirmed[k] = [record, outward + (pending[1] if pending else 0), p._snapshot_gen]
                await p._effects(
                    None, kind, key, None, deadline, effects, publish, cause=cause, done=functools.partial(self._done, k)
                )
                if publish:
                    log.info("timer_fired", kind=kind, key=key, timer=name, deadline=rfc3339(deadline))
        self.fired_through_us = min(limit, self.horizon_until)

    def _done(self, k: Key) -> None:
        pending = self.unconfirmed.get(k)
        if pending is not None:
            pending[1] -= 1
            if pending[1] == 0:
                self._confirmed.add(k)
                self.p._wake.set()

    async def write_confirmed(self) -> None:
        """Store a fired actor as soon as the firing's exceptions are confirmed: a restart must not refire.

        What is stored is the state right after the firing, not the current one: events applied
        since then are not covered by the partition's marks yet, and a restart must apply them
        again (a clear after the raise, say). It is stored only when no snapshot has started
        since the firing (that snapshot holds this actor, as new or newer) and only once the
        effects of every event it includes are confirmed.
        """
        p = self.p
        if not self._confirmed or p._snapshot_running:
            return
        rows: list[ActorRecord] = []
        unconfirmed, effects_seq, gen = self.unconfirmed, p.effects_seq, p._snapshot_gen
        for k in list(self._confirmed):
            record, outstanding, fired_gen = unconfirmed[k]
            if fired_gen != gen or outstanding:
                self._confirmed.discard(k)
                if not outstanding:
                    del unconfirmed[k]
            elif record.last_seq <= effects_seq:
                self._confirmed.discard(k)
                del unconfirmed[k]
                rows.append(record)
        if rows:
            await p.rt.store.write_actors(p.index, rows)

    async def _already_published(self, firings: dict[int, tuple[str, str, Any, str]]) -> set[int]:
        """Which of the firings (kind, key, effects, cause) are already in EXCEPTIONS; checked concurrently."""
        found: set[int] = set()
        if not firings:
            return found
        limiter = anyio.Semaphore(64)

        async def check(i: int, kind: str, key: str, effects: Any, cause: str) -> None:
            async with limiter:
                if await self._one_already_published(kind, key, effects, cause):
                    found.add(i)

        async with anyio.create_task_group() as tg:
            for i, firing in firings.items():
                tg.start_soon(check, i, *firing)
        return found

    async def _one_already_published(self, kind: str, key: str, effects: Any, cause: str) -> bool:
        """After a restart, a timer due while the router was away may have fired before the crash."""
        rt = self.p.rt
        for eff in effects:
            if type(eff) is not Alert:
                continue
            want = exception_id(kind, key, eff.rule, eff.location, eff.status, cause)
            try:
                last = await rt.jsm.get_last_msg(rt.cfg.streams.exceptions, exception_subject(kind, eff.rule, key))
            except Exception:
                return False
            if (last.headers or {}).get("Nats-Msg-Id") != want:
                return False
        return True
