"""The last few messages of one subject filter in a stream: an entity's recent history.

JetStream reads forward only. `last_messages` finds the newest match (a "last by subject"
get), then reads forward with batched direct gets from a window before it, widening the
window (times 8) until it holds `n` matches or reaches the stream's start. A busy key is
found in one read; a quiet one in a few, each bounded by what matches in its window.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, Final, NamedTuple

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from router.jetstream.recovery import direct_batches

FIRST_WINDOW: Final = 4096
WIDEN: Final = 8


class Stored(NamedTuple):
    seq: int
    subject: str
    time: str  # the JetStream timestamp, RFC 3339
    headers: dict[str, str]
    data: bytes


async def last_messages(nc: NATS, stream: str, subject_filter: str, n: int) -> list[Stored]:
    """Up to `n` newest messages of `stream` matching `subject_filter`, oldest first."""
    jsm = nc.jsm()
    try:
        newest = await jsm.get_last_msg(stream, subject_filter)
    except NotFoundError:
        return []  # no message matches (or no such stream)
    last = int(newest.seq or 0)
    info = await jsm.stream_info(stream)
    first = max(1, int(info.state.first_seq or 1))
    window = max(FIRST_WINDOW, n * 64)
    while True:
        start = max(first, last - window + 1)
        found: list[Stored] = []
        request = {"seq": start, "next_by_subj": subject_filter}
        async with aclosing(direct_batches(nc, stream, request, last)) as messages:
            async for msg in messages:
                hdr = dict(msg.headers or {})
                found.append(
                    Stored(
                        seq=int(hdr.get("Nats-Sequence", 0)),
                        subject=hdr.get("Nats-Subject", ""),
                        time=hdr.get("Nats-Time-Stamp", ""),
                        headers={k: v for k, v in hdr.items() if not k.startswith("Nats-") or k == "Nats-Msg-Id"},
                        data=bytes(msg.data or b""),
                    )
                )
        if len(found) >= n or start <= first:
            return found[-n:]
        window *= WIDEN


def preview(data: bytes, width: int = 300) -> str:
    """A payload as one line of text for people (not UTF-8 bytes escaped)."""
    text = data.decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[: width - 3] + "..."


def json_or_none(data: bytes) -> Any:
    import json

    try:
        return json.loads(data)
    except ValueError:
        return None
