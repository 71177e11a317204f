"""A partition's open exceptions (CONTRACT 5.1): the raises in force, kept with the snapshots.

Where it is kept, and why there:

- The stored open set is a table of the snapshot store (snapshots.open_index), written in the
  same transaction as the actor rows whose raises it holds: every `ActorRecord` the partition
  writes (a snapshot's, or a fired timer's) carries the changes to its key's open set. So the
  store's open set always belongs to the store's states, after any crash: a restart replays
  from the store's marks, and an event applied again re-raises what it raised (the same id,
  payload and all; only `detected_at` is the time of the new detection).
- Changes come from the effects, in `Outbox.effects` (`note`): every raise and clear an actor
  returns, published or not (a replay after a crash publishes nothing already stored, yet its
  raises belong in the set). The entry is the raise's payload as published.
- A finished entity (a shipment once delivered, a campaign once ended) has no open exceptions:
  whenever one is written, its rows go (`capture`). Finishing may raise nothing (a delivery
  with only `sla_breached` open), so it is read from the state, not from the effects.
- Between snapshots, the changes since a key was last written are here in memory (`changes`),
  and `view` gives them to a query to lay over the stored rows. An actor that finished without
  a change has stored rows: among the keys with stored rows of the kinds that finish, those
  in memory and finished are left out. A query reads no actor from the store.

A fired timer's record is the state right after the firing; the open changes it carries are
those of its key up to the write. Events applied since the firing are then ahead of the stored
state by the same events the stored marks make a restart apply again: they raise and clear the
same again, so the open set after the replay is the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from snapshots import ActorRecord, OpenRows

Key = tuple[str, str]
Entry = tuple[str, str]  # (rule, location or '')

_EMPTY: Final = OpenRows(clear=True)


def finished(kind: str, state: Any) -> bool:
    """A shipment once delivered, a campaign once ended: its raises leave the open set."""
    if kind == "shipment":
        return bool(state.status == "delivered")
    if kind == "campaign":
        return bool(state.ended)
    return False


class _Delta:
    """One key's open-set changes since it was last written: entry -> (severity, payload) in force, or None (gone)."""

    __slots__ = ("entries", "version")

    def __init__(self) -> None:
        self.entries: dict[Entry, tuple[str, str] | None] = {}
        self.version = 0


@dataclass(slots=True)
class View:
    """A partition's open-set changes not yet in the store, at one moment (see `OpenIndex.view`)."""

    partition: int
    # Keys whose stored rows a query must not take as they are: changed, or finished.
    keys: list[Key] = field(default_factory=list)
    finished: set[Key] = field(default_factory=set)
    changes: dict[Key, dict[Entry, tuple[str, str] | None]] = field(default_factory=dict)


class OpenIndex:
    """The open-set changes of one partition's actors since they were last written."""

    def __init__(self, partition: int, resident: dict[Key, Any]) -> None:
        self.partition = partition
        self._resident = resident
        self.changes: dict[Key, _Delta] = {}
        self._version = 0

    def note(self, kind: str, key: str, rule: str, location: str | None, raised: bool, severity: str, payload: bytes) -> None:
        """An actor raised (`raised`) or cleared `rule` at `location`; `payload` as published."""
        k = (kind, key)
        d = self.changes.get(k)
        if d is None:
            d = self.changes[k] = _Delta()
        self._version += 1
        d.version = self._version
        d.entries[(rule, location or "")] = (severity, payload.decode()) if raised else None

    def capture(self, k: Key, state: Any) -> OpenRows | None:
        """What a write of `k` in `state` carries for the open set (None: nothing to change)."""
        d = self.changes.get(k)
        kind = k[0]  # (finished(), inline: this runs for every actor a snapshot writes)
        if (kind == "shipment" and state.status == "delivered") or (kind == "campaign" and state.ended):
            return _EMPTY if d is None else OpenRows(clear=True, version=d.version)
        if d is None:
            return None
        drop: list[Entry] = []
        put: list[tuple[str, str, str, str]] = []
        for (rule, loc), v in d.entries.items():
            if v is None:
                drop.append((rule, loc))
            else:
                put.append((rule, loc, v[0], v[1]))
        return OpenRows(drop=tuple(drop), put=tuple(put), version=d.version)

    def committed(self, rows: Iterable[ActorRecord]) -> None:
        """`rows` are in the store now: forget the changes they carried, unless newer ones came since."""
        changes = self.changes
        for r in rows:
            o = r.open
            if o is None or not o.version:
                continue
            k = (r.kind, r.key)
            d = changes.get(k)
            if d is not None and d.version == o.version:
                del changes[k]

    def view(self, stored: Iterable[Key] = ()) -> View:
        """The changes not yet in the store, at this moment; and which of `stored` (keys of kinds that
        finish with rows in the store) finished since they were last written."""
        resident = self._resident
        v = View(self.partition)
        for k, d in self.changes.items():
            st = resident.get(k)
            if st is not None and finished(k[0], st):
                v.finished.add(k)
            else:
                v.changes[k] = dict(d.entries)
        for k in stored:
            if k not in v.changes:
                st = resident.get(k)  # (not in memory: as stored)
                if st is not None and finished(k[0], st):
                    v.finished.add(k)
        v.keys = [*v.changes, *v.finished]
        return v


def effective(
    views: Sequence[View], stored: Iterable[Sequence[str]]
) -> list[tuple[str, str, str, str, str, str]]:
    """The open entries (kind, key, rule, location, severity, payload) of the views' keys: their
    `stored` rows (kind, key, rule, location, severity, payload) with the changes laid over, none
    for a finished key."""
    finished_keys: set[Key] = set()
    changes: dict[Key, dict[Entry, tuple[str, str] | None]] = {}
    for v in views:
        finished_keys |= v.finished
        changes.update(v.changes)
    out: dict[tuple[str, str, str, str], tuple[str, str]] = {}
    for kind, key, rule, loc, sev, payload in stored:
        if (kind, key) not in finished_keys:
            out[(kind, key, rule, loc)] = (sev, payload)
    for (kind, key), entries in changes.items():
        for (rule, loc), val in entries.items():
            if val is None:
                out.pop((kind, key, rule, loc), None)
            else:
                out[(kind, key, rule, loc)] = val
    return [(*e, sev, payload) for e, (sev, payload) in out.items()]
