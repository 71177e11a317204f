"""Rebuilding one actor's state from the store and the stream, after the actor raised on an event.

CONTRACT section 4: an event an actor fails on is dead-lettered as `actor_error` and leaves
the state as if it never came. The actor may have changed its state before raising, so the
state is rebuilt: the stored one, plus the key's events in EVENTS after it and before the
failed one, applied in order as the partition applied them.
"""

from __future__ import annotations

from typing import Any

import actors
from actors import Thresholds
from contracts.config import Config
from contracts.decode import DecodeError, decode_event
from contracts.times import to_us
from router.jetstream.streams import stored_subject_filter
from snapshots import Store


async def rebuild_state(
    store: Store, jsm: Any, cfg: Config, th: Thresholds, kind: str, key: str, upto: int
) -> Any:
    """The state of `kind`/`key` with every event of it before stream sequence `upto` applied."""
    k = (kind, key)
    found = await store.load_actors([k])
    item = found.get(k)
    state = actors.decode_state(kind, item[1]) if item is not None else actors.ACTORS[kind].new(key)
    filt = stored_subject_filter(f"events.{kind}.{key}", cfg.router.partitions)
    seq = state.seq + 1
    while seq < upto:
        try:
            m = await jsm.get_msg(cfg.streams.events, seq=seq, subject=filt, next=True)
        except Exception:
            break
        if m.seq is None or m.seq >= upto:
            break
        seq = m.seq + 1
        try:
            _k, _key, event = decode_event(str(m.subject), bytes(m.data or b""))
        except DecodeError:
            continue  # dead-lettered the first time too
        ts_us = to_us(event.ts) if event.ts is not None else _msg_time_us(m)
        backup = actors.encode_state(state)
        try:
            actors.step(kind, state, key, m.seq, event, ts_us, th)
        except Exception:
            state = actors.decode_state(kind, backup)  # failed (and dead-lettered) the first time too
    return state


def _msg_time_us(m: Any) -> int:
    """The JetStream timestamp of a message read with a direct/stream get."""
    t = getattr(m, "time", None)
    if t is None:
        return 0
    if isinstance(t, (int, float)):
        return int(t) // 1000
    return to_us(t)
