"""A partition's snapshots: which actors changed, when to write them, waiting for their effects, writing.

The partition's loop marks changed actors in `dirty`; `start` (from the loop) takes them as
one snapshot and `serve` (a task of the partition) writes it while the loop goes on. A
snapshot holds states and the partition's marks in one transaction, never ahead of the
confirmed effects of what it holds (see `write`). `commit` and `write_fired` are the only
ways a partition's state reaches the store: anything that must hold for every write (a fence)
belongs there. The key filter is filled and saved here too: it says what the store holds.

A full disk (SQLITE_FULL) fails a write and nothing else: its actors stay dirty (and in
memory), the partition goes on applying and acknowledging (a restart resumes from the
store's marks, so the stream still holds everything the store lacks), and the write is
tried again with a growing pause until there is space. `disk_full` says so meanwhile, and
one log line each way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import anyio
import anyio.lowlevel
import msgspec
import structlog

import actors
from router.engine.clustercopy import PartitionCopy
from router.engine.keyfilter import KeyFilter
from router.engine.open_index import OpenIndex, View
from router.engine.outbox import Outbox
from router.engine.timers import Timers
from router.jetstream.statecopy import CopyUnavailable
from snapshots import ActorRecord, OpenRows, PartitionMarks, Store, StoreFullError

log = structlog.get_logger()

Key = tuple[str, str]

# The longest the snapshot's row building runs before the loop gets a turn.
_SLICE_S: Final = 0.0003
# Keys read per page when filling the key filter.
KEY_FILTER_PAGE: Final = 4_000
# After a write found the disk full, the next try comes after this many seconds, doubling up to the most.
FULL_RETRY_FIRST_S: Final = 1.0
FULL_RETRY_MOST_S: Final = 30.0

# A snapshot asks only the kinds that keep timers for them (see ActorRecord.timers).
_TIMERS: Final = {kind: mod.timers if kind in actors.TIMED_KINDS else None for kind, mod in actors.ACTORS.items()}


def record(k: Key, st: Any, open_rows: OpenRows | None = None) -> ActorRecord:
    """What the store keeps of an actor: its state, its timers when its kind keeps any, and the
    changes to its open exceptions (`open_rows`, see router.engine.open_index)."""
    timers = _TIMERS[k[0]]
    return ActorRecord(
        k[0], k[1], st.seq, actors.encode_state(st), timers(st) if timers is not None else None, open_rows
    )


class Snapshotter:
    """Snapshots of one partition's actors (`resident`, owned by the partition) into `store`."""

    def __init__(
        self,
        store: Store,
        index: int,
        resident: dict[Key, Any],
        every_events: int,
        every_s: float,
        outbox: Outbox,
        timers: Timers,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        on_written: Callable[[float], None] | None = None,
    ) -> None:
        self._store = store
        self._index = index
        self._resident = resident
        self.every_events = every_events
        self._every_s = every_s
        self._outbox = outbox
        self._timers = timers
        self._wake = wake  # a snapshot ended: written actors may be evicted, fetching may resume
        self._log = log.bind(partition=index)
        self._clock = clock  # for the pause after a full disk
        self._on_written = on_written  # each snapshot written: its seconds from start to commit
        self.disk_full = False  # the last write found no room
        self._full_retry_at = 0.0
        self._full_pause = 0.0
        self.dirty: set[Key] = set()  # changed since the last snapshot started
        self.writing: set[Key] = set()  # in the snapshot being written
        self.since = 0  # events applied since the last snapshot started
        self.last = time.monotonic()  # when the last one started
        self.caught_up_at = self.last  # when the stored state last held everything applied then
        self.running = False
        self.done = anyio.Event()
        self.done.set()
        self.generation = 0  # snapshots started so far
        self.snapshot_seq = 0  # applied_seq of the last snapshot written
        self.marked_effects = 0  # effects_seq as last written to the store
        # Called just before each commit (see Store.write_snapshot): what it raises rolls the write back.
        self.fence: Callable[[], None] | None = None
        # The cluster copy of the partition (router.engine.clustercopy), written before the store; None: off.
        self.copy: PartitionCopy | None = None
        self.copy_behind = False  # the last write could not reach the cluster copy
        self._job: tuple[set[Key], int, int] | None = None
        self._requested = anyio.Event()
        # The partition's open exceptions: changed by the outbox, written with the actors here.
        self.open = OpenIndex(index, resident)
        outbox.open_index = self.open

    def open_view(self, stored: Iterable[Key] = ()) -> View:
        """The open-set changes not in the store yet (for a query: see router.engine.open_query)."""
        return self.open.view(stored)

    # ------------------------------------------------------------------ when

    def due(self) -> bool:
        if (self.disk_full or self.copy_behind) and self._clock() < self._full_retry_at:
            return False
        return self.since >= self.every_events or time.monotonic() - self.last >= self._every_s

    def request_now(self) -> None:
        """Make the next look at `due` say yes (too many actors in memory)."""
        if not self.running:
            self.since = self.every_events

    def start(self, applied: int, effects: int) -> tuple[set[Key], int, int] | None:
        """Take the dirty actors as one snapshot through `applied`; None when there is nothing to write."""
        if self.running:
            return None
        if not self.dirty and applied == self.snapshot_seq and effects <= self.marked_effects:
            self.last = self.caught_up_at = time.monotonic()
            return None
        self.running = True
        self.done = anyio.Event()
        writing, self.dirty = self.dirty, set()
        self.writing = writing
        # Timers beyond the horizon set since the last snapshot: this one stores them.
        self._timers.snapshot_started()
        self.generation += 1
        self.since = 0
        self.last = time.monotonic()
        return writing, applied, effects

    def start_in_background(self, applied: int, effects: int) -> None:
        """`start`, written by `serve`."""
        job = self.start(applied, effects)
        if job is not None:
            self._job = job
            self._requested.set()

    async def serve(self) -> None:
        """Write the snapshots `start_in_background` asks for, one at a time, until cancelled."""
        try:
            while True:
                await self._requested.wait()
                self._requested = anyio.Event()
                job, self._job = self._job, None
                if job is not None:
                    await self.write(*job)
        finally:
            job, self._job = self._job, None
            if job is not None:  # cancelled before it began: as if never started
                self.dirty |= job[0]
                self._timers.snapshot_failed()
                self._timers.snapshot_ended()
                self.writing = set()
                self.running = False
                self.done.set()

    def evict(self, cap: int) -> None:
        """Drop least recently used clean actors down to 90% of `cap` (they reload from SQLite).

        Dirty actors stay until a snapshot has written them: being over the cap asks for one
        at once, and the partition stops fetching while the excess waits for it.
        """
        resident = self._resident
        excess = len(resident) - int(cap * 0.9)
        if excess <= 0:
            return
        dirty, writing = self.dirty, self.writing
        limit = excess + len(dirty) + len(writing)  # scan no further than this many
        victims: list[Key] = []
        for i, k in enumerate(resident):  # least recently used first
            if i >= limit or len(victims) >= excess:
                break
            if k not in dirty and k not in writing:
                victims.append(k)
        for k in victims:
            del resident[k]
        if len(resident) > cap:
            self.request_now()  # write back now

    # ------------------------------------------------------------------ writing

    async def write(self, keys: set[Key], applied: int, effects: int) -> None:
        """Write the states of `keys` and the marks `applied`/`effects` (after `start`)."""
        started = time.monotonic()
        try:
            rows = []
            resident = self._resident
            n = 0
            top = applied  # the highest sequence any stored state holds
            slice_end = time.perf_counter() + _SLICE_S
            capture = self.open.capture
            for k in keys:
                st = resident.get(k)
                if st is None:
                    continue
                rows.append(record(k, st, capture(k, st)))
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
            # rejected publish, then a crash). Timer firings of these keys count too.
            timers = self._timers
            await self._outbox.wait_confirmed(top, lambda: timers.pending_for(keys))
            effects = max(effects, top)
            await self.commit(rows, applied, effects)
            self.snapshot_seq = applied
            self.marked_effects = effects
            self._room_again()
            self.caught_up_at = started
            if self._on_written is not None:
                self._on_written(time.monotonic() - started)
            if rows:
                self._log.debug(
                    "snapshot_written",
                    actors=len(rows),
                    applied_seq=applied,
                    ms=round((time.monotonic() - started) * 1000, 1),
                )
            while len(rows) > 256:  # freeing 100k records at once would hold up the loop for ~20 ms
                del rows[-256:]
                await anyio.lowlevel.checkpoint()
        except StoreFullError as exc:
            self.dirty |= keys  # not written: keep them dirty
            self._timers.snapshot_failed()  # and their far timers in view
            self._no_room(exc, "snapshot")
        except CopyUnavailable as exc:  # the same: kept dirty, tried again with a growing pause
            self.dirty |= keys
            self._timers.snapshot_failed()
            self._copy_failed(exc, "snapshot")
        except BaseException:
            self.dirty |= keys
            self._timers.snapshot_failed()
            raise
        finally:
            self._timers.snapshot_ended()
            self.writing = set()
            self.running = False
            self.done.set()
            self._wake()

    async def commit(self, rows: Sequence[ActorRecord], applied: int, effects: int) -> None:
        """The one write of a snapshot: the cluster copy first (when on), then states and marks in
        one transaction."""
        if self.copy is not None:
            await self.copy.write(rows, applied, effects)
            self._copy_again()
        await self._store.write_snapshot(self._index, rows, applied_seq=applied, effects_seq=effects, fence=self.fence)
        self.open.committed(rows)

    async def write_fired(self, rows: Sequence[ActorRecord]) -> None:
        """Store actors whose timer firings are confirmed (marks unchanged).

        On a full disk they are not stored now: each is dirty since its firing, so the next
        snapshot that is written stores it (newer, with marks that cover it)."""
        if not rows:
            return
        # With the key's open-set changes up to now (see router.engine.open_index).
        resident, capture = self._resident, self.open.capture
        captured = []
        for r in rows:
            st = resident.get((r.kind, r.key))
            captured.append(r if st is None else msgspec.structs.replace(r, open=capture((r.kind, r.key), st)))
        rows = captured
        try:
            if self.copy is not None:
                await self.copy.write_actors(rows)
            await self._store.write_actors(self._index, rows, fence=self.fence)
            self.open.committed(rows)
        except StoreFullError as exc:
            self._no_room(exc, "fired timers")
        except CopyUnavailable as exc:
            self._copy_failed(exc, "fired timers")

    async def start_marks(self) -> PartitionMarks:
        """At start: the local store's marks, after bringing it in line with the cluster copy."""
        if self.copy is not None:
            await self.copy.reconcile()
        return await self._store.marks(self._index)

    async def mark_start(self, applied: int, effects: int, delivered: int) -> None:
        """At start, before the consumer is recreated: the marks into the cluster copy."""
        if self.copy is not None:
            await self.copy.mark_start(applied, effects, delivered)

    def _copy_failed(self, exc: CopyUnavailable, what: str) -> None:
        self._full_pause = min(FULL_RETRY_MOST_S, self._full_pause * 2 or FULL_RETRY_FIRST_S)
        self._full_retry_at = self._clock() + self._full_pause
        if not self.copy_behind:
            self.copy_behind = True
            self._log.error(
                "state_copy_behind", write=what, error=str(exc),
                action="applying and acknowledging on; snapshots retried until the cluster copy takes them",
            )

    def _copy_again(self) -> None:
        if self.copy_behind:
            self.copy_behind = False
            self._log.warning("state_copy_caught_up", dirty_left=len(self.dirty))
            self._full_pause = 0.0

    def _no_room(self, exc: StoreFullError, what: str) -> None:
        """A write found the disk full: try again later, pausing longer each time."""
        self._full_pause = min(FULL_RETRY_MOST_S, self._full_pause * 2 or FULL_RETRY_FIRST_S)
        self._full_retry_at = self._clock() + self._full_pause
        if not self.disk_full:
            self.disk_full = True
            self._log.error(
                "disk_full",
                write=what,
                error=str(exc),
                action="applying and acknowledging on; snapshots retried until there is space",
            )

    def _room_again(self) -> None:
        if self.disk_full:
            self.disk_full = False
            self._log.warning("disk_full_over", dirty_left=len(self.dirty))
        self._full_pause = 0.0

    # ------------------------------------------------------------------ the key filter

    @property
    def _filter_name(self) -> str:
        return f"key_filter:{self._index}"

    async def restore_key_filter(self, stored: KeyFilter) -> None:
        """At start: trust a saved filter, or an empty store; else `stored` waits for `fill_key_filter`."""
        saved = await self._store.take_blob(self._filter_name)  # used once: a crash later must not reuse it
        if not await self._store.actor_keys(self._index, limit=1):
            stored.ready = True  # an empty store: no lookups until something is written
        elif saved is not None and stored.load(saved):
            self._log.info("key_filter_restored", keys=stored.count)

    async def fill_key_filter(self, stored: KeyFilter) -> None:
        """Read the stored keys into the filter in the background; lookups use SQLite meanwhile."""
        started = time.monotonic()
        after = ("", "")
        n = 0
        while True:
            # Small pages: actor loads share the store's read connection and queue behind each page.
            page = await self._store.actor_keys(self._index, after, KEY_FILTER_PAGE)
            for k in page:
                stored.add(k)
            n += len(page)
            if len(page) < KEY_FILTER_PAGE:
                break
            after = page[-1]
        stored.ready = True
        self._log.info("key_filter_ready", keys=n, s=round(time.monotonic() - started, 2))

    async def save_key_filter(self, stored: KeyFilter) -> None:
        """At a clean stop: every stored key is in the filter (keys are added when their actor is
        created), so the next start can skip reading them all. It takes the filter back out at
        once, so a crash after that start never trusts a filter older than the store."""
        if stored.ready:
            try:
                await self._store.save_blob(self._filter_name, stored.dump())
            except StoreFullError as exc:  # a cache: the next start reads the keys instead
                self._log.warning("key_filter_not_saved", error=str(exc))
