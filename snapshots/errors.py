"""Errors of the snapshot store: one base class, and the damaged-file case the router acts on."""

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
