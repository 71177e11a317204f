"""`settings` events and the future-`ts` guard end to end, against a real nats-server (CONTRACT 2, 2.4, 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import (
    check_against_fold,
    check_states,
    make_config,
    now_us,
    publish_all,
    query_state,
    running_router,
    settle,
    timed_event,
)
from tests.support.oracle import read_stream
from tests.support.procs import (
    router_process,
    settle_process,
    settled_exactly_once,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.anyio

S = 1_000_000
MIN = 60 * S
H = 60 * MIN


ev = timed_event


async def exceptions(url: str) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in await read_stream(url, "EXCEPTIONS")]


def brief(excs: list[dict[str, Any]], rule: str = "low_stock") -> list[tuple[Any, ...]]:
    return [(e["status"], e["location"], e["value"], e["threshold"]) for e in excs if e["rule"] == rule]


async def test_thresholds_per_location_raise_and_clear_as_the_contract_says(nats_server: Any, tmp_path: Path) -> None:
    """A dark store with 6 units and a warehouse with 600 of one SKU: one global threshold fits neither."""
    url = nats_server.url
    cfg = make_config(url, tmp_path)
    t = now_us() - H
    async with running_router(cfg) as rt:
        await publish_all(
            url,
            [
                ev("sku", "SERUM-30", t, type="received", location="BLR-DS-4", qty=6),
                ev("sku", "SERUM-30", t, type="received", location="BLR-WH-1", qty=600),
                # The warehouse reorders at 100, the dark store at 8: both raise at once.
                ev("sku", "SERUM-30", t + S, type="settings", location="BLR-WH-1", low_stock_threshold=650),
                ev("sku", "SERUM-30", t + S, type="settings", location="BLR-DS-4", low_stock_threshold=8),
                # A setting for a location not seen yet waits for it.
                ev("sku", "SERUM-30", t + S, type="settings", location="DEL-DS-9", low_stock_threshold=3),
                ev("sku", "SERUM-30", t + 2 * S, type="received", location="DEL-DS-9", qty=3),
                # The warehouse threshold drops below its stock: cleared by the settings event.
                ev("sku", "SERUM-30", t + 3 * S, type="settings", location="BLR-WH-1", low_stock_threshold=100),
                # SKU-wide 2 does not touch locations with their own threshold.
                ev("sku", "SERUM-30", t + 4 * S, type="settings", low_stock_threshold=2),
                # The dark store's own threshold is reset: it inherits the SKU's 2, and clears.
                ev("sku", "SERUM-30", t + 5 * S, type="settings", location="BLR-DS-4", reset=["low_stock_threshold"]),
                ev("sku", "SERUM-30", t + 6 * S, type="picked", location="BLR-DS-4", qty=4, order_id="o1"),
                # Invalid: a SKU-wide-only field with a location, a field both set and reset.
                ev("sku", "SERUM-30", t + 7 * S, type="settings", location="BLR-DS-4", return_spike_ratio=1),
                ev("sku", "SERUM-30", t + 7 * S, type="settings", low_stock_threshold=1, reset=["low_stock_threshold"]),
            ],
        )
        await settle(url, cfg, rt)
        reply = await query_state(url, "sku", "SERUM-30")
        exp = await check_against_fold(url, cfg)
        await check_states(url, exp)
    excs = [e for e in await exceptions(url) if e["key"] == "SERUM-30"]
    # 6 > the config's 5 and 600 > 5 at first: nothing until the settings events.
    assert brief(excs) == [
        ("raised", "BLR-WH-1", 600, 650),
        ("raised", "BLR-DS-4", 6, 8),
        ("raised", "DEL-DS-9", 3, 3),  # its first event, with the setting that waited for it
        ("cleared", "BLR-WH-1", 600, 100),
        ("cleared", "BLR-DS-4", 6, 2),
        ("raised", "BLR-DS-4", 2, 2),
    ]
    settings_seqs = {e["seq"] for e in excs if e["status"] == "cleared"}
    assert len(settings_seqs) == 2  # each clear caused by its settings event's sequence
    state = reply["state"]
    assert state["settings"] == {
        "low_stock_threshold": 2,
        "locations": {"BLR-WH-1": {"low_stock_threshold": 100}, "DEL-DS-9": {"low_stock_threshold": 3}},
    }
    locs = state["locations"]
    assert (locs["BLR-DS-4"]["low_stock_threshold"], locs["BLR-DS-4"]["low_stock_threshold_from"]) == (2, "entity")
    assert (locs["BLR-WH-1"]["low_stock_threshold"], locs["BLR-WH-1"]["low_stock_threshold_from"]) == (100, "location")
    assert state["effective"]["low_stock_threshold"] == {"value": 2, "from": "entity"}
    assert state["effective"]["return_spike_min_units"] == {"value": 10, "from": "config"}
    assert {"rule": "low_stock", "location": "BLR-DS-4"} in reply["exceptions"]
    dead = await read_stream(url, "DEADLETTER")
    assert [m.headers["Router-Error"] for m in dead] == ["invalid", "invalid"]
    assert "`$.return_spike_ratio`" in dead[0].headers["Router-Detail"]
    assert "both set and reset" in dead[1].headers["Router-Detail"]
    assert exp.states[("sku", "SERUM-30")].seq == reply["seq"]


async def test_settings_survive_sigkill_and_restart(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    cfg = write_config(
        tmp_path / "config.toml",
        url,
        rules={"max_future_skew": "1h"},
        snapshots={"every": "100ms"},
    )
    t = now_us() - H
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(url, rp)
        await publish_all(
            url,
            [
                ev("sku", "SKU-K", t, type="received", location="DS", qty=20),
                ev("sku", "SKU-K", t, type="settings", location="DS", low_stock_threshold=15),
                ev("sku", "SKU-K", t, type="settings", return_spike_min_units=2),
                ev("shipment", "SHP-K", t, type="settings", stall_after="90m"),
                ev("campaign", "CAMP-K", t, type="settings", cpa_min_spend=5.0, budget=10.0),
            ],
        )
        await settle_process(url, cfg, rp)
        before = {k: await query_state(url, *k) for k in (("sku", "SKU-K"), ("shipment", "SHP-K"), ("campaign", "CAMP-K"))}
        rp.kill()
        # While it is down: more settings, and an event that crosses the per-location threshold.
        await publish_all(
            url,
            [
                ev("sku", "SKU-K", t + S, type="settings", location="DS", low_stock_threshold=25),
                ev("sku", "SKU-K", t + 2 * S, type="picked", location="DS", qty=1, order_id="o"),
            ],
        )
        rp.start()
        await wait_healthy(url, rp)
        exp = await settled_exactly_once(url, cfg, rp)
        after = {k: await query_state(url, *k) for k in before}
        rp.kill()
        rp.start()
        await wait_healthy(url, rp)
        await settle_process(url, cfg, rp)
        again = {k: await query_state(url, *k) for k in before}
    assert before[("shipment", "SHP-K")]["state"]["settings"] == {"stall_after": "90m"}
    assert before[("campaign", "CAMP-K")]["state"]["settings"] == {"budget": 10.0, "cpa_min_spend": 5.0}
    sku = after[("sku", "SKU-K")]["state"]
    assert sku["settings"] == {"return_spike_min_units": 2, "locations": {"DS": {"low_stock_threshold": 25}}}
    assert sku["locations"]["DS"]["low_stock_threshold"] == 25
    assert after == again  # a second crash restores the same
    assert after[("shipment", "SHP-K")] == before[("shipment", "SHP-K")]
    excs = [e for e in await exceptions(url) if e["key"] == "SKU-K"]
    assert brief(excs) == [("raised", "DS", 20, 25)]  # once, caused by the settings event
    assert exp.states[("sku", "SKU-K")].settings is not None
