"""Rebuilding one actor's state from the store and the stream, after the actor raised on an event.

CONTRACT section 4: an event an actor fails on is dead-lettered as `actor_error` and leaves
the state as if it never came. The actor may have changed its state before raising, so the
state is rebuilt: the stored one, plus the key's events in EVENTS after it and before the
failed one, applied in order exactly as the partition applied them (the same decoding, the
same time for an event without `ts`: the JetStream time stamp rounded half up to the
microsecond).

A rebuilt state is a fold of the key's history or nothing: a read that fails part of the way
is not taken for the end of the history. The whole rebuild is tried again, with a log line
each time, and after `RETRY_FOR_S` the router stops with a message saying why.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, Final

import anyio
import structlog
from nats.aio.client import Client as NATS

import actors
from actors import Thresholds
from contracts.config import Config, duration_us
from contracts.decode import DecodeError, decode_event, future_ts
from contracts.times import ns_to_us, to_us
from router.errors import FatalError
from router.jetstream.recovery import direct_batches, timestamp_ns
from router.jetstream.streams import stored_subject_filter
from snapshots import Store, StoreError

log = structlog.get_logger()

# How long a rebuild is tried again before the router gives up.
RETRY_FOR_S: Final = 60.0
_FIRST_PAUSE_S: Final = 0.1
_LONGEST_PAUSE_S: Final = 5.0


async def rebuild_state(
    store: Store,
    nc: NATS,
    cfg: Config,
    th: Thresholds,
    kind: str,
    key: str,
    upto: int,
    *,
    retry_for_s: float = RETRY_FOR_S,
) -> Any:
    """The state of `kind`/`key` with every event of it before stream sequence `upto` applied.

    Raises FatalError when the history cannot be read for `retry_for_s` seconds; a store
    error (a damaged file, say) is raised as it is, for the daemon to act on.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await _fold(store, nc, cfg, th, kind, key, upto)
        except StoreError:
            raise
        except Exception as exc:
            attempt += 1
            waited = time.monotonic() - started
            if waited >= retry_for_s:
                raise FatalError(
                    f"the state of {kind} {key} cannot be rebuilt after an actor_error at sequence {upto}: "
                    f"reading its events from stream {cfg.streams.events} failed {attempt} times in "
                    f"{waited:.0f} s (the last: {exc!r}). The event is not acknowledged; start the router "
                    f"again once the stream can be read"
                ) from exc
            pause = min(_LONGEST_PAUSE_S, _FIRST_PAUSE_S * 2 ** (attempt - 1))
            log.warning(
                "actor_rebuild_retry", kind=kind, key=key, upto=upto, attempt=attempt, retry_in_s=pause, error=repr(exc)
            )
            await anyio.sleep(pause)


async def _fold(store: Store, nc: NATS, cfg: Config, th: Thresholds, kind: str, key: str, upto: int) -> Any:
    k = (kind, key)
    found = await store.load_actors([k])
    item = found.get(k)
    state = actors.decode_state(kind, item[1]) if item is not None else actors.ACTORS[kind].new(key)
    start = state.seq + 1
    if start >= upto:
        return state
    max_skew = duration_us(cfg.rules.max_future_skew)
    request = {"seq": start, "next_by_subj": stored_subject_filter(f"events.{kind}.{key}", cfg.router.partitions)}
    async with aclosing(direct_batches(nc, cfg.streams.events, request, upto - 1)) as messages:
        async for m in messages:
            hdr = m.headers
            seq = int(hdr["Nats-Sequence"])
            try:
                _kind, _key, event = decode_event(hdr["Nats-Subject"], bytes(m.data or b""))
            except DecodeError:
                continue  # dead-lettered the first time too
            stream_us = ns_to_us(timestamp_ns(hdr["Nats-Time-Stamp"]))
            ts_us = to_us(event.ts) if event.ts is not None else stream_us
            if future_ts(ts_us, stream_us, max_skew) is not None:
                continue  # a ts from the future: dead-lettered the first time too
            backup = actors.encode_state(state)
            try:
                state, _effects = actors.step(kind, state, key, seq, event, ts_us, th)
            except Exception:
                state = actors.decode_state(kind, backup)  # failed (and dead-lettered) the first time too
    return state
