"""Errors of the snapshot store: one base class, and the two cases the router acts on (a damaged file, a full disk)."""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """The snapshot store cannot do what was asked (I/O error, disk full, closed, locked)."""


class StoreDamagedError(StoreError):
    """The file at `path` is not a usable snapshot store; `reason` says why, in one line.

    Raised for a file that is not SQLite, is truncated or corrupt, or does not hold this
    store's schema. The router decides what to do, typically `Store.quarantine(path)` and
    a rebuild from the stream.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"snapshot store {path} is damaged: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[StoreDamagedError], tuple[Path, str]]:
        return (type(self), (self.path, self.reason))


class StoreFullError(StoreError):
    """A write found no room: the disk (or the store's page limit) is full (SQLITE_FULL).

    Nothing of the write was committed; the store stays usable, and the same write can be
    tried again once there is space.
    """
