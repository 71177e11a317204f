"""The open exceptions of every partition, gathered from every instance (CONTRACT 5.1).

`router open`, the HTTP server's `/exceptions/open` and the on-call sink all ask this way::

    reply = await gather_open(nc, {"kind": "sku", "limit": 50})
    reply["open"], reply["total"], reply["next"], reply["partitions"], reply["partition_count"]

One request on `router.exceptions.open`; every instance that runs partitions answers for those
it runs; replies are collected until every partition 0..P-1 is covered, then merged: sorted by
kind, key, rule, location (null first), cut at `limit`, totals summed. `next` pages on across
instances (each answers with the entries after the cursor's key). A request the contract does
not allow raises `BadFilter` before anything is sent (HTTP: 400); partitions not covered by
the deadline raise `Incomplete`, naming them (HTTP: 503). When two instances answer for one
partition for a moment (a takeover), replies that cover each partition once are taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Final

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.engine.open_query import SUBJECT, BadRequest, Request, encode_cursor, parse_request, sort_key

__all__ = ["DEFAULT_WAIT_S", "BadFilter", "GatherError", "Incomplete", "gather_open", "parse_request"]

DEFAULT_WAIT_S: Final = 5.0
_DECODE: Final = msgspec.json.Decoder(dict[str, Any])


class GatherError(Exception):
    """The open exceptions could not be gathered; the message says why, for people."""


class BadFilter(GatherError):
    """The request is not one the contract allows (an unknown filter, kind, rule or severity, a bad value)."""


class Incomplete(GatherError):
    """Not every partition answered in time."""

    def __init__(self, missing: list[int], partition_count: int | None, timeout: float) -> None:
        self.missing = missing
        self.partition_count = partition_count
        if partition_count is None:
            text = f"no router answered on {SUBJECT} within {timeout:g}s"
        else:
            text = (
                f"no answer for partition{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                f"of {partition_count} on {SUBJECT} within {timeout:g}s (their owner is away or starting)"
            )
        super().__init__(text)


async def gather_open(
    nc: NATS,
    request: Mapping[str, Any] | bytes | str | None = None,
    *,
    wait_s: float = DEFAULT_WAIT_S,
) -> dict[str, Any]:
    """CONTRACT 5.1's reply over every partition: {"open", "total", "next", "partitions", "partition_count"}.

    `request`: the filters (a mapping, or JSON text; None or empty: none). Raises BadFilter for a
    request the contract does not allow, Incomplete when partitions are still missing after `wait_s` seconds.
    """
    try:
        req = parse_request(request)
    except BadRequest as exc:
        raise BadFilter(str(exc)) from None
    replies: list[dict[str, Any]] = []
    covered: set[int] = set()
    count: int | None = None
    done = anyio.Event()
    error: list[str] = []

    async def on_reply(msg: Msg) -> None:
        nonlocal count
        try:
            body = _DECODE.decode(msg.data)
        except msgspec.DecodeError:
            return
        if "error" in body:
            error.append(str(body["error"]))
            done.set()
            return
        parts = [int(p) for p in body.get("partitions", [])]
        p_count = int(body.get("partition_count", 0))
        if count is None:
            count = p_count
        elif p_count != count:
            error.append(f"instances disagree on the partition count ({count} and {p_count})")
            done.set()
            return
        if not parts:
            return
        replies.append(body)
        covered.update(parts)
        if covered >= set(range(count)) and _cover(replies, count) is not None:
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(SUBJECT, msgspec.json.encode(req.as_json()), reply=inbox)
        with anyio.move_on_after(wait_s):
            await done.wait()
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()
    if error:
        raise BadFilter(error[0])
    chosen = _cover(replies, count) if count is not None else None
    if count is None or chosen is None:
        missing = sorted(set(range(count)) - covered) if count is not None else []
        raise Incomplete(missing, count, wait_s)
    return merge(chosen, req, count)


def _cover(replies: list[dict[str, Any]], count: int) -> list[dict[str, Any]] | None:
    """Replies whose partitions cover 0..count-1 exactly once each (earlier replies first), or None.

    Two instances may both answer for a partition for a moment (a takeover): the entries of a
    reply cannot be told apart by partition, so a partition must come from one reply alone."""
    sets = [frozenset(int(p) for p in r["partitions"]) for r in replies]
    want = frozenset(range(count))

    def search(i: int, have: frozenset[int]) -> list[int] | None:
        if have == want:
            return []
        for j in range(i, len(sets)):
            if not have & sets[j]:
                rest = search(j + 1, have | sets[j])
                if rest is not None:
                    return [j, *rest]
        return None

    found = search(0, frozenset())
    return None if found is None else [replies[j] for j in found]


def merge(replies: list[dict[str, Any]], req: Request, partition_count: int) -> dict[str, Any]:
    """One reply of several instances' replies (disjoint partitions) to `req`."""
    entries = [e for r in replies for e in r.get("open", [])]
    entries.sort(key=sort_key)
    page = entries[: req.limit]
    more = len(entries) > req.limit or any(r.get("next") for r in replies)
    return {
        "open": page,
        "total": sum(int(r.get("total", 0)) for r in replies),
        "next": encode_cursor(sort_key(page[-1])) if more and page else None,
        "partitions": sorted(p for r in replies for p in r.get("partitions", [])),
        "partition_count": partition_count,
    }
