"""Online copies of the snapshot store (`router backup`) and putting one back (`router restore`).

A backup is SQLite's `VACUUM INTO` on a connection of its own, opened read-only: one read
transaction, so the copy is the store as of one committed snapshot (actors, timers and the
partitions' marks together), while the router goes on writing (in WAL mode a reader blocks
no writer; the log only grows until the copy ends, as checkpoints cannot pass the reader).
The copy is written beside its destination, checked, synced and renamed into place, so a
crash leaves either no backup or a whole one.

Everything here is synchronous file work: run it in a worker thread or another process.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import msgspec

from snapshots import _schema
from snapshots.errors import StoreDamagedError, StoreError


class Copied(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    bytes: int
    seconds: float
    actors: int
    timers: int
    marks: dict[int, tuple[int, int]]  # partition -> (applied_seq, effects_seq)


def backup(source: Path, dest: Path, *, busy_timeout_ms: int = 10_000) -> Copied:
    """Copy the store at `source` to `dest` (which must not exist), consistently, while it is in use."""
    if not source.is_file():
        raise StoreError(f"no snapshot store at {source}")
    _schema.check_header(source, source.stat().st_size)
    if dest.exists():
        raise StoreError(f"{dest} already exists: give a new path (a backup never overwrites)")
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        con = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            con.execute("VACUUM INTO ?", (str(partial),))
        finally:
            con.close()
        copied = verify(partial)
        _schema._fsync(partial)
        os.replace(partial, dest)
        _schema._fsync_dir(dest.parent)
    except sqlite3.Error as e:
        partial.unlink(missing_ok=True)
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
            raise StoreDamagedError(source, f"SQLite says: {e} (during backup)") from e
        raise StoreError(f"backup of {source} to {dest} failed: {e}") from e
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return msgspec.structs.replace(copied, path=str(dest), seconds=round(time.monotonic() - started, 3))


def restore(backup_path: Path, target: Path) -> tuple[Copied, Path | None]:
    """Put the backup at `backup_path` in place of the store at `target`; the router must be stopped.

    The backup is checked first, and the store must not be open anywhere (see `in_use`). The store it replaces is kept, with its -wal and -shm, as
    `<name>.replaced-<UTC timestamp>` (returned; None when there was none): a log left beside
    the restored file would be replayed into it.
    """
    copied = verify(backup_path)
    if target.exists() and in_use(target):
        raise StoreError(f"{target} is open in another process (a running router?): stop it first")
    incoming = target.with_name(f".{target.name}.restoring")
    incoming.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(backup_path, incoming)
        _schema._fsync(incoming)
        replaced = None
        if target.exists():
            replaced = _schema.quarantine_file(target, label="replaced")
        else:
            for side in (_schema.wal_path(target), _schema.shm_path(target)):
                side.unlink(missing_ok=True)
        os.replace(incoming, target)
        _schema._fsync_dir(target.parent)
    except OSError as e:
        incoming.unlink(missing_ok=True)
        raise StoreError(f"cannot restore {backup_path} to {target}: {e}") from e
    return msgspec.structs.replace(copied, path=str(target)), replaced


def in_use(path: Path) -> bool:
    """Whether another connection, in this process or any other, has the store at `path` open.

    In WAL mode every open connection holds a shared lock on the database file until it
    closes; an exclusive lock is then refused at once (no wait). Taken and let go here.
    """
    con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=0)
    try:
        con.execute("PRAGMA locking_mode = EXCLUSIVE")
        con.execute("BEGIN EXCLUSIVE")
        con.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            return True
        raise StoreError(f"cannot check whether {path} is in use: {e}") from e
    finally:
        con.close()
    return False


def verify(path: Path) -> Copied:
    """Check a copy as a whole (every page, the schema) and read what it holds; raise when it is not sound."""
    if not path.is_file():
        raise StoreError(f"no backup at {path}")
    _schema.check_header(path, path.stat().st_size)
    con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        problems = [str(r[0]) for r in con.execute("PRAGMA integrity_check") if r[0] != "ok"]
        if problems:
            raise StoreDamagedError(path, "; ".join(problems[:5]))
        tables = {str(r[0]) for r in con.execute("SELECT name FROM sqlite_master")}
        missing = [name for name in _schema.REQUIRED if name not in tables]
        if missing:
            raise StoreDamagedError(path, f"missing schema: no {', '.join(missing)}")
        ((actors,),) = con.execute("SELECT count(*) FROM actors")
        ((timers,),) = con.execute("SELECT count(*) FROM timers")
        marks = {
            int(p): (int(a), int(e))
            for p, a, e in con.execute("SELECT partition, applied_seq, effects_seq FROM partitions ORDER BY 1")
        }
    except sqlite3.DatabaseError as e:
        raise StoreDamagedError(path, f"SQLite says: {e}") from e
    finally:
        con.close()
    return Copied(path=str(path), bytes=path.stat().st_size, seconds=0.0, actors=actors, timers=timers, marks=marks)
