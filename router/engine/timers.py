"""A partition's wall-clock timers as bookkeeping: what is due soon, what is set beyond that, what fired
and waits for its exceptions to be confirmed.

Deadlines live with their actors in the snapshot store (the timers table). In memory there
is only a heap of what is due within the horizon (`[router] timer_horizon`), read from the
store in one query and refreshed every half horizon, plus the deadlines set beyond it that
no committed snapshot holds yet. A timer fires once the stream has been seen up to its
deadline, through the partition's own loop, in order with its key's events (see
docs/timers.md).

Nothing here does I/O or touches an actor: `Timers` says what is due (`pop_due`), what to
read from the store (`horizon`, then `add_horizon`) and which fired states may be
stored (`take_confirmed`); the partition loads, fires, publishes and writes.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from snapshots import ActorRecord

# At most this many timers are read from the store into the heap at once.
HORIZON_ROWS: Final = 100_000
# Due timers are fired in chunks of this many: one store read for their actors, checks at once.
FIRE_CHUNK: Final = 1000

Key = tuple[str, str]
Due = tuple[int, str, str, str]  # (deadline, kind, key, timer name)


@dataclass(slots=True)
class Unconfirmed:
    """A firing whose exceptions or messages are not all confirmed yet."""

    record: ActorRecord  # the actor right after the firing: what to store once confirmed
    outstanding: int  # publishes not yet confirmed
    generation: int  # snapshots started before the firing


@dataclass(slots=True)
class Timers:
    """The timers of one partition."""

    horizon_us: int = 0
    heap: list[Due] = field(default_factory=list)
    _heap_set: set[Due] = field(default_factory=set)
    horizon_until: int = 0  # the heap holds every timer due up to here
    # Timers set beyond the horizon and not yet in a committed snapshot ((kind, key, name) -> deadline).
    far: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _far_writing: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _next_horizon: int = 0
    _horizon_full: bool = False  # the last horizon load stopped at HORIZON_ROWS
    recovering_until_us: int = 0  # due before this (the start): may have fired before a crash
    unconfirmed: dict[Key, Unconfirmed] = field(default_factory=dict)
    _confirmed: set[Key] = field(default_factory=set)
    # For whoever watches: timers fired on an actor so far, and the time up to which every due
    # timer has been fired (its effects handed to the publisher) or found stale, as of the
    # partition's last look at the heap.
    fired: int = 0
    fired_through_us: int = 0

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

    # ------------------------------------------------------------------ the horizon

    def horizon_due(self, now: int) -> bool:
        """Whether to read the store's timers again now (see `horizon`)."""
        # Look further ahead: the store, plus far timers set since the last snapshot
        # (no snapshot is forced for this: that would hold up the partition).
        return now >= self._next_horizon or (
            self._horizon_full and (not self.heap or self.heap[0][0] > self.horizon_until)
        )

    def horizon(self, now: int) -> tuple[int, int]:
        """(deadline, row limit): read the store's timers due up to there, then `add_horizon`."""
        return now + self.horizon_us, HORIZON_ROWS

    def add_horizon(self, rows: Sequence[tuple[int, str, str, str]], now: int, until: int) -> None:
        """The store's timers due up to `until` (`rows`, at most HORIZON_ROWS, by deadline)."""
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
            until = rows[-1][0]
        self.horizon_until = until
        self._next_horizon = now + self.horizon_us // 2

    # ------------------------------------------------------------------ firing

    def pop_due(self, limit: int) -> list[Due]:
        """Up to FIRE_CHUNK timers due at or before `limit`, earliest first."""
        heap = self.heap
        due: list[Due] = []
        while heap and heap[0][0] <= limit and len(due) < FIRE_CHUNK:
            item = heapq.heappop(heap)
            self._heap_set.discard(item)
            due.append(item)
        return due

    def fired_unconfirmed(self, k: Key, record: ActorRecord, outward: int, generation: int) -> None:
        """A firing of `k` with `outward` publishes: store `record` once they are confirmed."""
        pending = self.unconfirmed.get(k)
        self.unconfirmed[k] = Unconfirmed(record, outward + (pending.outstanding if pending else 0), generation)

    def confirm(self, k: Key) -> bool:
        """One publish of a firing of `k` is confirmed; True when that was its last one."""
        pending = self.unconfirmed.get(k)
        if pending is not None:
            pending.outstanding -= 1
            if pending.outstanding == 0:
                self._confirmed.add(k)
                return True
        return False

    def pending_for(self, keys: set[Key]) -> bool:
        """Whether a firing of one of `keys` still waits for a publish to be confirmed."""
        return any(u.outstanding and k in keys for k, u in self.unconfirmed.items())

    def take_confirmed(self, effects_seq: int, generation: int) -> list[ActorRecord]:
        """Fired states to store now: a restart must not fire them again.

        What is stored is the state right after the firing, not the current one: events applied
        since then are not covered by the partition's marks yet, and a restart must apply them
        again (a clear after the raise, say). It is stored only when no snapshot has started
        since the firing (`generation`: that snapshot holds this actor, as new or newer) and only
        once the effects of every event it includes are confirmed (`effects_seq`).
        """
        rows: list[ActorRecord] = []
        if not self._confirmed:
            return rows
        unconfirmed = self.unconfirmed
        for k in list(self._confirmed):
            u = unconfirmed[k]
            if u.generation != generation or u.outstanding:
                self._confirmed.discard(k)
                if not u.outstanding:
                    del unconfirmed[k]
            elif u.record.last_seq <= effects_seq:
                self._confirmed.discard(k)
                del unconfirmed[k]
                rows.append(u.record)
        return rows

    @property
    def has_confirmed(self) -> bool:
        return bool(self._confirmed)
