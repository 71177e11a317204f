"""Reading one actor back from the snapshot store, for assertions (the router loads actors in batches)."""

from __future__ import annotations

from snapshots import Store


async def load_actor(store: Store, kind: str, key: str) -> tuple[int, bytes] | None:
    """(last_seq, state bytes) of one stored actor, or None when the store has no row for it."""
    return (await store.load_actors([(kind, key)])).get((kind, key))
