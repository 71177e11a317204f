"""The Bloom filter of stored keys: no false negatives, and a saved filter is trusted once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from router.engine.keyfilter import KeyFilter
from snapshots import Store
from tests.support.harness import make_config, publish_all, query_state, running_router, settle


def test_no_false_negatives_and_few_false_positives() -> None:
    f = KeyFilter(capacity=20_000)
    f.ready = True
    keys = [("sku", f"SKU-{i}") for i in range(20_000)]
    for k in keys:
        f.add(k)
    assert all(k in f for k in keys)
    others = sum(("sku", f"OTHER-{i}") in f for i in range(20_000))
    assert others < 20_000 * 0.03


def test_a_dump_loads_into_a_new_filter_only_when_it_fits() -> None:
    f = KeyFilter(capacity=1000)
    f.add(("shipment", "S-1"))
    g = KeyFilter(capacity=1000)
    assert g.load(f.dump())
    assert g.ready
    assert ("shipment", "S-1") in g
    assert g.count == 1
    assert not KeyFilter(capacity=100_000).load(f.dump())
    assert not KeyFilter(capacity=1000).load(b"garbage")


@pytest.mark.anyio
async def test_a_graceful_stop_saves_the_filter_and_the_next_start_takes_it(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path, snapshots={"resident_actors": 100})
    events = [
        (f"events.sku.K{i}", b'{"type":"received","location":"L","qty":%d,"ts":"2026-11-20T10:00:00Z"}' % (i + 1))
        for i in range(300)
    ]
    async with running_router(cfg) as rt:
        await publish_all(nats_server.url, events)
        await settle(nats_server.url, cfg, rt)
    store = await Store.open(cfg.snapshot_path)
    try:
        assert await store.take_blob("key_filter:0") is not None
        await store.save_blob("key_filter:0", b"kf1:0:0:")  # a filter that does not fit: ignored
    finally:
        await store.close()
    async with running_router(cfg) as rt:
        assert not rt.partitions[0].stored.ready or rt.partitions[0].stored.count >= 300
        await publish_all(nats_server.url, [events[0]])  # K0 again: its stored state must be found
        await settle(nats_server.url, cfg, rt)
        state = await query_state(nats_server.url, "sku", "K0")
        assert state["state"]["available"] == 2
    async with running_router(cfg) as rt:
        assert rt.partitions[0].stored.ready  # restored from the filter the last stop saved
        await publish_all(nats_server.url, [events[1]])
        await settle(nats_server.url, cfg, rt)
        assert (await query_state(nats_server.url, "sku", "K1"))["state"]["available"] == 4
