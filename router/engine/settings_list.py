"""`router.settings.list`: every entity's own settings, a page at a time (for `router settings export`).

Request: `{"after": cursor or null, "limit": 1-5000}`. Reply: `{"settings": [{"kind", "key",
"settings"}], "next": cursor or null}`, keys in (partition, kind, key) order. A page merges
the partition's stored keys with the actors in memory (a live state wins over a stored one),
so an actor not yet snapshotted is listed too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

import actors


class _Partition(Protocol):
    index: int
    resident: Any


class _Store(Protocol):
    async def actor_keys(
        self, partition: int, after: tuple[str, str] = ..., limit: int = ...
    ) -> list[tuple[str, str]]: ...

    async def load_actors(self, keys: Any) -> dict[tuple[str, str], tuple[int, bytes]]: ...


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    after: tuple[int, str, str] | None = None
    limit: int = 1000


def _own_settings(kind: str, state: Any) -> dict[str, Any]:
    out: dict[str, Any] = actors.view(kind, state)["settings"]
    return out


async def settings_page(partitions: Sequence[_Partition], store: _Store, data: bytes) -> dict[str, Any]:
    """One page of the reply; `{"error": ...}` for a bad request."""
    try:
        req = msgspec.json.decode(data or b"{}", type=_Request)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return {"error": f"bad request: {exc}"}
    if not 1 <= req.limit <= 5000:
        return {"error": "limit must be 1-5000"}
    by_index = sorted(partitions, key=lambda p: p.index)
    part_no, after = (req.after[0], (req.after[1], req.after[2])) if req.after else (by_index[0].index if by_index else 0, ("", ""))
    out: list[dict[str, Any]] = []
    for part in by_index:
        if part.index < part_no:
            continue
        if part.index > part_no:
            after = ("", "")
        stored = await store.actor_keys(part.index, after, req.limit)
        last = stored[-1] if len(stored) == req.limit else None  # None: the store has no more
        resident = dict(part.resident)
        keys = set(stored)
        keys.update(k for k in resident if k > after and (last is None or k <= last))
        missing = [k for k in keys if k not in resident]
        found = await store.load_actors(missing) if missing else {}
        for k in sorted(keys):
            state = resident.get(k)
            if state is None:
                item = found.get(k)
                if item is None:
                    continue
                state = actors.decode_state(k[0], item[1])
            own = _own_settings(k[0], state)
            if own:
                out.append({"kind": k[0], "key": k[1], "settings": own})
        if last is not None:
            return {"settings": out, "next": [part.index, last[0], last[1]]}
        if len(out) >= req.limit:
            nxt = next((p.index for p in by_index if p.index > part.index), None)
            return {"settings": out, "next": None if nxt is None else [nxt, "", ""]}
    return {"settings": out, "next": None}
