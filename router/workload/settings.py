"""Thresholds set live and clocks from the future in the seeded day (CONTRACT 2, 2.4).

A planner moves a dark store's reorder point, a carrier desk lengthens a shipment's
`stall_after`, a growth team sets a campaign's CPA floor; now and then a settings event is
wrong (a SKU-wide field with a location, a field both set and reset) and one producer's clock
runs days ahead. All drawn from the day's own random generator: the same seed, the same day.
"""

from __future__ import annotations

import random
from typing import Any, Final, Protocol

from router.workload.catalog import SEC, Item


class Day(Protocol):
    """What is used here of `router.workload.day.Day` (which imports this module)."""

    rng: random.Random
    stock: dict[str, dict[str, Any]]
    undelivered: dict[str, Any]
    active_campaigns: list[str]
    campaigns: dict[str, Any]

    def popular_sku(self) -> str: ...

    def emit(self, kind: str, key: str, t: int, etype: str, **fields: Any) -> Item: ...

# Far beyond any sensible `[rules] max_future_skew`: always dead-lettered `invalid`.
FUTURE_US: Final = 30 * 86_400 * SEC
STALL_AFTER: Final = ("45m", "2h", "8h", "1.5d")


def settings_event(day: Day, t: int) -> Item:
    """A valid `settings` event for a SKU location, a SKU, a shipment under way or a campaign."""
    rng = day.rng
    r = rng.random()
    if r < 0.45 or (r >= 0.7 and not day.undelivered and not day.active_campaigns):
        key = day.popular_sku()
        loc = rng.choice(list(day.stock[key]))
        if rng.random() < 0.25:
            return day.emit("sku", key, t, "settings", location=loc, reset=["low_stock_threshold"])
        point = day.stock[key][loc].reorder_point
        return day.emit("sku", key, t, "settings", location=loc, low_stock_threshold=rng.randint(2, point))
    if r < 0.7:
        key = day.popular_sku()
        if rng.random() < 0.25:
            return day.emit("sku", key, t, "settings", reset=["return_spike_min_units", "low_stock_threshold"])
        return day.emit(
            "sku", key, t, "settings", low_stock_threshold=rng.randint(3, 12), return_spike_min_units=rng.randint(5, 20)
        )
    if r < 0.85 and day.undelivered:
        key = rng.choice(list(day.undelivered))
        if rng.random() < 0.2:
            return day.emit("shipment", key, t, "settings", reset=["stall_after"])
        return day.emit("shipment", key, t, "settings", stall_after=rng.choice(STALL_AFTER))
    key = rng.choice(day.active_campaigns) if day.active_campaigns else rng.choice(list(day.campaigns) or ["CAMP-0"])
    return day.emit("campaign", key, t, "settings", cpa_min_spend=float(rng.randint(20, 200)))


def bad_settings_or_future(day: Day, t: int, sku: str, loc: str) -> Item:
    """An event the router dead-letters `invalid`: a wrong settings event, or a ts from the future."""
    rng = day.rng
    choice = rng.randrange(3)
    if choice == 0:  # a SKU-wide-only field with a location
        return day.emit("sku", sku, t, "settings", location=loc, return_spike_ratio=0.5)
    if choice == 1:  # a field both set and reset
        return day.emit("sku", sku, t, "settings", low_stock_threshold=4, reset=["low_stock_threshold"])
    # A device clock weeks ahead: it must not move the SKU's return window.
    return day.emit("sku", sku, t + FUTURE_US, "returned", location=loc, qty=1)
