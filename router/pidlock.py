"""A file flock-ed by one live process, with that process's pid inside.

The kernel drops the lock when its holder exits, even by SIGKILL, so a held lock means a live
process and a free one means whatever it guarded was left behind. Used for the embedded
server's owner file and for the data folder of a router instance.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; a second holder there is not detected
    fcntl = None  # type: ignore[assignment]


class PidLockBusy(Exception):
    """Another live process holds the lock; `holder` is the pid it wrote ("?" when unreadable)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by pid {holder}")
        self.holder = holder


class PidLock:
    """Take `path`'s flock at once (PidLockBusy when held) and write our pid into it."""

    def __init__(self, path: Path, *, unlink_on_release: bool = False) -> None:
        self.path = path
        self._unlink = unlink_on_release
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            try:
                holder = path.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise PidLockBusy(path, holder) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is None:
            return
        if self._unlink:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)  # releases the lock
        self._fd = None
