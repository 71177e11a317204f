"""The snapshot store: actor states, per-partition sequences and durable timers in SQLite.

`Store` is the only entry point (see `snapshots.store` for its use); the rest are the
values it takes and returns, and its errors: `StoreError`, `StoreDamagedError` for a
file that is not a usable store, `StoreFullError` for a write that found no room.
"""

from snapshots.errors import StoreDamagedError, StoreError, StoreFullError
from snapshots.open_index import OpenRow, OpenRows
from snapshots.store import (
    NO_TIMERS,
    ActorRecord,
    DueTimer,
    PartitionMarks,
    Store,
    StoreStats,
    Synchronous,
)

__all__ = [
    "NO_TIMERS",
    "ActorRecord",
    "DueTimer",
    "OpenRow",
    "OpenRows",
    "PartitionMarks",
    "Store",
    "StoreDamagedError",
    "StoreError",
    "StoreFullError",
    "StoreStats",
    "Synchronous",
]
