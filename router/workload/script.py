"""The scripted first minute: the demo incidents a new user sees fire."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from contracts.times import rfc3339
from router.workload.catalog import (
    CARRIERS,
    DESTINATIONS,
    HOT_LOCATION,
    HOT_SKU,
    SEC,
    SPIKE_SKU,
    Item,
    Payload,
)
from router.workload.day import Day, Shipment


def schedule_incidents(day: Day, t0: int) -> int:
    """Schedule the demo incidents; return how many campaigns it starts."""
    rng = day.rng
    s = SEC
    other = next(k for k in day.ranked if k not in (HOT_SKU, SPIKE_SKU))

    # A hot serum with 14 units at one dark store, promoted by a campaign, sells out;
    # two orders race past zero (oversold) and are cancelled; a restock clears it all.
    day.held[HOT_SKU] = True
    day.at(
        t0 + s,
        lambda t: day.start_campaign(t, "CMP-GLOW-SERUM", [HOT_SKU, other], cpa_limit=400.0, true_cpa=45.0),
    )
    for k in range(16):

        def hot_order(t: int, k: int = k) -> Item:
            item = day.order(t, HOT_SKU, HOT_LOCATION, 1)
            oid = msgspec.json.decode(item[1])["order_id"]
            if k < 14:
                day.at(t + int(rng.uniform(2, 5) * s), day.pick(HOT_SKU, HOT_LOCATION, 1, oid))
            else:
                day.at(t0 + 30 * s + k * s // 10, day.cancel(HOT_SKU, HOT_LOCATION, 1, oid))
            return item

        day.at(t0 + 3 * s + k * 11 * s // 10, hot_order)
    day.at(t0 + 48 * s, day.receive(HOT_SKU, HOT_LOCATION, 60))
    day.at(t0 + 50 * s, _release(day, HOT_SKU))

    # Retargeting with poor conversion: over its CPA limit once spend passes 100.
    day.at(
        t0 + s + s // 10,
        lambda t: day.start_campaign(t, "CMP-RETARGET-CART", [other], cpa_limit=120.0, true_cpa=350.0),
    )
    for k in range(14):
        day.at(t0 + 2 * s + k * 8 * s // 10, lambda t: day.campaign_activity(t, "CMP-RETARGET-CART", 9.5))

    # A flash sale that spends its budget in about half a minute.
    day.at(
        t0 + s + s // 5,
        lambda t: day.start_campaign(t, "CMP-FLASH-SALE", [other], budget=250.0, true_cpa=40.0),
    )
    for k in range(36):
        day.at(t0 + 5 * s + k * 8 * s // 10, lambda t: day.campaign_activity(t, "CMP-FLASH-SALE", 12.0))

    # Shipments: delayed past the promise, a cold-chain excursion, a failed attempt,
    # and one that never moves again after pickup (missed promise, by timer).
    day.at(
        t0 + s // 2,
        lambda t: _demo_shipment(
            day,
            t,
            "SHP-DEMO-DELAY",
            150,
            [
                (4, "picked_up", {"location": "DEL-WH-1"}),
                (8, "in_transit", {"location": "DEL-HUB-1", "eta": rfc3339(t0 + 140 * s)}),
                (14, "delayed", {"eta": rfc3339(t0 + 240 * s), "reason": "hub_congestion"}),
                (200, "out_for_delivery", {}),
                (240, "delivered", {}),
            ],
        ),
    )
    day.at(
        t0 + s,
        lambda t: _demo_shipment(
            day,
            t,
            "SHP-DEMO-COLD",
            120,
            [
                (3, "picked_up", {"location": "BLR-WH-1"}),
                (6, "temperature", {"celsius": 4.1}),
                (20, "temperature", {"celsius": 9.8}),
                (35, "temperature", {"celsius": 5.2}),
                (50, "in_transit", {"location": "BLR-HUB-2"}),
                (80, "out_for_delivery", {}),
                (95, "delivered", {}),
            ],
            cold=True,
        ),
    )
    day.at(
        t0 + 3 * s // 2,
        lambda t: _demo_shipment(
            day,
            t,
            "SHP-DEMO-NDR",
            150,
            [
                (5, "picked_up", {"location": "MUM-WH-1"}),
                (12, "in_transit", {"location": "MUM-HUB-3"}),
                (25, "out_for_delivery", {}),
                (32, "delivery_failed", {"reason": "customer_unreachable"}),
                (70, "out_for_delivery", {}),
                (80, "delivered", {}),
            ],
        ),
    )
    day.at(
        t0 + 2 * s,
        lambda t: _demo_shipment(
            day,
            t,
            "SHP-DEMO-STUCK",
            45,
            [
                (5, "picked_up", {"location": "HYD-DS-1"}),
                (9, "in_transit", {"location": "NAG-HUB-1"}),
            ],
        ),
    )

    # A kurta that runs small: a dozen returns in half a minute.
    for k in range(12):
        day.at(t0 + 20 * s + 2 * k * s, lambda t: day.returned(t, SPIKE_SKU, "size_runs_small"))
    return 3


def _release(day: Day, key: str) -> Callable[[int], None]:
    def run(t: int) -> None:
        day.held.pop(key, None)

    return run


def _demo_shipment(
    day: Day, t: int, key: str, window_s: int, scans: list[tuple[int, str, Payload]], cold: bool = False
) -> Item:
    promised = day.now_us + window_s * SEC
    day.shipments[key] = day.undelivered[key] = Shipment(key=key, promised_by=promised, cold=cold)
    for offset, etype, scan in scans:
        final = etype == "delivered"
        day.at(day.now_us + offset * SEC, day.scan(key, etype, scan, final=final))
    fields: Payload = {
        "promised_by": rfc3339(promised),
        "carrier": day.rng.choice(CARRIERS),
        "origin": "DEL-WH-1",
        "destination": day.rng.choice(DESTINATIONS),
    }
    if cold:
        fields["temp_min"], fields["temp_max"] = 2.0, 8.0
    if not scans or scans[-1][1] != "delivered":
        day.at(promised + 30 * SEC, day.forget(key))
    return day.emit("shipment", key, t, "booked", **fields)
