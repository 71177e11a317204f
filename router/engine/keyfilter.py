"""A Bloom filter of the actor keys the snapshot store may hold, to skip SQLite for new keys."""

from __future__ import annotations

from hashlib import blake2b as _blake2b
from typing import Final

# The format of a saved filter. Probes use blake2b, not `hash()` (salted per process), so a
# filter saved by one process answers correctly in the next.
_VERSION: Final = b"kf1"


class KeyFilter:
    """`key in filter` is False only for keys certainly not stored; True may be wrong (rarely).

    Keys are added when an actor is written, so a key never written answers False and its
    first event needs no SQLite lookup. Until `ready` (the stored keys of an existing store
    are still being read in), every lookup must go to SQLite.
    """

    def __init__(self, capacity: int = 2_000_000, bits_per_key: int = 10) -> None:
        self._bits = bytearray(max(1 << 16, capacity * bits_per_key // 8))
        self._m = len(self._bits) * 8
        self.count = 0
        self.ready = False

    def _probes(self, key: tuple[str, str]) -> tuple[int, int, int]:
        h = int.from_bytes(_blake2b(f"{key[0]}\x00{key[1]}".encode(), digest_size=8).digest(), "little")
        h2 = (h >> 32) | 1
        m = self._m
        return h % m, (h + h2) % m, (h + 2 * h2) % m

    def add(self, key: tuple[str, str]) -> None:
        bits = self._bits
        for p in self._probes(key):
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1
        if self.count > self._m // 10:  # too full to stay useful: ask SQLite from now on
            self.ready = False

    def dump(self) -> bytes:
        """The filter's state, to be restored by `load` (in another process too)."""
        return b"%s:%d:%d:" % (_VERSION, self._m, self.count) + bytes(self._bits)

    def load(self, data: bytes) -> bool:
        """Restore a `dump`; False (and nothing changed) when it does not fit this filter."""
        parts = data.split(b":", 3)
        if len(parts) != 4 or parts[0] != _VERSION or int(parts[1]) != self._m:
            return False
        bits = parts[3]
        if len(bits) != len(self._bits):
            return False
        self._bits = bytearray(bits)
        self.count = int(parts[2])
        self.ready = self.count <= self._m // 10
        return True

    def __contains__(self, key: object) -> bool:
        if not self.ready:
            return True
        bits = self._bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in self._probes(key))  # type: ignore[arg-type]
