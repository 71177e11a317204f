"""Fuzzing router.jetstream.parser.FastParser with what a server can deliver.

Behind the parser sits nats-py's real client code (`_process_msg`, `_build_message`,
`_process_headers`: the places that decode subjects and status lines strictly), with a real
subscription; only the calls that would write to a socket are recorded instead.

- Well-framed streams, any bytes in every field a client controls (subject, reply, header
  block, payload), cut into reads of any size: `parse` never raises (an exception out of it
  ends nats-py's read loop), every message with valid UTF-8 subjects reaches its subscription
  or handler, in wire order, and every other one is counted as dropped.
- Any stream at all (a valid one, mutated): `parse` raises nothing but ProtocolError, on which
  nats-py reconnects; any other exception would end the read loop with no reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError

from router.jetstream.parser import FastParser, is_utf8

NATS_PY_SID = 1
HANDLER_SID = 2

# A subject or reply token: any bytes but the separators of a protocol line.
_TOKEN = st.binary(min_size=1, max_size=24).map(
    lambda b: bytes(c for c in b if c not in b" \t\r\n\x0b\x0c") or b"x"
)
_HEADER_LINE = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_HEADERS = st.one_of(
    st.lists(_HEADER_LINE, max_size=4).map(lambda ls: b"NATS/1.0\r\n" + b"".join(x + b"\r\n" for x in ls) + b"\r\n"),
    st.tuples(st.binary(min_size=1, max_size=8), _HEADER_LINE).map(  # an inline status, any bytes
        lambda t: b"NATS/1.0 " + t[0].replace(b"\r", b"").replace(b"\n", b"") + b" " + t[1] + b"\r\n\r\n"
    ),
)


class Client_(Client):
    """nats-py's client, unconnected: what would go to the socket is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[Any, ...]] = []

        async def error_cb(exc: Exception) -> None:
            self.lines.append(("error", repr(exc)))

        self._error_cb = error_cb
        self.sub = Subscription(self, NATS_PY_SID, "x", pending_msgs_limit=0, pending_bytes_limit=0)
        self._subs[NATS_PY_SID] = self.sub

    async def _process_ping(self) -> None:
        self.lines.append(("ping",))

    async def _process_pong(self) -> None:
        self.lines.append(("pong",))

    async def _process_err(self, err_msg: str) -> None:
        self.lines.append(("err", err_msg))

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        self.lines.append(("info", info))

    def delivered(self) -> list[tuple[Any, ...]]:
        q: asyncio.Queue[Any] = self.sub._pending_queue
        out = []
        while not q.empty():
            m = q.get_nowait()
            out.append((m.subject.encode(), m.reply.encode(), m.data))
        return out


@st.composite
def frame(draw: st.DrawFn) -> tuple[bytes, tuple[Any, ...] | None]:
    """(bytes on the wire, what should come of them) for one server frame."""
    what = draw(st.sampled_from(["msg", "hmsg", "ping", "pong", "ok", "err", "info"]))
    if what in ("msg", "hmsg"):
        sid = draw(st.sampled_from([NATS_PY_SID, HANDLER_SID]))
        subject = draw(_TOKEN)
        reply = draw(st.one_of(st.just(b""), _TOKEN))
        payload = draw(st.binary(max_size=40))
        r = b" " + reply if reply else b""
        if what == "msg":
            wire = b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, r, len(payload), payload)
        else:
            hdr = draw(_HEADERS)
            size = len(hdr) + len(payload)
            wire = b"HMSG %s %d%s %d %d\r\n%s%s\r\n" % (subject, sid, r, len(hdr), size, hdr, payload)
        if sid == HANDLER_SID:
            return wire, ("handled", subject, reply, payload)
        if is_utf8(subject) and is_utf8(reply):
            return wire, ("msg", subject, reply, payload)
        return wire, ("dropped",)
    if what == "ping":
        return b"PING\r\n", ("ping",)
    if what == "pong":
        return b"PONG\r\n", ("pong",)
    if what == "ok":
        return b"+OK\r\n", None
    if what == "err":
        # A server's -ERR always quotes some text: `-ERR ''` is no frame a server sends (and
        # nats-py's parser rightly calls it an unknown protocol).
        text = draw(
            st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"") or b"x")
        )
        return b"-ERR '" + text + b"'\r\n", ("err",)
    info = {"server_id": draw(st.text(max_size=10)), "max_payload": 1048576}
    return b"INFO " + json.dumps(info).encode() + b"\r\n", ("info", info)


def _cuts(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes or [len(data) or 1]:
        if i >= len(data):
            break
        out.append(data[i : i + n])
        i += n
    if i < len(data):
        out.append(data[i:])
    return out


async def _feed(frames: list[tuple[bytes, Any]], sizes: list[int]) -> tuple[Client_, FastParser, list[Any]]:
    nc = Client_()
    ps = FastParser(nc)
    handled: list[Any] = []
    ps.handlers[HANDLER_SID] = lambda subject, reply, data, hdr: handled.append((subject, reply, data))
    for chunk in _cuts(b"".join(w for w, _ in frames), sizes):
        await ps.parse(chunk)
    return nc, ps, handled


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(frames=st.lists(frame(), max_size=40), sizes=st.lists(st.integers(1, 200), max_size=50))
def test_any_framed_stream_is_read_whole_and_loses_no_valid_message(
    frames: list[tuple[bytes, Any]], sizes: list[int]
) -> None:
    nc, ps, handled = asyncio.run(_feed(frames, sizes))
    want = [e for _w, e in frames if e is not None]
    assert [(s, r, d) for k, s, r, d in (e for e in want if e[0] == "msg")] == nc.delivered()
    assert [(s, r, d) for k, s, r, d in (e for e in want if e[0] == "handled")] == handled
    assert ps.dropped == sum(1 for e in want if e[0] == "dropped")
    assert [x[0] for x in nc.lines if x[0] != "error"] == [e[0] for e in want if e[0] in ("ping", "pong", "err", "info")]
    assert [x[1] for x in nc.lines if x[0] == "info"] == [e[1] for e in want if e[0] == "info"]
    assert not ps.buf


@_SETTINGS
@given(
    frames=st.lists(frame(), min_size=1, max_size=20),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 200), max_size=30),
)
def test_any_mutated_stream_raises_nothing_but_a_protocol_error(
    frames: list[tuple[bytes, Any]], flips: list[tuple[int, int]], sizes: list[int]
) -> None:
    data = bytearray(b"".join(w for w, _ in frames))
    for at, value in flips:
        data[at % len(data)] = value
    mutated = [(bytes(data), None)]
    with contextlib.suppress(ProtocolError):  # nats-py reconnects on this one
        asyncio.run(_feed(mutated, sizes))


def test_a_bad_subject_between_valid_messages_loses_neither() -> None:
    frames = [
        (b"MSG a.b 1 _INBOX.r 2\r\nok\r\n", None),
        (b"MSG router.state.sku.\xff 1 _INBOX.r 2\r\nno\r\n", None),
        (b"MSG router.state.sku.K 1 _INBOX.\xff\xfe 2\r\nno\r\n", None),
        (b"HMSG a.c 1 14 16\r\nNATS/1.0 \xff\r\n\r\nok\r\n", None),
        (b"MSG a.d 1 2\r\nok\r\n", None),
    ]
    nc, ps, _ = asyncio.run(_feed(frames, [7]))
    # The status line nats-py cannot decode: delivered without its headers.
    assert nc.delivered() == [(b"a.b", b"_INBOX.r", b"ok"), (b"a.c", b"", b"ok"), (b"a.d", b"", b"ok")]
    assert ps.dropped == 2  # the two bad subjects


@pytest.mark.parametrize("line", [b"INFO {not json\r\n", b"INFO \xff\xfe\r\n"])
def test_an_unreadable_info_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        asyncio.run(_feed([(line, None)], []))
