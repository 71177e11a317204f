"""The SKU actor: stock per location, the return window, and links to campaigns (CONTRACT 2.1, 3)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Final

import msgspec

from actors.effects import ActorError, Alert, Effect, Send, Thresholds
from contracts.events import (
    SKU_SETTINGS,
    Adjusted,
    CampaignLinked,
    CampaignUnlinked,
    Cancelled,
    Counted,
    Ordered,
    Picked,
    Received,
    Returned,
    SkuBackInStock,
    SkuEvent,
    SkuOutOfStock,
    SkuSettings,
)
from contracts.rules import RULES_BY_KIND
from contracts.times import from_us

HOUR_US: Final = 3_600_000_000

_DEFAULTS: Final = Thresholds()
_RULES: Final = RULES_BY_KIND["sku"]
# The rules kept per location, in RULES order; each is a bool field of LocationState.
_LOCATION_RULES: Final = tuple(r.name for r in _RULES if r.scope == "location")
# What a location rule's alert says when raised, and when cleared, of (key, location, available,
# threshold) (see _cross). f-strings: str.format costs about five times as much.
_Text = Callable[[str, str, int, int], str]
_LOCATION_TEXT: Final[dict[str, tuple[_Text, _Text]]] = {
    "stockout": (
        lambda k, n, a, t: f"{k} out of stock at {n} (available {a})",
        lambda k, n, a, t: f"{k} back in stock at {n} (available {a})",
    ),
    "low_stock": (
        lambda k, n, a, t: f"{k} low stock at {n} (available {a}, threshold {t})",
        lambda k, n, a, t: f"{k} stock recovered at {n} (available {a}, threshold {t})",
    ),
    "oversold": (
        lambda k, n, a, t: f"{k} oversold at {n} (available {a})",
        lambda k, n, a, t: f"{k} no longer oversold at {n} (available {a})",
    ),
}
_LOCATION_EVENTS: Final = frozenset({Received, Ordered, Cancelled, Picked, Returned, Adjusted, Counted})


class LocationState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Counters of one location and which of its location-scoped rules are raised."""

    on_hand: int = 0
    reserved: int = 0
    stockout: bool = False
    low_stock: bool = False
    oversold: bool = False


class SkuOwnSettings(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The SKU's own settings (CONTRACT 2.4); None (or no entry) inherits."""

    low_stock_threshold: int | None = None
    return_spike_min_units: int | None = None
    return_spike_ratio: float | None = None
    # Location -> its own low_stock_threshold (also for a location not seen yet).
    locations: dict[str, int] = {}


class SkuState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One SKU across its locations. Mutated in place by `apply`."""

    key: str
    seq: int = 0
    # Insertion order = first event naming the location.
    locations: dict[str, LocationState] = {}
    # Sum of `available` over locations, kept incrementally.
    available: int = 0
    # For campaigns: sum of available <= 0, or no location yet.
    out_of_stock: bool = True
    # Linked campaign ids, kept sorted.
    campaigns: tuple[str, ...] = ()  # a tuple, not a list: untracked by the cyclic GC
    # Return window: the hour of the latest ts applied, and units per hour inside the window.
    latest_hour: int | None = None
    returned_by_hour: dict[int, int] = {}
    picked_by_hour: dict[int, int] = {}
    returned: int = 0
    picked: int = 0
    return_spike: bool = False
    # Own settings; None when it has none (the common case: one check on the hot path).
    settings: SkuOwnSettings | None = None


def new(key: str) -> SkuState:
    return SkuState(key=key)


def apply(state: SkuState, event: SkuEvent, ts_us: int, th: Thresholds) -> list[Effect]:
    """Apply one event in place; return the alerts and campaign messages it causes."""
    t = type(event)
    effects: list[Effect] = []
    if t is CampaignLinked or t is CampaignUnlinked:
        _link(state, event, ts_us, th, effects)  # type: ignore[arg-type]
        return effects
    if t is SkuSettings:
        _settings(state, event, th, effects)  # type: ignore[arg-type]
        return effects

    if t not in _LOCATION_EVENTS:
        raise ActorError(f"sku:{state.key}: not a sku event: {t.__name__}")
    # Compute the location's new counters before touching the state.
    name: str = event.location  # type: ignore[union-attr,assignment]
    loc = state.locations.get(name)
    if loc is None:
        on_hand = reserved = 0
    else:
        on_hand = loc.on_hand
        reserved = loc.reserved
    old_available = on_hand - reserved
    returned = picked = 0
    if t is Received:
        on_hand += event.qty  # type: ignore[union-attr]
    elif t is Ordered:
        reserved += event.qty  # type: ignore[union-attr]
    elif t is Picked:
        picked = event.qty  # type: ignore[union-attr]
        on_hand -= picked
        reserved = reserved - picked if reserved > picked else 0
    elif t is Cancelled:
        qty = event.qty  # type: ignore[union-attr]
        reserved = reserved - qty if reserved > qty else 0
    elif t is Returned:
        returned = event.qty  # type: ignore[union-attr]
        if event.restockable is not False:  # type: ignore[union-attr]
            on_hand += returned
    elif t is Adjusted:
        on_hand += event.delta  # type: ignore[union-attr]
    else:  # Counted
        on_hand = event.on_hand  # type: ignore[union-attr]
    available = on_hand - reserved
    total = state.available - old_available + available
    out_of_stock = total <= 0
    flips = out_of_stock != state.out_of_stock and bool(state.campaigns)
    when = from_us(ts_us) if flips else None  # the only step that can fail: before mutating

    # Commit.
    if loc is None:
        loc = state.locations[name] = LocationState()
    loc.on_hand = on_hand
    loc.reserved = reserved
    state.available = total

    key = state.key
    # The checks stay inline (every location event makes them); _cross runs only on a crossing.
    if (available <= 0) != loc.stockout:
        _cross(loc, "stockout", key, name, available, 0, effects)
    own = state.settings
    low = th.low_stock_threshold if own is None else _low_stock_threshold(own, name, th)[0]
    if (available <= low) != loc.low_stock:
        _cross(loc, "low_stock", key, name, available, low, effects)
    if (available < 0) != loc.oversold:
        _cross(loc, "oversold", key, name, available, 0, effects)

    hour = ts_us // HOUR_US
    latest = state.latest_hour
    if returned or picked or latest is None or hour > latest:
        _window(state, hour, returned, picked, th, effects)
    # else: the window neither moves nor counts anything new, so return_spike cannot change.

    if out_of_stock != state.out_of_stock:
        state.out_of_stock = out_of_stock
        if when is not None:
            message = (SkuOutOfStock if out_of_stock else SkuBackInStock)(sku=key, ts=when)
            for campaign in state.campaigns:
                effects.append(Send("campaign", campaign, message))
    return effects


def _cross(
    loc: LocationState, rule: str, key: str, name: str, available: int, threshold: int, effects: list[Effect]
) -> None:
    """`available` crossed location rule `rule`: flip it and append the raise or clear."""
    raised = not getattr(loc, rule)
    setattr(loc, rule, raised)
    text = _LOCATION_TEXT[rule][0 if raised else 1](key, name, available, threshold)
    effects.append(Alert(rule, "raised" if raised else "cleared", name, available, threshold, text))


def _low_stock_threshold(own: SkuOwnSettings | None, name: str, th: Thresholds) -> tuple[int, str]:
    """The location's low_stock_threshold and where it comes from: location, else SKU, else config."""
    if own is not None:
        value = own.locations.get(name)
        if value is not None:
            return value, "location"
        if own.low_stock_threshold is not None:
            return own.low_stock_threshold, "entity"
    return th.low_stock_threshold, "config"


def _spike_thresholds(state: SkuState, th: Thresholds) -> tuple[int, float]:
    """return_spike_min_units and return_spike_ratio in effect."""
    own = state.settings
    if own is None:
        return th.return_spike_min_units, th.return_spike_ratio
    minimum, ratio = own.return_spike_min_units, own.return_spike_ratio
    return (
        th.return_spike_min_units if minimum is None else minimum,
        th.return_spike_ratio if ratio is None else ratio,
    )


def _settings(state: SkuState, event: SkuSettings, th: Thresholds, effects: list[Effect]) -> None:
    """Set or reset the SKU's own thresholds, then evaluate every condition again (CONTRACT 2.4).

    Only `low_stock` (at every location) and `return_spike` depend on a setting; the window
    stays where it is: a settings event's `ts` is not an event time for it.
    """
    own = state.settings if state.settings is not None else SkuOwnSettings()
    location = event.location
    if location is None:
        if event.low_stock_threshold is not None:
            own.low_stock_threshold = event.low_stock_threshold
        if event.return_spike_min_units is not None:
            own.return_spike_min_units = event.return_spike_min_units
        if event.return_spike_ratio is not None:
            own.return_spike_ratio = event.return_spike_ratio
        for field in event.reset or ():
            setattr(own, field, None)
    else:  # only low_stock_threshold is per location (the decoder refuses the others)
        if event.low_stock_threshold is not None:
            own.locations[location] = event.low_stock_threshold
        if event.reset:
            own.locations.pop(location, None)
    empty = (
        own.low_stock_threshold is None
        and own.return_spike_min_units is None
        and own.return_spike_ratio is None
        and not own.locations
    )
    state.settings = None if empty else own

    key = state.key
    for name, loc in state.locations.items():
        available = loc.on_hand - loc.reserved
        low = _low_stock_threshold(state.settings, name, th)[0]
        if (available <= low) != loc.low_stock:
            _cross(loc, "low_stock", key, name, available, low, effects)
    _evaluate_spike(state, th, effects)


def _link(
    state: SkuState,
    event: CampaignLinked | CampaignUnlinked,
    ts_us: int,
    th: Thresholds,
    effects: list[Effect],
) -> None:
    campaigns = state.campaigns
    campaign = event.campaign
    i = bisect_left(campaigns, campaign)
    linked = i < len(campaigns) and campaigns[i] == campaign
    send: Send | None = None
    if type(event) is CampaignLinked:
        if not linked:
            if state.out_of_stock:
                send = Send("campaign", campaign, SkuOutOfStock(sku=state.key, ts=from_us(ts_us)))
            state.campaigns = (*campaigns[:i], campaign, *campaigns[i:])
    elif linked:
        state.campaigns = campaigns[:i] + campaigns[i + 1 :]
    # Actor messages are events too: they move the return window.
    _window(state, ts_us // HOUR_US, 0, 0, th, effects)
    if send is not None:
        effects.append(send)


def _window(
    state: SkuState, hour: int, returned: int, picked: int, th: Thresholds, effects: list[Effect]
) -> None:
    """Move the return window to the event's hour, count its units, evaluate `return_spike`."""
    hours = th.return_window_hours
    latest = state.latest_hour
    if latest is None or hour > latest:
        state.latest_hour = latest = hour
        start = hour - hours + 1
        if state.returned_by_hour or state.picked_by_hour:
            _prune(state, start)
    else:
        start = latest - hours + 1
    if hour >= start:
        if returned:
            by_hour = state.returned_by_hour
            by_hour[hour] = by_hour.get(hour, 0) + returned
            state.returned += returned
        if picked:
            by_hour = state.picked_by_hour
            by_hour[hour] = by_hour.get(hour, 0) + picked
            state.picked += picked
    units = state.returned
    if state.settings is None:
        minimum, ratio = th.return_spike_min_units, th.return_spike_ratio
    else:
        minimum, ratio = _spike_thresholds(state, th)
    if (units >= minimum and units >= ratio * state.picked) != state.return_spike:
        effects.append(_flip_spike(state, units, minimum, th))


def _evaluate_spike(state: SkuState, th: Thresholds, effects: list[Effect]) -> None:
    """`return_spike` with the window as it is (after a settings event)."""
    units = state.returned
    minimum, ratio = _spike_thresholds(state, th)
    if (units >= minimum and units >= ratio * state.picked) != state.return_spike:
        effects.append(_flip_spike(state, units, minimum, th))


def _flip_spike(state: SkuState, units: int, minimum: int, th: Thresholds) -> Alert:
    spike = state.return_spike = not state.return_spike
    what = "return spike" if spike else "return spike over"
    msg = (
        f"{state.key} {what}: {units} units returned vs {state.picked} picked "
        f"in the last {th.return_window_hours}h"
    )
    return Alert("return_spike", "raised" if spike else "cleared", None, units, minimum, msg)


def _prune(state: SkuState, start: int) -> None:
    by_hour = state.returned_by_hour
    for h in [h for h in by_hour if h < start]:
        state.returned -= by_hour.pop(h)
    by_hour = state.picked_by_hour
    for h in [h for h in by_hour if h < start]:
        state.picked -= by_hour.pop(h)


def fire(state: SkuState, name: str, deadline_us: int, th: Thresholds) -> list[Effect]:
    """SKUs have no timers: every firing is stale."""
    return []


# Whether `timers` can ever return a deadline: a snapshot skips the timer rows of kinds that keep none.
KEEPS_TIMERS: Final = False


def timers(state: SkuState) -> dict[str, int]:
    return {}


def view(state: SkuState, th: Thresholds = _DEFAULTS) -> dict[str, Any]:
    """The `state` object of CONTRACT section 5."""
    own = state.settings
    locations = {}
    for name, loc in sorted(state.locations.items()):
        low, source = _low_stock_threshold(own, name, th)
        locations[name] = {
            "on_hand": loc.on_hand,
            "reserved": loc.reserved,
            "available": loc.on_hand - loc.reserved,
            "low_stock_threshold": low,
            "low_stock_threshold_from": source,
        }
    settings: dict[str, Any] = {}
    if own is not None:
        for field in SKU_SETTINGS:
            value = getattr(own, field)
            if value is not None:
                settings[field] = value
        if own.locations:
            settings["locations"] = {
                name: {"low_stock_threshold": value} for name, value in sorted(own.locations.items())
            }
    minimum, ratio = _spike_thresholds(state, th)
    sku_low = own.low_stock_threshold if own is not None else None

    def entry(value: Any, own_value: Any) -> dict[str, Any]:
        return {"value": value, "from": "config" if own_value is None else "entity"}

    return {
        "locations": locations,
        "available": state.available,
        "campaigns": list(state.campaigns),
        "out_of_stock": state.out_of_stock,
        "returned_in_window": state.returned,
        "picked_in_window": state.picked,
        "settings": settings,
        "effective": {
            "low_stock_threshold": entry(th.low_stock_threshold if sku_low is None else sku_low, sku_low),
            "return_spike_min_units": entry(minimum, own.return_spike_min_units if own else None),
            "return_spike_ratio": entry(ratio, own.return_spike_ratio if own else None),
        },
    }


def raised(state: SkuState) -> list[dict[str, Any]]:
    """Every rule now raised, in RULES order then location."""
    out: list[dict[str, Any]] = []
    names = sorted(state.locations)
    for rule in _RULES:
        if rule.scope == "location":
            for name in names:
                if getattr(state.locations[name], rule.name):
                    out.append({"rule": rule.name, "location": name})
        elif getattr(state, rule.name):
            out.append({"rule": rule.name, "location": None})
    return out
