"""router.jetstream.parser.FastParser gives nats-py's client exactly the calls nats-py's own parser gives."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from router.jetstream.parser import FastParser

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), data, hdr))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


def wire(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    for i in range(n):
        r = rng.random()
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60))).replace(b"\r\n", b"xx")
        if r < 0.45:
            out += b"MSG events.sku.K%d %d $JS.ACK.EVENTS.router.1.%d.%d.17.0 %d\r\n" % (i, i % 3 + 1, i, i, len(payload))
            out += payload + b"\r\n"
        elif r < 0.6:
            out += b"MSG _INBOX.x.%d 2 %d\r\n%s\r\n" % (i, len(payload), payload)
        elif r < 0.85:
            hdr = b"NATS/1.0\r\nNats-Msg-Id: m%d\r\n\r\n" % i
            reply = b" _R.%d" % i if rng.random() < 0.5 else b""
            out += b"HMSG events.sku.H%d 1%s %d %d\r\n%s%s\r\n" % (i, reply, len(hdr), len(hdr) + len(payload), hdr, payload)
        elif r < 0.9:
            out += b"PING\r\n"
        elif r < 0.95:
            out += b"PONG\r\n"
        else:
            out += b"+OK\r\n"
    return bytes(out)


@pytest.mark.parametrize("seed", range(20))
async def test_same_calls_as_nats_py_for_any_split(seed: int) -> None:
    rng = random.Random(seed)
    data = wire(rng, 200)
    want = Recorder()
    await Parser(want).parse(data)
    got = Recorder()
    fast = FastParser(got)
    i = 0
    while i < len(data):  # the stream arrives in pieces of any size
        j = i + rng.choice([1, 2, 3, 7, 64, 500, 4096])
        await fast.parse(data[i:j])
        i = j
    assert got.calls == want.calls
    assert len(want.calls) > 150
    assert not fast.buf


@pytest.mark.parametrize("seed", range(20))
async def test_handled_messages_stay_in_wire_order_around_other_lines(seed: int) -> None:
    """Messages for a handler reach it, in wire order with everything else, also when a PING,
    PONG, +OK or INFO comes before them in the same read (nats-py's parser, given the rest of
    such a read, would have handed them to the client instead)."""
    rng = random.Random(seed)
    data = wire(rng, 200)
    want = Recorder()
    await Parser(want).parse(data)
    got = Recorder()

    async def headers(raw: bytes) -> dict[str, str]:
        return {"raw": raw.decode()}

    got._process_headers = headers  # type: ignore[attr-defined]
    fast = FastParser(got)

    def handler(subject: bytes, reply: bytes, data: bytes, hdr: dict[str, str] | None) -> None:
        got.calls.append(("handled", 1, subject, reply, data, hdr["raw"].encode() if hdr else None))

    fast.handlers[1] = handler  # the HMSGs (sid 1) and a third of the MSGs
    i = 0
    while i < len(data):
        j = i + rng.choice([3, 64, 500, 4096, 1 << 16])
        await fast.parse(data[i:j])
        i = j
    assert got.calls == [("handled", *c[1:]) if c[0] == "msg" and c[1] == 1 else c for c in want.calls]
    assert {c[0] for c in want.calls} >= {"msg", "ping", "pong"}
    assert sum(1 for c in want.calls if c[0] == "msg" and c[1] == 1) > 50
    assert not fast.buf


async def test_a_message_after_a_pong_in_the_same_read_reaches_its_handler() -> None:
    got: list[bytes] = []
    rec = Recorder()
    fast = FastParser(rec)
    fast.handlers[5] = lambda subject, reply, data, hdr: got.append(data)
    await fast.parse(b"PONG\r\nMSG a.b 5 r.1 3\r\nabc\r\nPING\r\nMSG a.c 5 3\r\nxyz\r\nMSG a.d 5 r")
    await fast.parse(b".3 2\r\nqq\r\n")
    assert got == [b"abc", b"xyz", b"qq"]
    assert rec.calls == [("pong",), ("ping",)]


async def test_a_long_info_line_is_read_whole_and_the_messages_after_it_reach_their_handler() -> None:
    # A server's INFO (cluster URLs) may pass nats-py's 4 KiB control-line size: nats-py reads
    # it whole, and so must this parser, without taking the messages after it along.
    info = {"server_id": "S", "connect_urls": [f"10.0.{i // 250}.{i % 250}:4222" for i in range(400)]}
    line = b"INFO " + json.dumps(info).encode() + b"\r\n"
    assert len(line) > 4096
    got: list[bytes] = []
    rec = Recorder()
    fast = FastParser(rec)
    fast.handlers[5] = lambda subject, reply, data, hdr: got.append(data)
    data = line + b"MSG a.b 5 r.1 3\r\nabc\r\n"
    for i in range(0, len(data), 1000):  # the line arrives in pieces
        await fast.parse(data[i : i + 1000])
    assert rec.calls == [("info", info)]
    assert got == [b"abc"]
    assert not fast.buf


async def test_an_unknown_line_is_a_protocol_error() -> None:
    fast = FastParser(Recorder())
    with pytest.raises(ProtocolError):
        await fast.parse(b"PING\r\nBOGUS " + b"x" * 5000 + b"\r\nMSG a.b 5 1\r\nx\r\n")
    with pytest.raises(ProtocolError):
        await FastParser(Recorder()).parse(b"MSG a.b five 3\r\nabc\r\n")
