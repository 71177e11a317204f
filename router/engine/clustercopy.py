"""A partition's state in the cluster: written with every snapshot, restored when the local store lacks it.

The snapshot store on the instance's disk is the working copy. The authoritative copy is the
KV bucket of `router.jetstream.statecopy` (replicated like the streams), so a partition's
state outlives the permanent loss of its owner's disk:

- Every snapshot writes its changed actors to the bucket, then the partition's marks
  (applied-through, effects-confirmed, delivered-through) by compare-and-set, and only then
  the local store. So the bucket is never behind the local store for what it holds, and an
  actor in it may be ahead of its marks only with its effects confirmed (a snapshot waits
  for them first), exactly as in the local store.
- At start (`reconcile`, before the partition reads its local marks): a local store behind
  the bucket (missing, emptied, or older because another instance owned the partition since)
  is brought up from the bucket: every actor of the partition with its timers, then the
  marks; the effects-confirmed and delivered-through marks are carried into the local store,
  so the start that follows suppresses and checks exactly what it would have on the old
  owner's disk. A local store ahead of the bucket (the copy was switched on later) uploads
  what the bucket lacks.
- `mark_start` writes the marks again just before the consumer is recreated: the consumer's
  ack floor is reset by that, and the effects-confirmed mark must survive in the cluster.
  Its compare-and-set is also a fence: once a new owner wrote the marks, an old owner's
  marks write is refused and it gives the partition up.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import anyio
import structlog

from router.engine.ownership import LeaseLost
from router.jetstream.statecopy import CopyConflict, CopyMarks, CopyUnavailable, StateCopy, encode_open_set
from snapshots import ActorRecord, OpenRows, Store, open_index

log = structlog.get_logger()

T = TypeVar("T")

# Actor records per local write while restoring.
RESTORE_CHUNK: Final = 20_000
UPLOAD_PAGE: Final = 5_000
# How long a start retries the bucket before it gives up.
START_RETRY_FOR_S: Final = 30.0


class PartitionCopy:
    """The cluster copy of one partition, for the instance that holds it under `epoch`."""

    def __init__(
        self, copy: StateCopy, store: Store, index: int, *, epoch: int = 0, instance: str = "",
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.copy = copy
        self.store = store
        self.index = index
        self.epoch = epoch
        self.instance = instance
        self.fence = fence
        self.revision = 0  # of the marks, as last read or written by this instance
        self.delivered = 0  # delivered-through, carried in every marks write
        self.restored = 0  # actors restored at start
        self.uploaded = 0  # actors uploaded at start
        self._log = log.bind(partition=index)

    # ------------------------------------------------------------------ start

    async def reconcile(self) -> None:
        """Bring the local store and the bucket into line (see the module docstring)."""
        marks, self.revision = await _retrying(lambda: self.copy.read_marks(self.index), "reading the copy's marks")
        local = await self.store.marks(self.index)
        if marks is None:
            if local.applied_seq or await self.store.actor_keys(self.index, limit=1):
                await _retrying(lambda: self._upload(0, local.applied_seq), "uploading to the copy")
            return
        self.delivered = marks.delivered
        # (each asked again while the cluster cannot answer: both only write what they read)
        if marks.applied > local.applied_seq:
            await _retrying(lambda: self._restore(marks, local.applied_seq), "restoring from the copy")
        elif marks.applied < local.applied_seq:
            await _retrying(lambda: self._upload(marks.applied, local.applied_seq), "uploading to the copy")
        # The marks the cluster keeps that a fresh or older local store lacks.
        if marks.effects > local.effects_seq:
            await self.store.write_effects_mark(self.index, marks.effects)
        name = f"delivered_through.{self.index}"
        raw = await self.store.read_blob(name)
        kept = int(raw) if raw and raw.isdigit() else 0
        if marks.delivered > kept:
            await self.store.save_blob(name, str(marks.delivered).encode())

    async def _restore(self, marks: CopyMarks, local_applied: int) -> None:
        started = time.monotonic()
        # A key filter saved by an older store does not know the keys created since: drop it.
        await self.store.take_blob(f"key_filter:{self.index}")
        opened = await self.copy.read_open_sets(self.index)
        n = 0
        chunk: list[ActorRecord] = []
        # Read and write at once: the store writes in its own thread while the next batch is read.
        send, receive = anyio.create_memory_object_stream[list[ActorRecord]](1)

        async def write_chunks() -> None:
            async with receive:
                async for rows in receive:
                    await self.store.write_actors(self.index, rows, fence=self.fence)

        async with anyio.create_task_group() as tg:
            tg.start_soon(write_chunks)
            async with send:
                async for batch in self.copy.read_actors(self.index):
                    for kind, key, a in batch:
                        rows = opened.get((kind, key))
                        # The key's open set replaces whatever the older local store had for it.
                        open_rows = OpenRows(clear=True, put=tuple(rows) if rows else ())
                        chunk.append(ActorRecord(kind, key, a.last_seq, a.state, a.timers, open_rows))
                    if len(chunk) >= RESTORE_CHUNK:
                        n += len(chunk)
                        await send.send(chunk)
                        chunk = []
        n += len(chunk)
        # The marks with the last actors: a crash before this leaves the local store behind,
        # and the next start restores again.
        await self.store.write_snapshot(
            self.index, chunk, applied_seq=marks.applied, effects_seq=marks.effects, fence=self.fence
        )
        self.restored = n
        self._log.info(
            "state_restored_from_cluster", actors=n, applied_seq=marks.applied, effects_confirmed_seq=marks.effects,
            local_applied_seq=local_applied, written_by=marks.instance, s=round(time.monotonic() - started, 2),
        )

    async def _upload(self, newer_than: int, local_applied: int) -> None:
        """Copy the local actors the bucket lacks (last_seq above `newer_than`)."""
        started = time.monotonic()
        after = ("", "")
        n = 0
        while True:
            page = await self.store.partition_actors(self.index, after, UPLOAD_PAGE, newer_than)
            if not page:
                break
            # With each key's whole open set (an empty one too: the copy may hold an older one).
            sets: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {(r.kind, r.key): [] for r in page}
            for row in await open_index.of_keys(self.store, list(sets)):
                sets[(row.kind, row.key)].append((row.rule, row.location, row.severity, row.payload))
            open_sets = [(kind, key, encode_open_set(sorted(rows))) for (kind, key), rows in sets.items()]
            await self.copy.write_actors(self.index, page, self.fence, open_sets=open_sets)
            n += len(page)
            after = (page[-1].kind, page[-1].key)
            if len(page) < UPLOAD_PAGE:
                break
        self.uploaded = n
        self._log.info(
            "state_uploaded_to_cluster", actors=n, newer_than_seq=newer_than, applied_seq=local_applied,
            s=round(time.monotonic() - started, 2),
        )

    async def mark_start(self, applied: int, effects: int, delivered: int) -> None:
        """The marks as this start found them, before the consumer is recreated."""
        self.delivered = max(self.delivered, delivered)
        await _retrying(lambda: self._write_marks(applied, effects), "writing the copy's marks")

    # ------------------------------------------------------------------ snapshots

    async def write(self, rows: Sequence[ActorRecord], applied: int, effects: int) -> None:
        """A snapshot's actors, then its marks. CopyUnavailable: not written (try again later)."""
        await self.write_actors(rows)
        await self._write_marks(applied, effects)

    async def write_actors(self, rows: Sequence[ActorRecord]) -> None:
        """Actors, and the whole open set of each whose open set changed (see `_open_sets`)."""
        if self.fence is not None:
            self.fence()
        await self.copy.write_actors(self.index, rows, self.fence, open_sets=await self._open_sets(rows))

    async def _open_sets(self, rows: Sequence[ActorRecord]) -> list[tuple[str, str, bytes]]:
        """The open exceptions of each key among `rows` whose record carries changes to them: the
        local store's rows (written up to the last snapshot; this one is written after the copy)
        with the changes laid over, as `snapshots.open_index.put_open` applies them. The bucket
        keeps the last value of a key only, so it holds whole sets, not changes."""
        changed = [r for r in rows if r.open is not None]
        if not changed:
            return []
        stored: dict[tuple[str, str], dict[tuple[str, str], tuple[str, str]]] = {}
        for row in await open_index.of_keys(self.store, [(r.kind, r.key) for r in changed]):
            stored.setdefault((row.kind, row.key), {})[(row.rule, row.location)] = (row.severity, row.payload)
        out = []
        for r in changed:
            o = r.open
            assert o is not None
            cur = {} if o.clear else dict(stored.get((r.kind, r.key), {}))
            for entry in o.drop:
                cur.pop(entry, None)
            for rule, loc, sev, payload in o.put:
                cur[(rule, loc)] = (sev, payload)
            full = [(rule, loc, sev, payload) for (rule, loc), (sev, payload) in sorted(cur.items())]
            out.append((r.kind, r.key, encode_open_set(full)))
        return out

    async def _write_marks(self, applied: int, effects: int) -> None:
        if self.fence is not None:
            self.fence()
        marks = CopyMarks(
            applied=applied, effects=effects, delivered=self.delivered, epoch=self.epoch, instance=self.instance
        )
        try:
            self.revision = await self.copy.write_marks(self.index, marks, self.revision)
        except CopyConflict as exc:
            # Another instance wrote them since: it holds the partition now.
            raise LeaseLost(f"partition {self.index}: {exc}") from exc


async def _retrying(op: Callable[[], Awaitable[T]], what: str) -> T:
    """`op()` until it succeeds, for up to START_RETRY_FOR_S; then CopyUnavailable is raised."""
    started = time.monotonic()
    pause = 0.2
    while True:
        try:
            return await op()
        except CopyUnavailable as exc:
            if time.monotonic() - started >= START_RETRY_FOR_S:
                raise
            log.warning("state_copy_unavailable", doing=what, error=str(exc), retry_in_s=pause)
            await anyio.sleep(pause)
            pause = min(2.0, pause * 2)
