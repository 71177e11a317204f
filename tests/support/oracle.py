"""An independent fold of a stored EVENTS stream: what the router's outputs must be, by the contract.

It reads every stored message in sequence order, decodes it with the contract and folds it
with the pure actors: no NATS consumer, no SQLite, no partitions, no suppression. The
result (states, exception ids, dead letters, actor messages) is what the router must have
produced exactly once. Timer-caused exceptions are not implied by the stream and are not
included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.js.errors import NotFoundError

import actors
from actors import Alert, Send, Thresholds
from contracts.decode import DecodeError, decode_event
from contracts.exceptions import exception_id
from contracts.rules import SEVERITY
from contracts.times import rfc3339, to_us


@dataclass
class Stored:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    ts_ns: int


@dataclass
class Expected:
    states: dict[tuple[str, str], Any] = field(default_factory=dict)
    exception_ids: list[str] = field(default_factory=list)
    dead_letters: dict[int, str] = field(default_factory=dict)  # seq -> Router-Error
    message_ids: list[str] = field(default_factory=list)
    th: Thresholds = field(default_factory=Thresholds)  # for the state replies' `effective`
    # The open exceptions (CONTRACT 5.1) by (kind, key, rule, location or ''): each the raise's
    # payload (section 3.1) without `detected_at`, the one field a re-detection may change.
    open: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)


def _ts_ns(msg: Any) -> int:
    import datetime as dt

    t = msg.time
    if isinstance(t, dt.datetime):
        return to_us(t) * 1000
    return int(t)


async def read_stream(url: str, stream: str) -> list[Stored]:
    """Every stored message of a stream, in sequence order (batched direct gets; one at a time
    when the stream does not allow direct gets)."""
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(stream)
        first, last = int(info.state.first_seq or 1), int(info.state.last_seq or 0)
        if info.config.allow_direct:
            return await _read_batched(nc, stream, max(first, 1), last)
        out: list[Stored] = []
        for seq in range(max(first, 1), last + 1):
            try:
                m = await jsm.get_msg(stream, seq)
            except NotFoundError:
                continue
            out.append(
                Stored(
                    seq=int(m.seq or seq),
                    subject=str(m.subject),
                    data=bytes(m.data or b""),
                    headers=dict(m.headers or {}),
                    ts_ns=_ts_ns(m) if m.time is not None else 0,
                )
            )
        return out
    finally:
        await nc.close()


_STREAM_HEADERS = frozenset(
    ("Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Num-Pending", "Nats-Last-Sequence")
)


def rfc3339_ns(text: str) -> int:
    """Epoch nanoseconds of a server timestamp such as `2026-11-22T18:58:51.530232162Z`."""
    import datetime as dt

    head, _, frac = text.rstrip("Z").partition(".")
    whole = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
    return int(whole.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


async def _read_batched(nc: Any, stream: str, first: int, last: int, batch: int = 1000) -> list[Stored]:
    """Direct gets of up to `batch` messages per request (`$JS.API.DIRECT.GET`, server 2.11+)."""
    import asyncio
    import json

    replies: asyncio.Queue[Any] = asyncio.Queue()

    async def on_reply(msg: Any) -> None:
        replies.put_nowait(msg)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    out: list[Stored] = []
    try:
        seq = first
        while seq <= last:
            await nc.publish(
                f"$JS.API.DIRECT.GET.{stream}", json.dumps({"seq": seq, "batch": batch}).encode(), reply=inbox
            )
            while True:
                m = await asyncio.wait_for(replies.get(), 10)
                hdr = dict(m.headers or {})
                if "Status" in hdr:  # 204 end of batch, 404 nothing at or after seq
                    break
                n = int(hdr["Nats-Sequence"])
                if n > last:
                    continue
                out.append(
                    Stored(
                        seq=n,
                        subject=hdr["Nats-Subject"],
                        data=bytes(m.data or b""),
                        headers={k: v for k, v in hdr.items() if k not in _STREAM_HEADERS},
                        ts_ns=rfc3339_ns(hdr["Nats-Time-Stamp"]),
                    )
                )
                seq = n + 1
            if hdr.get("Status") == "404":
                break
    finally:
        await sub.unsubscribe()
    return out


# `[rules] max_future_skew` by default.
HOUR_US = 3_600_000_000


def fold(events: list[Stored], th: Thresholds, max_future_skew_us: int = HOUR_US) -> Expected:
    exp = Expected(th=th)
    for m in events:
        try:
            kind, key, event = decode_event(m.subject, m.data)
        except DecodeError as err:
            exp.dead_letters[m.seq] = err.code
            continue
        state = exp.states.get((kind, key))
        stream_us = (m.ts_ns + 500) // 1000
        if event.ts is not None and to_us(event.ts) - stream_us > max_future_skew_us:
            exp.dead_letters[m.seq] = "invalid"  # a ts from the future (CONTRACT section 2)
            continue
        ts_us = to_us(event.ts) if event.ts is not None else stream_us
        state, effects = actors.step(kind, state, key, m.seq, event, ts_us, th)
        exp.states[(kind, key)] = state
        for eff in effects:
            if isinstance(eff, Alert):
                exc_id = exception_id(kind, key, eff.rule, eff.location, eff.status, str(m.seq))
                exp.exception_ids.append(exc_id)
                entry = (kind, key, eff.rule, eff.location or "")
                if eff.status == "raised":
                    exp.open[entry] = {
                        "id": exc_id, "kind": kind, "key": key, "rule": eff.rule, "status": "raised",
                        "severity": SEVERITY[eff.rule], "location": eff.location, "value": eff.value,
                        "threshold": eff.threshold, "seq": m.seq, "event_ts": rfc3339(ts_us), "message": eff.message,
                    }
                else:
                    exp.open.pop(entry, None)
            elif isinstance(eff, Send):
                etype = eff.event.__struct_config__.tag
                exp.message_ids.append(f"msg:{kind}:{key}:{m.seq}:{etype}:{eff.kind}:{eff.key}")
        if (kind == "shipment" and state.status == "delivered") or (kind == "campaign" and state.ended):
            for entry in [e for e in exp.open if e[0] == kind and e[1] == key]:
                del exp.open[entry]  # a finished entity's raises leave the open set
    return exp


def open_entries(exp: Expected) -> list[dict[str, Any]]:
    """The open set a fold implies, in reply order (kind, key, rule, location with null first)."""
    return [json.loads(json.dumps(exp.open[e])) for e in sorted(exp.open)]


def without_detected_at(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "detected_at"} for e in entries]


def expected_reply(kind: str, key: str, state: Any, th: Thresholds | None = None) -> dict[str, Any]:
    """The state reply (CONTRACT section 5) the router must give for a folded state (`th`: its config's)."""
    if state is None or state.seq == 0:
        return {"kind": kind, "key": key, "seq": 0, "state": None, "exceptions": []}
    mod = actors.ACTORS[kind]
    view = actors.view(kind, state, th)
    return {"kind": kind, "key": key, "seq": state.seq, "state": view, "exceptions": mod.raised(state)}
