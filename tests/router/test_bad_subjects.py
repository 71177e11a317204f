"""Subjects that are not valid UTF-8, sent as a hostile client would (a raw socket), never stop
the router: it answers a request with an error where it can, dead-letters an event as
`bad_subject`, and right after still answers queries and applies events.

nats-py decodes a message's subject and reply subject as strict UTF-8 and ends its read loop
when that fails; before the parser handled it, one such request stopped the router for
minutes (it applied nothing and answered nothing until the stale-connection check).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats
import pytest

from contracts.decode import Rejected
from tests.support.harness import check_against_fold, make_config, running_router, settle, wait_for
from tests.support.oracle import read_stream
from tests.support.rawclient import RawClient

pytestmark = pytest.mark.anyio

T0 = "2026-11-20T10:00:00Z"

# The byte sequences that each stopped the router, as (subject, reply) of a state request.
BAD_REQUESTS = [
    (b"router.state.sku.\xff", b"_INBOX.raw.1"),  # invalid UTF-8
    (b"router.state.sku.K\xe2\x82", b"_INBOX.raw.2"),  # a cut sequence
    (b"router.state.sku.\xc0\xaf", b"_INBOX.raw.3"),  # overlong
    (b"router.state.sku.\xed\xa0\x80", b"_INBOX.raw.4"),  # an encoded surrogate
    (b"router.state.\xff.K", b"_INBOX.raw.5"),  # an invalid kind token
    (b"router.state.sku.K", b"_INBOX.\xff\xfe"),  # a valid subject, a reply subject that is not
]


def received(qty: int) -> bytes:
    return json.dumps({"type": "received", "location": "X", "qty": qty, "ts": T0}).encode()


async def state(nc: Any, key: str) -> dict[str, Any]:
    reply = await nc.request(f"router.state.sku.{key}", b"", timeout=5)
    return json.loads(reply.data)  # type: ignore[no-any-return]


async def test_bad_request_subjects_get_an_error_and_the_router_goes_on(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path)
    async with running_router(cfg) as rt:
        nc = await nats.connect(nats_server.url)
        try:
            async with RawClient(nats_server.port) as raw:
                await raw.sub(b"_INBOX.raw.*", 1)
                await raw.flush()
                for i, (subject, reply) in enumerate(BAD_REQUESTS, start=1):
                    await raw.pub(subject, b"", reply)
                    await raw.flush()
                    if reply.startswith(b"_INBOX.raw."):
                        to, body = await raw.next_msg()
                        assert to == reply
                        error = json.loads(body)["error"]
                        assert "not valid UTF-8" in error
                        assert subject.decode("utf-8", "backslashreplace") in error
                    # Right after: the router answers a query and applies an event.
                    await nc.publish("events.sku.K", received(i))
                    await wait_for(lambda i=i: _seq_is(nc, "K", i), timeout=20)
                assert rt.nc._ps.dropped == 1  # the request it could not answer
                assert not raw.received
        finally:
            await nc.close()
        assert rt.nc.is_connected


async def _seq_is(nc: Any, key: str, seq: int) -> bool:
    return int((await state(nc, key))["seq"]) == seq


async def test_bad_event_subjects_are_dead_lettered_with_the_subject_escaped(
    nats_server: Any, tmp_path: Path
) -> None:
    cfg = make_config(nats_server.url, tmp_path)
    bad = [b"events.sku.\xff", b"events.sku.K\xe2\x82", b"events.\xc0\xaf.K", b"events.sku.\xed\xa0\x80"]
    async with running_router(cfg) as rt:
        async with RawClient(nats_server.port) as raw:
            for n, subject in enumerate(bad, start=1):
                await raw.pub(subject, received(1))
                await raw.pub(b"events.sku.K", received(n))  # a valid event right after each
            # A valid event whose header block has a status line that is not UTF-8 (nats-py's
            # header parser decodes that one strictly): applied, as any valid event.
            await raw.hpub(b"events.sku.K", b"NATS/1.0 \xff\xfe\r\n\r\n", received(10))
            await raw.flush()
        await settle(nats_server.url, cfg, rt)
        nc = await nats.connect(nats_server.url)
        try:
            got = await state(nc, "K")
        finally:
            await nc.close()
        assert got["seq"] == 2 * len(bad) + 1
        assert got["state"]["locations"]["X"]["on_hand"] == sum(range(1, len(bad) + 1)) + 10
        # The cache keeps the reason of each bad subject, not the exception that gave it.
        cache = rt.partitions[0]._subjects
        rejected = {k: v for k, v in cache.items() if not isinstance(v, tuple)}
        assert set(rejected) == set(bad)
        for v in rejected.values():
            assert type(v) is Rejected
            assert v.code == "bad_subject"
            assert v.detail
            assert not any(isinstance(x, BaseException) for x in (v.subject, v.code, v.detail))
        await check_against_fold(nats_server.url, cfg)
    dead = await read_stream(nats_server.url, "DEADLETTER")
    assert [m.headers["Router-Error"] for m in dead] == ["bad_subject"] * len(bad)
    assert [m.headers["Router-Subject"] for m in dead] == [s.decode("utf-8", "backslashreplace") for s in bad]
    assert [m.headers["Router-Seq"] for m in dead] == [str(2 * i + 1) for i in range(len(bad))]
    assert all(m.data == received(1) for m in dead)


async def test_forged_deliveries_to_the_router_inboxes_are_ignored(nats_server: Any, tmp_path: Path) -> None:
    """A client that learned a partition's or the publisher's inbox (they travel in clear) and
    publishes there, with a subject or a status line that is not UTF-8. (A client cannot publish
    with an ack subject as its reply: nats-server refuses that.)"""
    cfg = make_config(nats_server.url, tmp_path)
    async with running_router(cfg) as rt:
        inbox = rt.partitions[0].pulls.inbox.encode()
        acks = rt.publisher._prefix.encode()
        async with RawClient(nats_server.port) as raw:
            await raw.pub(inbox + b".\xff", b"x")
            await raw.hpub(inbox + b".1", b"NATS/1.0 \xff\r\n\r\n")
            await raw.pub(acks + b".\xff\xfe", b"{}")
            await raw.flush()
        nc = await nats.connect(nats_server.url)
        try:
            await nc.publish("events.sku.F", received(4))
            await wait_for(lambda: _seq_is(nc, "F", 1), timeout=20)
        finally:
            await nc.close()
        assert rt.partitions[0].applied_seq == 1
