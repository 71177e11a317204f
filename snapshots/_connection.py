"""Opening a store's connections: their pragmas, the writer's thread priority, the schema check."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final, Literal

import aiosqlite

from snapshots import _schema
from snapshots.errors import StoreDamagedError, StoreError

Synchronous = Literal["OFF", "NORMAL", "FULL"]

# How much of the store the read connection maps (address space, not memory; see _configure).
READ_MMAP_BYTES: Final = 256 * 1024 * 1024


async def configure(
    db: aiosqlite.Connection,
    path: Path,
    synchronous: Synchronous,
    cache_mib: int,
    busy_timeout_ms: int,
    *,
    reader: bool = False,
) -> None:
    await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    await db.execute(f"PRAGMA cache_size = {-int(cache_mib) * 1024}")  # negative: KiB
    await db.execute("PRAGMA temp_store = MEMORY")
    if reader:
        await db.execute("PRAGMA query_only = ON")
        # Actor loads read pages at random all over a large store: mapped, they are read from the
        # OS page cache without a system call each (restart catch-up with 1M actors stored, 3 runs
        # of scripts/bench: 0.66x -> 0.73x the baseline). The writer reads through its own cache,
        # so the pages a snapshot touches do not add to the process's resident memory.
        await db.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")
        return
    ((mode,),) = await db.execute_fetchall("PRAGMA journal_mode = WAL")
    if mode != "wal":
        raise StoreError(
            f"snapshot store {path}: SQLite WAL mode is not available here (journal_mode={mode})"
        )
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    await _lower_writer_priority(db)
    # After a checkpoint, shrink a log that a large snapshot grew.
    await db.execute("PRAGMA journal_size_limit = 67108864")


# The writer's thread runs at this niceness: snapshot writes are background work, and with
# the event loop and nats-server on the same cores they should give way to both. Measured
# with scripts/bench (snapshot scenario, 2 x 3 runs each way): the longest event-loop stall
# while 100k actors were written went from 4.9-8.4 ms to 4.1-5.0 ms, the exception p99
# meanwhile from medians of 9.8 / 10.8 ms to 9.0 / 9.8 ms.
WRITER_NICENESS: Final = 10


async def _lower_writer_priority(db: aiosqlite.Connection) -> None:
    """Lower the priority of the writer connection's own thread (Linux only: elsewhere
    setpriority would apply to the whole process)."""
    if sys.platform != "linux":
        return

    def lower() -> int:
        try:  # PRIO_PROCESS with who=0: on Linux, the calling thread alone
            os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), WRITER_NICENESS))
        except OSError:
            return 0
        return 1

    # A function SQLite calls is run in the connection's thread, where the statement runs.
    await db.create_function("ops_router_lower_priority", 0, lower)
    await db.execute("SELECT ops_router_lower_priority()")


async def verify_schema(db: aiosqlite.Connection, path: Path) -> None:
    found = {
        str(name): str(kind)
        for name, kind in await db.execute_fetchall(
            "SELECT name, type FROM sqlite_master WHERE name IN ("
            + ",".join("?" * len(_schema.REQUIRED))
            + ")",
            tuple(_schema.REQUIRED),
        )
    }
    missing = [name for name, kind in _schema.REQUIRED.items() if found.get(name) != kind]
    if missing:
        raise StoreDamagedError(path, f"missing schema: no {', '.join(missing)}")
    rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE name = 'schema_version'"))
    if not rows:
        raise StoreDamagedError(path, "missing schema: no schema_version row in meta")
    version = rows[0][0]
    if version != str(_schema.SCHEMA_VERSION):
        raise StoreDamagedError(
            path, f"schema version {version!s:.20}, this build reads version {_schema.SCHEMA_VERSION}"
        )
