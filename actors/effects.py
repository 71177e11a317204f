"""What every actor returns: effects (alerts, messages to other actors, timers) and thresholds."""

from __future__ import annotations

from typing import Any, Final, Literal, Union

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
    # `[rules.shipment] stall_after` as written (see stall_after_text).
    stall_after: str = "6h"
    # `[rules.shipment.carriers]`: carrier -> stall_after, in microseconds and as written.
    carriers_us: dict[str, int] = {}
    carriers: dict[str, str] = {}
    cpa_min_spend: float = 100.0

    @classmethod
    def from_rules(cls, rules: RulesConfig) -> Thresholds:
        carriers = rules.shipment.carriers
        return cls(
            low_stock_threshold=rules.sku.low_stock_threshold,
            return_window_hours=rules.sku.return_window_hours,
            return_spike_min_units=rules.sku.return_spike_min_units,
            return_spike_ratio=rules.sku.return_spike_ratio,
            stall_after_us=duration_us(rules.shipment.stall_after),
            stall_after=rules.shipment.stall_after,
            carriers_us={carrier: duration_us(text) for carrier, text in carriers.items()},
            carriers=dict(carriers),
            cpa_min_spend=rules.campaign.cpa_min_spend,
        )


    def stall_after_text(self) -> str:
        """`stall_after` as written, or stall_after_us as a duration when they disagree."""
        text = self.stall_after
        if text and duration_us(text) == self.stall_after_us:
            return text
        return format_duration(self.stall_after_us)


_UNITS: Final = (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000), ("ms", 1_000))


def format_duration(us: int) -> str:
    """A duration in the config's notation: the largest unit that divides it (`90m`, `6h`, `250us`)."""
    for unit, size in _UNITS:
        if us and us % size == 0:
            return f"{us // size}{unit}"
    return f"{us}us"


class ActorError(Exception):
    """Applying an event failed inside an actor (a defect); the event is dead-lettered."""
