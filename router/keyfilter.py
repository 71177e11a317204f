"""A Bloom filter of the actor keys the snapshot store may hold, to skip SQLite for new keys."""

from __future__ import annotations

from typing import Final

_K: Final = 3


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
        h = hash(key)
        h2 = (h >> 32) | 1
        m = self._m
        return h % m, (h + h2) % m, (h + 2 * h2) % m

    def add(self, key: tuple[str, str]) -> None:
        bits = self._bits
        for p in self._probes(key):
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1
        if self.count > self._m // 10:  # too full to stay useful: grow and ask SQLite meanwhile
            self.ready = False

    def __contains__(self, key: object) -> bool:
        if not self.ready:
            return True
        bits = self._bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in self._probes(key))  # type: ignore[arg-type]
