"""The snapshot store: actor state blobs, per-partition sequences and durable timers in SQLite (WAL).

Use::

    async with await Store.open(path, synchronous="NORMAL") as store:
        if store.created: ...                      # no history: start from the stream's beginning
        marks = await store.marks(partition)       # resume the consumer at marks.applied_seq + 1
        await store.write_snapshot(partition, records, applied_seq=..., effects_seq=...)

`Store.open` returns an open store (``store = await Store.open(path)`` ... ``await
store.close()`` works the same way). A missing file is created with its folder and
``store.created`` is True. A file that is not SQLite, is truncated, or lacks this schema
raises `StoreDamagedError`; `Store.quarantine(path)` moves it aside so the router can
rebuild from the stream. Opening reads only the file header and the schema rows; a full
scan is `integrity_check()`, an explicit command.

Writes run one at a time under a lock, each one transaction executed as a unit, so tasks
of one task group may share a store. Reads use a second connection: WAL lets them see the
last committed state while a write is in progress, so a load never waits behind a large
snapshot. The price: an actor handed to a write that has not returned yet still reads as
its previous version, so keep such actors in memory until the write returns. Once a write
returns, every later read sees it.

Blobs are opaque bytes; the caller encodes them. Writing an actor replaces its timer rows
with the timers given in its record.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, NamedTuple, Self

import aiosqlite
import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec

from snapshots import _schema
from snapshots._connection import READ_MMAP_BYTES, WRITER_NICENESS, Synchronous, configure, verify_schema
from snapshots.errors import StoreDamagedError, StoreError, StoreFullError
from snapshots.open_index import OpenRows, put_open

__all__ = [
    "NO_TIMERS",
    "READ_MMAP_BYTES",
    "WRITER_NICENESS",
    "ActorRecord",
    "DueTimer",
    "PartitionMarks",
    "Store",
    "StoreStats",
    "Synchronous",
]

_SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL")

NO_TIMERS: Final[Mapping[str, int]] = MappingProxyType({})


class ActorRecord(msgspec.Struct, frozen=True, gc=False):
    """One actor to write: its encoded state, the seq of the last event applied, its timers by name.

    Not tracked by the cyclic garbage collector (`gc=False`, it holds no cycles): a snapshot
    builds one per dirty actor, and a hundred thousand tracked records would make the next
    full collection stall the event loop.
    """

    kind: str
    key: str
    last_seq: int
    state: bytes
    # Name -> deadline in epoch microseconds; they replace the actor's stored timers. None: the
    # actor's kind keeps no timers, so it has no timer rows to replace (a snapshot skips them).
    timers: Mapping[str, int] | None = NO_TIMERS
    # Changes to the key's open exceptions, written with the state (snapshots.open_index); None: none.
    open: OpenRows | None = None


class PartitionMarks(NamedTuple):
    """How far a partition is stored: events <= applied_seq are in the actor states,
    effects of events <= effects_seq are confirmed published."""

    applied_seq: int
    effects_seq: int


class DueTimer(NamedTuple):
    deadline_us: int
    kind: str
    key: str
    name: str


class StoreStats(msgspec.Struct, frozen=True, kw_only=True):
    actors: int
    timers: int
    partitions: dict[int, PartitionMarks]
    file_bytes: int
    wal_bytes: int


# SQLite error codes (primary) that mean the file itself is bad.
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26

# Actors in one statement (see _put_actors); an upsert updates the row in place (same rowid),
# where REPLACE would delete it and insert a new one. ?1 is a JSON array of
# [kind, key, last_seq, offset, length], ?2 the states laid end to end, ?3 the partition.
_PUT_ACTORS: Final = (
    "INSERT INTO actors (kind, key, partition, last_seq, state)"
    " SELECT j.value->>0, j.value->>1, ?3, j.value->>2, substr(?2, j.value->>3, j.value->>4)"
    " FROM json_each(?1) AS j WHERE true ORDER BY 1, 2"
    " ON CONFLICT (kind, key) DO UPDATE SET partition = excluded.partition,"
    " last_seq = excluded.last_seq, state = excluded.state"
)
# ?1: a JSON array of [kind, key].
_DELETE_TIMERS_OF: Final = (
    "DELETE FROM timers WHERE (kind, key) IN (SELECT j.value->>0, j.value->>1 FROM json_each(?1) AS j)"
)
# ?1: a JSON array of [kind, key, name, deadline_us]; ?2 the partition.
_PUT_TIMERS: Final = (
    "INSERT OR REPLACE INTO timers (kind, key, name, deadline_us, partition)"
    " SELECT j.value->>0, j.value->>1, j.value->>2, j.value->>3, ?2 FROM json_each(?1) AS j"
)
# Actors per statement of a large write (see _put_actors), and per slice of its building on
# the event loop (well under a millisecond each).
_STATEMENT_ROWS: Final = 20_000
_BUILD_SLICE: Final = 500
_JSON: Final = msgspec.json.Encoder()
# effects_seq never goes back: a snapshot built before a later write_effects_mark must not undo it.
_PUT_MARKS: Final = (
    "INSERT INTO partitions (partition, applied_seq, effects_seq) VALUES (?, ?, ?)"
    " ON CONFLICT (partition) DO UPDATE SET applied_seq = excluded.applied_seq,"
    " effects_seq = max(effects_seq, excluded.effects_seq)"
)
_PUT_EFFECTS: Final = (
    "INSERT INTO partitions (partition, applied_seq, effects_seq) VALUES (?, 0, ?)"
    " ON CONFLICT (partition) DO UPDATE SET effects_seq = max(effects_seq, excluded.effects_seq)"
)
# The stored ones among a JSON array of keys of one kind (?2), as one row: a JSON index of
# [key, last_seq, length] and the states laid end to end in the same order (the aggregates of
# one query step through the same rows). One row, not one per actor: a worker thread fetching
# rows takes the GIL for each, and while the event loop keeps it busy each waits for a switch.
_LOAD_ACTORS: Final = (
    "SELECT json_group_array(json_array(key, last_seq, length(state))), CAST(group_concat(state, '') AS BLOB)"
    " FROM actors WHERE kind = ?1 AND key IN (SELECT value FROM json_each(?2))"
)
_LOAD_ROWS: Final = 20_000
_JSON_DECODE: Final = msgspec.json.Decoder(list[tuple[str, int, int]]).decode

# Answered from the covering index timers_due (partition, deadline_us, kind, key, name):
# the cost depends on the rows returned, not on how many timers lie further ahead.
DUE_TIMERS_SQL: Final = (
    "SELECT deadline_us, kind, key, name FROM timers"
    " WHERE partition = ? AND deadline_us <= ?"
    " ORDER BY deadline_us, kind, key, name LIMIT ?"
)


class Store:
    """An open snapshot store. Create with `await Store.open(path)`; see the module docstring."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        path: Path,
        *,
        created: bool,
        synchronous: Synchronous,
    ) -> None:
        self._db: aiosqlite.Connection | None = db
        self._reader: aiosqlite.Connection | None = reader
        self._lock = anyio.Lock()
        self.path = path
        self.created = created
        self.synchronous = synchronous

    # -- opening and closing --------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        cache_mib: int = 64,
        busy_timeout_ms: int = 5000,
    ) -> Store:
        """Open the store at `path`, creating it (and its folder) when missing.

        `synchronous`: "NORMAL" (default) survives any crash of the process; a power loss
        may drop the last transactions. "FULL" syncs the log on every commit. "OFF" leaves
        syncing to the OS. Raises StoreDamagedError for a file that is not a usable store.
        """
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {synchronous!r}")
        p = await anyio.to_thread.run_sync(Path.absolute, Path(path))
        created = await anyio.to_thread.run_sync(_schema.prepare_file, p)
        # mode=rw: never let SQLite create an empty file in place of one that vanished.
        uri = p.as_uri() + "?mode=rw"
        opened: list[aiosqlite.Connection] = []
        try:
            db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            opened.append(db)
            await configure(db, p, synchronous, cache_mib, busy_timeout_ms)
            await verify_schema(db, p)
            reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            opened.append(reader)
            await configure(reader, p, synchronous, cache_mib, busy_timeout_ms, reader=True)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                for conn in opened:
                    await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise _translate(p, exc, "open") from exc
            raise
        return cls(db, reader, p, created=created, synchronous=synchronous)

    async def close(self) -> None:
        """Wait for a write in progress, then close. Closing twice is fine."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                db, self._db = self._db, None
                reader, self._reader = self._reader, None
                for conn in (reader, db):
                    if conn is not None:
                        await conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @staticmethod
    async def quarantine(path: str | os.PathLike[str], label: str = "damaged") -> Path:
        """Move a damaged store (and its -wal/-shm) to `<name>.damaged-<UTC timestamp>`; return that path.

        The store must not be open. The next `Store.open(path)` creates a fresh one.
        """
        return await anyio.to_thread.run_sync(_schema.quarantine_file, Path(path), label)

    # -- blobs and partition marks ----------------------------------------------------

    async def save_blob(self, name: str, value: bytes) -> None:
        """Keep `value` under `name` in the meta table (for caches that may be rebuilt)."""
        async with self._transaction("save_blob") as db:
            await db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    async def read_blob(self, name: str) -> bytes | None:
        """The value saved under `name`, left in place; None when there is none."""
        async with self._reading("read_blob") as db:
            rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE name = ?", (name,)))
        value = rows[0][0] if rows else None
        return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None

    async def take_blob(self, name: str) -> bytes | None:
        """Read and delete the value saved under `name`, in one transaction: it is used once."""
        async with self._transaction("take_blob") as db:
            rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE name = ?", (name,)))
            if rows:
                await db.execute("DELETE FROM meta WHERE name = ?", (name,))
        value = rows[0][0] if rows else None
        return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None

    async def marks(self, partition: int) -> PartitionMarks:
        """The partition's stored sequences; (0, 0) for a partition never written."""
        async with self._reading("marks") as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT applied_seq, effects_seq FROM partitions WHERE partition = ?", (partition,)
                )
            )
        return PartitionMarks(*rows[0]) if rows else PartitionMarks(0, 0)

    async def all_marks(self) -> dict[int, PartitionMarks]:
        async with self._reading("all_marks") as db:
            rows = await db.execute_fetchall(
                "SELECT partition, applied_seq, effects_seq FROM partitions ORDER BY partition"
            )
        return {p: PartitionMarks(a, e) for p, a, e in rows}

    async def write_effects_mark(self, partition: int, effects_seq: int) -> None:
        """Record that effects of every event <= effects_seq are confirmed. Never moves back."""
        async with self._using("write_effects_mark") as db:
            # One statement outside a transaction is its own transaction.
            await db.execute(_PUT_EFFECTS, (partition, effects_seq))

    # -- actors -----------------------------------------------------------------------

    async def write_snapshot(
        self,
        partition: int,
        actors: Iterable[ActorRecord],
        *,
        applied_seq: int,
        effects_seq: int | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        """Write `actors` (each replacing its timer rows) and the partition's marks in one transaction.

        `effects_seq=None` keeps the stored one; a lower value than stored is ignored.
        The rows are read in the store's thread while the event loop runs on: do not
        change `actors` or their `timers` mappings until this returns. `fence()` is called
        just before the commit; whatever it raises rolls the transaction back.
        """
        rows = actors if isinstance(actors, Sequence) else list(actors)
        async with self._transaction("write_snapshot") as db:
            if rows:
                await _put_actors(db, partition, rows)
            await db.execute(_PUT_MARKS, (partition, applied_seq, effects_seq or 0))
            if fence is not None:
                fence()

    async def write_actors(
        self, partition: int, actors: Iterable[ActorRecord], fence: Callable[[], None] | None = None
    ) -> None:
        """Write actors, each replacing its timers, in one transaction (after timer firings are
        confirmed); marks unchanged. `fence` as in `write_snapshot`."""
        rows = actors if isinstance(actors, Sequence) else list(actors)
        if not rows:
            return
        async with self._transaction("write_actors") as db:
            await _put_actors(db, partition, rows)
            if fence is not None:
                fence()

    async def load_actors(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, bytes]]:
        """{(kind, key): (last_seq, state)} for the stored ones among `keys`; missing keys are absent."""
        by_kind: dict[str, list[str]] = {}
        for kind, key in keys:
            by_kind.setdefault(kind, []).append(key)
        found: dict[tuple[str, str], tuple[int, bytes]] = {}
        async with self._reading("load_actors") as db:
            for kind, names in by_kind.items():
                for i in range(0, len(names), _LOAD_ROWS):
                    ((index, states),) = await db.execute_fetchall(
                        _LOAD_ACTORS, (kind, _JSON.encode(names[i : i + _LOAD_ROWS]).decode())
                    )
                    offset = 0
                    for key, last_seq, n in _JSON_DECODE(index or "[]"):
                        found[(kind, key)] = (last_seq, states[offset : offset + n])
                        offset += n
        return found

    async def count_actors(self) -> int:
        """Scans the table (without holding up writes): for tooling, not for the event path."""
        async with self._reading("count_actors") as db:
            rows = list(await db.execute_fetchall("SELECT count(*) FROM actors"))
        return int(rows[0][0])

    async def actor_keys(
        self, partition: int, after: tuple[str, str] = ("", ""), limit: int = 50_000
    ) -> list[tuple[str, str]]:
        """One page of the partition's stored (kind, key)s in key order, after `after` (for filters)."""
        async with self._reading("actor_keys") as db:
            rows = await db.execute_fetchall(
                "SELECT kind, key FROM actors WHERE partition = ? AND (kind, key) > (?, ?)"
                " ORDER BY kind, key LIMIT ?",
                (partition, after[0], after[1], limit),
            )
        return [(str(k), str(v)) for k, v in rows]

    async def partition_actors(
        self, partition: int, after: tuple[str, str] = ("", ""), limit: int = 5_000, newer_than: int = 0
    ) -> list[ActorRecord]:
        """One page of the partition's stored actors (with their timers) in key order, after
        `after`, only those whose last_seq is above `newer_than` (to copy a store elsewhere)."""
        async with self._reading("partition_actors") as db:
            rows = list(await db.execute_fetchall(
                "SELECT kind, key, last_seq, state FROM actors WHERE partition = ? AND (kind, key) > (?, ?)"
                " AND last_seq > ? ORDER BY kind, key LIMIT ?",
                (partition, after[0], after[1], newer_than, limit),
            ))
            timers: dict[tuple[str, str], dict[str, int]] = {}
            if rows:
                last = rows[-1]
                for kind, key, name, deadline in await db.execute_fetchall(
                    "SELECT kind, key, name, deadline_us FROM timers WHERE partition = ?"
                    " AND (kind, key) > (?, ?) AND (kind, key) <= (?, ?)",
                    (partition, after[0], after[1], last[0], last[1]),
                ):
                    timers.setdefault((str(kind), str(key)), {})[str(name)] = int(deadline)
        return [
            ActorRecord(str(k), str(v), int(s), bytes(st), timers.get((str(k), str(v)), {}))
            for k, v, s, st in rows
        ]

    # -- timers -----------------------------------------------------------------------

    async def due_timers(self, partition: int, until_us: int, limit: int = 1000) -> list[DueTimer]:
        """Timers of `partition` with deadline <= until_us, earliest first (ties by kind, key, name)."""
        async with self._reading("due_timers") as db:
            rows = await db.execute_fetchall(DUE_TIMERS_SQL, (partition, until_us, limit))
        return [DueTimer(*row) for row in rows]

    # -- tooling ----------------------------------------------------------------------

    async def stats(self) -> StoreStats:
        """Counts (full scans: for tooling) and file sizes."""
        async with self._reading("stats") as db:
            (actors,) = next(iter(await db.execute_fetchall("SELECT count(*) FROM actors")))
            (timers,) = next(iter(await db.execute_fetchall("SELECT count(*) FROM timers")))
        return StoreStats(
            actors=actors,
            timers=timers,
            partitions=await self.all_marks(),
            file_bytes=_size(self.path),
            wal_bytes=_size(_schema.wal_path(self.path)),
        )

    async def integrity_check(self) -> list[str]:
        """A full check of the file and of the store's own invariants; [] when sound.

        Reads the whole file (on the read connection, so writes go on meanwhile): a command
        for tooling, not for the event path. Never raises for damage it finds: it lists it.
        """
        problems: list[str] = []
        async with self._reading("integrity_check") as db:
            try:
                rows = await db.execute_fetchall("PRAGMA integrity_check")
                # At most 100 findings; SQLite may pack several lines into one row.
                problems += [line for r in rows if r[0] != "ok" for line in str(r[0]).splitlines()]
                ((orphans,),) = await db.execute_fetchall(
                    "SELECT count(*) FROM timers AS t WHERE NOT EXISTS"
                    " (SELECT 1 FROM actors AS a WHERE a.kind = t.kind AND a.key = t.key)"
                )
                ((moved,),) = await db.execute_fetchall(
                    "SELECT count(*) FROM timers AS t JOIN actors AS a ON a.kind = t.kind AND a.key = t.key"
                    " WHERE a.partition != t.partition"
                )
                ((open_orphans,),) = await db.execute_fetchall(
                    "SELECT count(*) FROM open_exceptions AS o LEFT JOIN actors AS a ON a.kind = o.kind AND a.key = o.key"
                    " WHERE a.partition IS NOT o.partition"
                )
            except sqlite3.DatabaseError as e:
                return [*problems, f"SQLite: {e}"]
        if open_orphans:
            problems.append(f"{open_orphans} open exceptions have no actor row in their partition")
        if orphans:
            problems.append(f"{orphans} timers have no actor row")
        if moved:
            problems.append(f"{moved} timers name a partition other than their actor's")
        return problems

    def reader(self, op: str) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]:
        """The read connection for one read of `op` (snapshots.open_index): see `_reading`."""
        return self._reading(op)

    # -- internals --------------------------------------------------------------------

    @asynccontextmanager
    async def _reading(self, op: str) -> AsyncIterator[aiosqlite.Connection]:
        """The read connection: each statement sees the last committed state; no lock."""
        db = self._reader
        if db is None:
            raise StoreError(f"snapshot store {self.path} is closed ({op})")
        try:
            yield db
        except sqlite3.Error as e:
            raise _translate(self.path, e, op) from e

    @asynccontextmanager
    async def _using(self, op: str) -> AsyncIterator[aiosqlite.Connection]:
        """The write connection, alone: no other task's statement runs on it until the block ends."""
        async with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"snapshot store {self.path} is closed ({op})")
            try:
                yield db
            except sqlite3.Error as e:
                raise _translate(self.path, e, op) from e

    @asynccontextmanager
    async def _transaction(self, op: str) -> AsyncIterator[aiosqlite.Connection]:
        """`_using` inside BEGIN IMMEDIATE ... COMMIT; any error or cancellation rolls back."""
        async with self._using(op) as db:
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException:
                # A cancelled statement (BEGIN included) still runs to its end in the SQLite
                # thread; this rollback is queued behind it, so nothing half-written is ever
                # committed and no transaction is left open. After a cancelled COMMIT it finds
                # nothing to undo: the write is then complete, though the caller was cancelled.
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(sqlite3.Error, ValueError):  # the original error says more
                        await db.rollback()
                raise


async def _put_actors(db: aiosqlite.Connection, partition: int, rows: Sequence[ActorRecord]) -> None:
    # Up to _STATEMENT_ROWS actors per statement, passed as a JSON index and one blob, and
    # written in key order by SQLite. executemany would take the GIL for every row it binds:
    # while the event loop keeps its thread busy (catching up), each row then waits for a
    # forced GIL switch (30,000 rows: 3.5-4.4 s, against 0.13-0.16 s this way). In key order,
    # 30,000 upserts into a store of 1M actors cost about 30% less CPU than in arbitrary order.
    # The index is built on the event loop in slices, with a turn for other tasks after each.
    for start in range(0, len(rows), _STATEMENT_ROWS):
        chunk = rows[start : start + _STATEMENT_ROWS]
        index: list[bytes] = []
        blobs: list[bytes] = []
        timed: list[bytes] = []
        timers: list[bytes] = []
        offset = 1  # SQLite's substr counts from 1
        for i in range(0, len(chunk), _BUILD_SLICE):
            part = chunk[i : i + _BUILD_SLICE]
            entries = []
            for r in part:
                n = len(r.state)
                entries.append((r.kind, r.key, r.last_seq, offset, n))
                offset += n
                blobs.append(r.state)
            index.append(_JSON.encode(entries)[1:-1])
            keyed = [(r.kind, r.key) for r in part if r.timers is not None]
            if keyed:
                timed.append(_JSON.encode(keyed)[1:-1])
                wanted = [
                    (r.kind, r.key, name, deadline)
                    for r in part
                    if r.timers
                    for name, deadline in r.timers.items()
                ]
                if wanted:
                    timers.append(_JSON.encode(wanted)[1:-1])
            await anyio.lowlevel.checkpoint()
        await db.execute(_PUT_ACTORS, (_json_array(index), b"".join(blobs), partition))
        if timed:
            await db.execute(_DELETE_TIMERS_OF, (_json_array(timed),))
        if timers:
            await db.execute(_PUT_TIMERS, (_json_array(timers), partition))
        await put_open(db, partition, chunk)


def _json_array(items: list[bytes]) -> str:
    """The JSON array of the elements of several encoded arrays (each without its brackets), as
    text: newer SQLite reads a BLOB argument to a JSON function as its binary JSONB."""
    return (b"[" + b",".join(items) + b"]").decode()


def _translate(path: Path, e: sqlite3.Error, op: str) -> StoreError:
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreDamagedError(path, f"SQLite says: {e} (during {op})")
    name = getattr(e, "sqlite_errorname", type(e).__name__)
    if code == _SQLITE_FULL:
        return StoreFullError(f"snapshot store {path}: {op} failed: {e} ({name})")
    return StoreError(f"snapshot store {path}: {op} failed: {e} ({name})")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
