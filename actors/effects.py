"""What every actor returns: effects (alerts, messages to other actors, timers) and thresholds."""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from contracts.config import RulesConfig, duration_us
from contracts.exceptions import Number


class Alert(msgspec.Struct, frozen=True, gc=False):
    """Raise or clear one rule; the router turns it into an exception payload and id."""

    rule: str
    status: Literal["raised", "cleared"]
    location: str | None
    value: Number | None
    threshold: Number | None
    message: str


class Send(msgspec.Struct, frozen=True, gc=False):
    """An event for another actor, published on `events.<kind>.<key>`.

    `event` is a contracts.events Struct (for example SkuOutOfStock) carrying the `ts` of
    the event that caused it.
    """

    kind: str
    key: str
    event: Any


class SetTimer(msgspec.Struct, frozen=True, gc=False):
    """Set (or with `deadline_us=None`, cancel) the actor's wall-clock timer `name`."""

    name: str
    deadline_us: int | None


Effect = Union[Alert, Send, SetTimer]


class Thresholds(msgspec.Struct, frozen=True, kw_only=True):
    """`[rules.*]` of the config, prepared once for the hot path."""

    low_stock_threshold: int = 5
    return_window_hours: int = 24
    return_spike_min_units: int = 10
    return_spike_ratio: float = 0.2
    stall_after_us: int = 6 * 3600 * 1_000_000
    cpa_min_spend: float = 100.0

    @classmethod
    def from_rules(cls, rules: RulesConfig) -> Thresholds:
        return cls(
            low_stock_threshold=rules.sku.low_stock_threshold,
            return_window_hours=rules.sku.return_window_hours,
            return_spike_min_units=rules.sku.return_spike_min_units,
            return_spike_ratio=rules.sku.return_spike_ratio,
            stall_after_us=duration_us(rules.shipment.stall_after),
            cpa_min_spend=rules.campaign.cpa_min_spend,
        )


class ActorError(Exception):
    """Applying an event failed inside an actor (a defect); the event is dead-lettered."""
