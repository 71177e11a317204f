"""The store's schema, its atomic creation, the cheap start-up checks, and quarantine of a bad file.

Everything here is synchronous file work, run in a worker thread by `snapshots.store`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from snapshots.errors import StoreDamagedError, StoreError

SCHEMA_VERSION: Final = 2
# Stored in the SQLite header (offset 68), so a foreign SQLite file is told apart without a query.
APPLICATION_ID: Final = 0x4F707352  # "OpsR"
PAGE_SIZE: Final = 4096

# Tables and indexes that must exist, by name and type.
REQUIRED: Final = {
    "meta": "table",
    "partitions": "table",
    "actors": "table",
    "timers": "table",
    "timers_due": "index",
    "open_exceptions": "table",
    "open_exceptions_counts": "index",
}

# open_exceptions is the open set (CONTRACT 5.1) of the stored actor states: one row per raise in
# force, its payload as published, written in the same transaction as its actor's row (see
# snapshots.open_index). `location` is '' for rules that are not location-scoped (a location is
# never empty), so the primary key is the reply's sort order with null first. Its index holds
# every column but the payload (a WITHOUT ROWID table's index carries the primary key), in the
# order of the page's board, so a count or a grouping reads the small index, not the payloads.
# timers is WITHOUT ROWID: its rows are small and the primary key is its only lookup, and
# because it has no rowid its secondary index carries the primary key columns, so
# (partition, deadline_us, kind, key, name) answers `due_timers` from the index alone, in
# deadline order. actors keeps a rowid: its blobs vary in size, and measured with 100k-row
# writes a WITHOUT ROWID actors table was no faster at 200-byte states, slower at 500, and at
# 1000 bytes (past a 4 KiB page's inline limit for index b-trees) 3-5x slower and 3x larger.
DDL: Final = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE partitions (
    partition   INTEGER PRIMARY KEY,
    applied_seq INTEGER NOT NULL,
    effects_seq INTEGER NOT NULL
);

CREATE TABLE actors (
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    partition INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    state     BLOB NOT NULL,
    PRIMARY KEY (kind, key)
);

CREATE TABLE timers (
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    name        TEXT NOT NULL,
    deadline_us INTEGER NOT NULL,
    partition   INTEGER NOT NULL,
    PRIMARY KEY (kind, key, name)
) WITHOUT ROWID;

CREATE INDEX timers_due ON timers (partition, deadline_us);

CREATE TABLE open_exceptions (
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    rule      TEXT NOT NULL,
    location  TEXT NOT NULL,
    partition INTEGER NOT NULL,
    severity  TEXT NOT NULL,
    payload   TEXT NOT NULL,
    PRIMARY KEY (kind, key, rule, location)
) WITHOUT ROWID;

CREATE INDEX open_exceptions_counts ON open_exceptions (severity, kind, rule, location, partition);
"""

_MAGIC: Final = b"SQLite format 3\x00"
_HEADER_SIZE: Final = 100


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def shm_path(path: Path) -> Path:
    return path.with_name(path.name + "-shm")


def prepare_file(path: Path) -> bool:
    """Create the store when `path` is missing (True), else check its header (False).

    Raises StoreDamagedError for a file that cannot be this store, StoreError when the
    path cannot be used at all (a folder, no permission).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        create_file(path)
        return True
    except OSError as e:
        raise StoreError(f"cannot open snapshot store {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"snapshot store {path} is not a regular file")
    check_header(path, st.st_size)
    return False


def check_header(path: Path, size: int) -> None:
    """Read the 100-byte SQLite header: magic, page size, recorded length, application id."""
    if size == 0:
        raise StoreDamagedError(path, "empty file (0 bytes), not a SQLite database")
    try:
        with path.open("rb") as f:
            header = f.read(_HEADER_SIZE)
    except OSError as e:
        raise StoreError(f"cannot read snapshot store {path}: {e.strerror}") from e
    # A file shorter than the magic that matches it so far is a truncated store, not a stranger.
    if not header.startswith(_MAGIC) and not (len(header) < len(_MAGIC) and _MAGIC.startswith(header)):
        raise StoreDamagedError(path, f"not a SQLite database (starts with {header[:16]!r})")
    if len(header) < _HEADER_SIZE:
        raise StoreDamagedError(path, f"truncated to {size} bytes, shorter than the SQLite header")
    page_size = int.from_bytes(header[16:18], "big")
    if page_size == 1:
        page_size = 65536
    if page_size < 512 or page_size & (page_size - 1):
        raise StoreDamagedError(path, f"corrupt SQLite header (page size {page_size})")
    app_id = int.from_bytes(header[68:72], "big")
    if app_id != APPLICATION_ID:
        raise StoreDamagedError(
            path, f"a SQLite database but not a snapshot store (application_id {app_id:#010x})"
        )
    # The recorded page count is valid when the change counter matches "version-valid-for".
    # A write-ahead log that still holds frames may carry pages a checkpoint had not finished
    # copying, so the length check applies only to a file without one; SQLite itself reads
    # the log when the store is opened.
    pages = int.from_bytes(header[28:32], "big")
    counter_ok = header[24:28] == header[92:96]
    if counter_ok and pages and not _has_frames(path):
        expected = pages * page_size
        if size < expected:
            raise StoreDamagedError(
                path,
                f"truncated to {size} bytes; its header records {pages} pages of {page_size} bytes"
                f" ({expected} bytes)",
            )


def _has_frames(path: Path) -> bool:
    try:
        return wal_path(path).stat().st_size > 32  # a WAL header alone is 32 bytes
    except OSError:
        return False


def create_file(path: Path) -> None:
    """Build an empty store beside `path` and rename it into place, so a crash never leaves half a store."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".creating")
        for p in (tmp, wal_path(tmp), shm_path(tmp)):
            p.unlink(missing_ok=True)
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            con.executescript(
                "BEGIN;"
                + DDL
                + f"INSERT INTO meta (name, value) VALUES ('schema_version', '{SCHEMA_VERSION}');"
                + f"INSERT INTO meta (name, value) VALUES ('created_at', '{now}');"
                + "COMMIT;"
            )
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"snapshot store {path}: this file system does not support SQLite WAL mode")
        finally:
            con.close()
        if wal_path(tmp).exists():
            raise StoreError(f"snapshot store {path}: SQLite left a write-ahead log behind while creating it")
        _fsync(tmp)
        # A log without its database belongs to nothing, and must not be replayed into the new file.
        for p in (wal_path(path), shm_path(path)):
            p.unlink(missing_ok=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise StoreError(f"cannot create snapshot store {path}: {e}") from e
    except sqlite3.Error as e:
        raise StoreError(f"cannot create snapshot store {path}: {e}") from e


def quarantine_file(path: Path, label: str = "damaged") -> Path:
    """Move `path` and its -wal/-shm aside to `<name>.<label>-<UTC timestamp>[-n]`; return the new path."""
    if not path.exists():
        raise StoreError(f"cannot quarantine snapshot store {path}: no such file")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 0
    while any(p.exists() for p in (target, wal_path(target), shm_path(target))):
        n += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
    try:
        # The log first: a log left beside a fresh store would be replayed into it.
        for side, dest in ((wal_path(path), wal_path(target)), (shm_path(path), shm_path(target))):
            if side.exists():
                os.replace(side, dest)
        os.replace(path, target)
        _fsync_dir(path.parent)
    except OSError as e:
        raise StoreError(f"cannot quarantine snapshot store {path}: {e}") from e
    return target


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        _fsync(folder)
