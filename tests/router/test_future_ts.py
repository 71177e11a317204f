"""The future-`ts` guard end to end (CONTRACT section 2): dead-lettered `invalid` with the skew named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contracts.times import rfc3339
from tests.support.harness import (
    check_against_fold,
    make_config,
    now_us,
    publish_all,
    query_state,
    running_router,
    settle,
    timed_event,
)
from tests.support.oracle import read_stream

pytestmark = pytest.mark.anyio

S = 1_000_000
MIN = 60 * S
H = 60 * MIN


ev = timed_event


async def test_a_ts_from_the_future_is_dead_lettered_with_its_skew(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    cfg = make_config(url, tmp_path)  # max_future_skew: the default 1h
    assert cfg.rules.max_future_skew == "1h"
    now = now_us()
    async with running_router(cfg) as rt:
        # A window's worth of picks and returns, just below the spike.
        await publish_all(
            url,
            [
                ev("sku", "SKU-R", now - 10 * MIN, type="received", location="A", qty=100),
                ev("sku", "SKU-R", now - 9 * MIN, type="picked", location="A", qty=20, order_id="o"),
                ev("sku", "SKU-R", now - 8 * MIN, type="returned", location="A", qty=8),
            ],
        )
        await settle(url, cfg, rt)
        now = now_us()
        await publish_all(
            url,
            [
                ev("sku", "SKU-R", now + 2 * H, type="returned", location="A", qty=1),
                ev("sku", "SKU-R", now + 5 * H + 30 * MIN, type="received", location="A", qty=1),
                ("events.sku.SKU-R", b'{"type":"adjusted","location":"A","delta":1,"ts":"9999-12-31T23:59:59Z"}'),
                ev("shipment", "SHP-F", now + 3 * H, type="picked_up"),
                ev("sku", "SKU-R", now + 50 * MIN, type="returned", location="A", qty=1),
            ],
        )
        await settle(url, cfg, rt)
        # The window did not move to a future hour: two more returns make the spike.
        await publish_all(url, [ev("sku", "SKU-R", now_us(), type="returned", location="A", qty=1)])
        await settle(url, cfg, rt)
        reply = await query_state(url, "sku", "SKU-R")
        ship = await query_state(url, "shipment", "SHP-F")
    events = {m.seq: m for m in await read_stream(url, "EVENTS")}
    dead = await read_stream(url, "DEADLETTER")
    assert [m.headers["Router-Error"] for m in dead] == ["invalid"] * 4
    details = [m.headers["Router-Detail"] for m in dead]
    for m, ahead in zip(dead, (2 * H, 5 * H + 30 * MIN, None, 3 * H), strict=True):
        orig = events[int(m.headers["Router-Seq"])]
        assert m.data == orig.data
        ts = json.loads(orig.data)["ts"]
        skew = _us(ts) - (orig.ts_ns + 500) // 1000
        assert m.headers["Router-Detail"] == f"`$.ts` is {_skew_text(skew)} ahead of the stream time"
        if ahead is not None:
            assert abs(skew - ahead) < 5 * S
    assert details[0].startswith("`$.ts` is 2h ahead") or details[0].startswith("`$.ts` is 1h59m")
    assert details[1].startswith("`$.ts` is 5h30m ahead") or details[1].startswith("`$.ts` is 5h29m")
    assert "d" in details[2].split(" ")[2]  # thousands of days
    # The one 50 minutes ahead was applied; the window is that event's hour at most.
    assert reply["state"]["returned_in_window"] == 10
    assert reply["exceptions"] == [{"rule": "return_spike", "location": None}]
    assert reply["state"]["locations"]["A"]["on_hand"] == 100 - 20 + 8 + 1 + 1
    assert ship["seq"] == 0  # its only event was dead-lettered: never seen
    excs = [json.loads(m.data) for m in await read_stream(url, "EXCEPTIONS")]
    spikes = [e for e in excs if e["rule"] == "return_spike"]
    assert [e["status"] for e in spikes] == ["raised"]
    await check_against_fold(url, cfg)


def _us(text: str) -> int:
    """Epoch microseconds of an RFC 3339 time, decoded as the contract decodes times."""
    import datetime as dt

    import msgspec

    from contracts.times import to_us

    return to_us(msgspec.json.decode(json.dumps(text).encode(), type=dt.datetime))


def _skew_text(us: int) -> str:
    from contracts.times import skew_text

    return skew_text(us)


async def test_the_skew_is_configurable_and_guards_settings_events_too(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    cfg = make_config(url, tmp_path, rules={"max_future_skew": "10m"})
    now = now_us()
    async with running_router(cfg) as rt:
        await publish_all(
            url,
            [
                ev("sku", "SKU-S", now + 20 * MIN, type="settings", low_stock_threshold=50),
                ev("sku", "SKU-S", now + 5 * MIN, type="received", location="A", qty=7),
                ev("shipment", "SHP-S", now + 11 * MIN, type="booked", promised_by=rfc3339(now + 9 * H)),
                # No ts: the stream time is the event time, never ahead.
                ("events.campaign.CAMP-S", b'{"type":"started"}'),
            ],
        )
        await settle(url, cfg, rt)
        sku = await query_state(url, "sku", "SKU-S")
        ship = await query_state(url, "shipment", "SHP-S")
        camp = await query_state(url, "campaign", "CAMP-S")
    dead = await read_stream(url, "DEADLETTER")
    assert [(m.headers["Router-Subject"], m.headers["Router-Error"]) for m in dead] == [
        ("events.sku.SKU-S", "invalid"),
        ("events.shipment.SHP-S", "invalid"),
    ]
    assert all(m.headers["Router-Detail"].startswith("`$.ts` is ") for m in dead)
    assert sku["state"]["settings"] == {}  # the settings event never applied
    assert sku["exceptions"] == []  # 7 > the config's 5
    assert ship["seq"] == 0
    assert camp["state"]["active"] is True
    await check_against_fold(url, cfg)
