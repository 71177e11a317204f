"""The router end to end against a real nats-server: state, exceptions, dead letters, actor messages, restart."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from tests.support.harness import (
    check_against_fold,
    check_states,
    make_config,
    publish_all,
    query_state,
    running_router,
    settle,
)
from tests.support.oracle import read_stream

pytestmark = pytest.mark.anyio

T0 = "2026-11-20T10:00:00Z"
# The seeded workloads start here; a router whose clock stands still at this instant fires no
# wall-clock timer, so its outputs are exactly what the fold of the stream implies.
NOW_US = 1_790_000_000_000_000


def frozen_clock() -> int:
    return NOW_US


def ev(kind: str, key: str, **payload: Any) -> tuple[str, bytes]:
    payload.setdefault("ts", T0)
    return f"events.{kind}.{key}", json.dumps(payload).encode()


async def test_stockout_reaches_campaign_and_state(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path)
    async with running_router(cfg) as rt:
        await publish_all(
            nats_server.url,
            [
                ev("sku", "SKU-1", type="received", location="BLR-DS-4", qty=3),
                ev("campaign", "CAMP-1", type="started", skus=["SKU-1"], cpa_limit=50.0),
                ev("sku", "SKU-1", type="ordered", location="BLR-DS-4", qty=3, order_id="o1"),
            ],
        )
        await settle(nats_server.url, cfg, rt)
        state = await query_state(nats_server.url, "sku", "SKU-1")
        loc = state["state"]["locations"]["BLR-DS-4"]
        assert (loc["on_hand"], loc["reserved"], loc["available"]) == (3, 3, 0)
        assert state["state"]["available"] == 0
        assert state["state"]["campaigns"] == ["CAMP-1"]
        assert {"rule": "stockout", "location": "BLR-DS-4"} in state["exceptions"]
        camp = await query_state(nats_server.url, "campaign", "CAMP-1")
        assert camp["state"]["out_of_stock_skus"] == ["SKU-1"]
        assert camp["exceptions"] == [{"rule": "promoting_out_of_stock", "location": None}]
        unknown = await query_state(nats_server.url, "shipment", "NOPE")
        assert unknown == {"kind": "shipment", "key": "NOPE", "seq": 0, "state": None, "exceptions": []}
    exp = await check_against_fold(nats_server.url, cfg)
    exceptions = [json.loads(m.data) for m in await read_stream(nats_server.url, "EXCEPTIONS")]
    stockout = next(e for e in exceptions if e["rule"] == "stockout")
    assert stockout["id"] == f"sku:SKU-1:stockout:BLR-DS-4:raised:{stockout['seq']}"
    assert stockout["severity"] == "critical"
    assert stockout["value"] == 0
    assert stockout["threshold"] == 0
    assert stockout["event_ts"] == T0
    assert stockout["detected_at"].endswith("Z")
    promo = next(e for e in exceptions if e["rule"] == "promoting_out_of_stock")
    assert promo["value"] == 1
    assert promo["threshold"] is None
    assert promo["location"] is None
    assert len(exp.message_ids) >= 2  # campaign_linked, sku_out_of_stock


BAD_INPUT = [
    ("events.sku.A", b"{not json", "malformed"),
    ("events.sku.A", b"\xef\xbb\xbf{\"type\":\"received\"}", "malformed"),
    ("events.sku.A", b'{"type":"received","location":"X","qty":NaN}', "malformed"),
    ("events.sku.A", b"[1,2]", "malformed"),
    ("events.sku.A", b'{"location":"X","qty":1}', "invalid"),
    ("events.sku.A", b'{"type":7}', "invalid"),
    ("events.sku.A", b'{"type":"teleported"}', "unknown_type"),
    ("events.sku.A", b'{"type":"received","location":"X","qty":2.5}', "invalid"),
    ("events.sku.A", b'{"type":"received","location":"X","qty":"2"}', "invalid"),
    ("events.sku.A", b'{"type":"received","location":"X","qty":1,"ts":"2026-01-01T00:00:00"}', "invalid"),
    ("events.sku.A.extra", b'{"type":"received","location":"X","qty":1}', "bad_subject"),
    ("events.pallet.A", b'{"type":"received","location":"X","qty":1}', "bad_subject"),
    ("events.sku.bad$key", b'{"type":"received","location":"X","qty":1}', "bad_subject"),
    ("events.sku.A", b"\xff\xfe garbage", "malformed"),
]


async def test_bad_input_is_dead_lettered_and_later_events_apply(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path)
    good = ev("sku", "A", type="received", location="X", qty=7)
    async with running_router(cfg) as rt:
        await publish_all(nats_server.url, [(s, d) for s, d, _ in BAD_INPUT] + [good])
        await settle(nats_server.url, cfg, rt)
        state = await query_state(nats_server.url, "sku", "A")
        assert state["state"]["available"] == 7
        assert state["seq"] == len(BAD_INPUT) + 1
    dead = await read_stream(nats_server.url, "DEADLETTER")
    assert [m.headers["Router-Error"] for m in dead] == [code for _, _, code in BAD_INPUT]
    for m, (subject, data, _code) in zip(dead, BAD_INPUT, strict=True):
        assert m.data == data
        assert m.headers["Router-Subject"] == subject
        assert m.headers["Nats-Msg-Id"] == f"dead:{m.headers['Router-Seq']}"
        assert m.headers["Router-Detail"]
        kind = subject.split(".")[1]
        assert m.subject == f"deadletter.{kind if kind in ('sku', 'shipment', 'campaign') else 'unknown'}"
    qty_error = next(m for m in dead if m.data.endswith(b'"qty":"2"}'))
    assert qty_error.headers["Router-Detail"] == "Expected `int`, got `str` - at `$.qty`"
    await check_against_fold(nats_server.url, cfg)


async def test_restart_mid_stream_loses_and_repeats_nothing(nats_server: Any, tmp_path: Path) -> None:
    from router.workload import workload

    cfg = make_config(nats_server.url, tmp_path)
    msgs = list(workload(seed=7, count=3000, bad_share=0.02, now_us=NOW_US))
    half = len(msgs) // 2
    async with running_router(cfg, frozen_clock) as rt:
        await publish_all(nats_server.url, msgs[:half])
        await settle(nats_server.url, cfg, rt)
    # Published while the router is down, then a second router picks up from the snapshot.
    await publish_all(nats_server.url, msgs[half:])
    async with running_router(cfg, frozen_clock) as rt:
        await settle(nats_server.url, cfg, rt)
        exp = await check_against_fold(nats_server.url, cfg)
        await check_states(nats_server.url, exp, sample=200)
    assert exp.dead_letters, "the workload has bad input"
    assert exp.exception_ids, "the workload raises exceptions"


async def test_seeded_mixed_workload_matches_the_contract(nats_server: Any, tmp_path: Path) -> None:
    from router.workload import workload

    cfg = make_config(nats_server.url, tmp_path, snapshots={"resident_actors": 100})
    msgs = list(workload(seed=2026, count=6000, bad_share=0.02, now_us=NOW_US))
    rng = random.Random(1)
    async with running_router(cfg, frozen_clock) as rt:
        for i in range(0, len(msgs), 500):
            await publish_all(nats_server.url, msgs[i : i + 500])
            if rng.random() < 0.5:
                await settle(nats_server.url, cfg, rt)
        await settle(nats_server.url, cfg, rt)
        exp = await check_against_fold(nats_server.url, cfg)
        await check_states(nats_server.url, exp)
    bad = sum(1 for _ in exp.dead_letters)
    assert 0.01 * len(msgs) < bad < 0.04 * len(msgs)


async def test_core_and_jetstream_publishes_and_msg_id_dedup(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path)
    async with running_router(cfg) as rt:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        payload = json.dumps({"type": "received", "location": "X", "qty": 4, "ts": T0}).encode()
        await js.publish("events.sku.J", payload, headers={"Nats-Msg-Id": "p-1"})
        await js.publish("events.sku.J", payload, headers={"Nats-Msg-Id": "p-1"})  # deduplicated
        await nc.publish("events.sku.J", payload)
        await nc.flush()
        await nc.close()
        await settle(nats_server.url, cfg, rt)
        state = await query_state(nats_server.url, "sku", "J")
        assert state["state"]["available"] == 8


async def test_pongs_between_messages_lose_nothing(nats_server: Any, tmp_path: Path) -> None:
    """A PONG (or the server's PING) lands between deliveries in the same socket read; what
    follows it must still reach the partition (and the PubAcks the publisher), not nats-py's
    own delivery. nats-py pings every two minutes; here the router's connection is flushed
    (PING, then the server's PONG) every few milliseconds while it catches up."""
    from router.workload import workload

    cfg = make_config(nats_server.url, tmp_path)
    async with running_router(cfg, frozen_clock) as rt:  # creates the streams
        await settle(nats_server.url, cfg, rt)
    msgs = list(workload(seed=11, count=20_000, bad_share=0.01, now_us=NOW_US))
    await publish_all(nats_server.url, msgs)  # a backlog: deliveries come many to a read
    flushes = 0
    caught_up = anyio.Event()
    async with running_router(cfg, frozen_clock) as rt:

        async def ping() -> None:
            nonlocal flushes
            while not caught_up.is_set():
                await rt.nc.flush(timeout=10)
                flushes += 1
                await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ping)
            await settle(nats_server.url, cfg, rt)
            caught_up.set()
        exp = await check_against_fold(nats_server.url, cfg)
        await check_states(nats_server.url, exp, sample=200)
    assert flushes > 20, flushes
    assert exp.exception_ids, "the workload raises exceptions"
    assert exp.dead_letters, "the workload has bad input"


async def test_three_partitions_match_the_contract(nats_server: Any, tmp_path: Path) -> None:
    """Keys spread over three partitions (the stream maps each key to one), each with its own
    consumer, loop and marks; SKU <-> campaign messages cross partitions; a restart halfway.
    Together they do what one does."""
    from router.workload import workload

    cfg = make_config(nats_server.url, tmp_path, router={"partitions": 3}, snapshots={"resident_actors": 100})
    msgs = list(workload(seed=31, count=6000, bad_share=0.02, now_us=NOW_US))
    async with running_router(cfg, frozen_clock) as rt:
        for i in range(0, 3000, 1500):
            await publish_all(nats_server.url, msgs[i : i + 1500])
        await settle(nats_server.url, cfg, rt)
    # Half published while the router is down: each partition resumes from its own marks.
    await publish_all(nats_server.url, msgs[3000:])
    async with running_router(cfg, frozen_clock) as rt:
        await settle(nats_server.url, cfg, rt)
        applied = [p.applied_seq for p in rt.partitions]
        exp = await check_against_fold(nats_server.url, cfg)
        await check_states(nats_server.url, exp, sample=300)
    stored = await read_stream(nats_server.url, cfg.streams.events)
    firsts = {m.subject.split(".")[1] for m in stored}
    assert firsts >= {"0", "1", "2"}, "every partition got events"
    assert firsts - {"0", "1", "2"}, "bad subjects the stream cannot map (dead-lettered by partition 0)"
    assert all(a > 0 for a in applied), applied
    assert exp.exception_ids, "the workload raises exceptions"
    assert exp.message_ids, "SKUs and campaigns send each other messages"
    assert exp.dead_letters, "the workload has bad input"
