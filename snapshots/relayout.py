"""A copy of the snapshot store laid out for another partition count (`router repartition`).

Synchronous file work (run it in a worker thread): the store is copied with `VACUUM INTO`
(snapshots.backup), then, in the copy only, every actor, timer and open exception is moved to
the partition its key hashes to among N, and the partitions' marks become N rows. The
original store is not touched, so a failure leaves it as it was.

Marks: an event at or below a partition's applied mark is in the states, so every new
partition starts from the lowest applied mark of the old ones (an actor already past an event
skips it, as after any restart), the lowest effects mark, and the highest delivered mark (the
effects of events between the two are looked up before they are published again).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from snapshots.backup import Copied, backup, verify

LAYOUT_BLOB = "layout"  # meta: the partition count the store is laid out for


def relayout(source: Path, dest: Path, partitions: int, partition_of: Callable[[str, int], int]) -> Copied:
    """Copy `source` to `dest` (must not exist) laid out for `partitions` partitions."""
    backup(source, dest)
    con = sqlite3.connect(dest, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        keys = con.execute("SELECT DISTINCT key FROM actors").fetchall()
        con.execute("CREATE TEMP TABLE moved (key TEXT PRIMARY KEY, partition INTEGER NOT NULL) WITHOUT ROWID")
        con.executemany("INSERT INTO moved VALUES (?, ?)", ((k, partition_of(k, partitions)) for (k,) in keys))
        for table in ("actors", "timers", "open_exceptions"):
            if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
                con.execute(
                    f"UPDATE {table} SET partition = (SELECT m.partition FROM moved AS m WHERE m.key = {table}.key)"
                )
        marks = con.execute("SELECT applied_seq, effects_seq FROM partitions").fetchall()
        applied = min((a for a, _e in marks), default=0)
        effects = min((e for _a, e in marks), default=0)
        delivered = 0
        for _name, value in con.execute("SELECT name, value FROM meta WHERE name LIKE 'delivered_through.%'"):
            text = value.decode() if isinstance(value, bytes) else str(value)
            delivered = max(delivered, int(text) if text.isdigit() else 0)
        con.execute("DELETE FROM partitions")
        con.executemany(
            "INSERT INTO partitions (partition, applied_seq, effects_seq) VALUES (?, ?, ?)",
            ((p, applied, effects) for p in range(partitions)),
        )
        # Caches and marks of the old layout go; the delivered mark is carried to every partition.
        con.execute("DELETE FROM meta WHERE name LIKE 'key_filter:%' OR name LIKE 'delivered_through.%'")
        if delivered > effects:
            con.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?)",
                ((f"delivered_through.{p}", str(delivered).encode()) for p in range(partitions)),
            )
        con.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (LAYOUT_BLOB, str(partitions).encode()))
        con.execute("COMMIT")
    finally:
        con.close()
    return verify(dest)
