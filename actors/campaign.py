"""The campaign actor: spend, conversions, linked SKUs and their stock (CONTRACT 2.3, 3)."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from actors.effects import ActorError, Alert, Effect, Send, Thresholds
from contracts.events import (
    CAMPAIGN_SETTINGS,
    CampaignEvent,
    CampaignLinked,
    CampaignSettings,
    CampaignUnlinked,
    Conversion,
    Ended,
    Paused,
    Resumed,
    SkuBackInStock,
    SkuOutOfStock,
    Spend,
    Started,
)
from contracts.rules import RULES_BY_KIND
from contracts.times import from_us

_DEFAULTS: Final = Thresholds()


class CampaignState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One campaign. Mutated in place by `apply`."""

    key: str
    seq: int = 0
    active: bool = False
    ended: bool = False
    spend: float = 0.0
    conversions: int = 0
    revenue: float = 0.0
    cpa_limit: float | None = None
    budget: float | None = None
    cpa_min_spend: float | None = None  # own setting (CONTRACT 2.4); None inherits
    # Linked SKUs in the order they were added -> whether that SKU said it is out of stock.
    skus: dict[str, bool] = {}
    out_of_stock: int = 0  # how many values of `skus` are True
    # Raised rules.
    cpa_exceeded: bool = False
    budget_exhausted: bool = False
    promoting_out_of_stock: bool = False


def new(key: str) -> CampaignState:
    return CampaignState(key=key)


def apply(state: CampaignState, event: CampaignEvent, ts_us: int, th: Thresholds) -> list[Effect]:
    """Apply one event in place; return its alerts and SKU messages."""
    t = type(event)
    sends: list[Effect] | None = None
    if t is Spend:
        state.spend += event.amount  # type: ignore[union-attr]
    elif t is Conversion:
        count = event.count  # type: ignore[union-attr]
        state.conversions += 1 if count is None else count
        revenue = event.revenue  # type: ignore[union-attr]
        if revenue is not None:
            state.revenue += revenue
    elif t is SkuOutOfStock:
        sku = event.sku  # type: ignore[union-attr]
        if state.skus.get(sku) is False:
            state.skus[sku] = True
            state.out_of_stock += 1
    elif t is SkuBackInStock:
        sku = event.sku  # type: ignore[union-attr]
        if state.skus.get(sku):
            state.skus[sku] = False
            state.out_of_stock -= 1
    elif t is Started or t is Paused or t is Resumed or t is Ended:
        if not state.ended:
            sends = _lifecycle(state, event, ts_us)  # type: ignore[arg-type]
    elif t is CampaignSettings:
        # Whatever the campaign's state, ended included; links and activity stay as they are.
        for field in CAMPAIGN_SETTINGS:
            value = getattr(event, field)
            if value is not None:
                setattr(state, field, value)
        for field in event.reset or ():  # type: ignore[union-attr]
            setattr(state, field, None)
    else:
        raise ActorError(f"campaign:{state.key}: not a campaign event: {t.__name__}")

    effects: list[Effect] = []
    key = state.key
    spend = state.spend
    conversions = state.conversions

    limit = state.cpa_limit
    cpa = spend / conversions if conversions else None
    min_spend = th.cpa_min_spend if state.cpa_min_spend is None else state.cpa_min_spend
    exceeded = limit is not None and spend >= min_spend and (cpa is None or cpa > limit)
    if exceeded != state.cpa_exceeded:
        state.cpa_exceeded = exceeded
        if exceeded and cpa is None:
            msg = f"{key} spent {spend:.2f} with no conversions (CPA limit {limit:.2f})"
        elif exceeded:
            msg = (
                f"{key} CPA {cpa:.2f} above limit {limit:.2f} (spend {spend:.2f}, {conversions} conversions)"
            )
        else:
            msg = f"{key} CPA within limit again ({_money(cpa)}, limit {_money(limit)})"
        effects.append(Alert("cpa_exceeded", "raised" if exceeded else "cleared", None, cpa, limit, msg))

    budget = state.budget
    exhausted = budget is not None and spend >= budget
    if exhausted != state.budget_exhausted:
        state.budget_exhausted = exhausted
        what = "budget exhausted" if exhausted else "budget no longer exhausted"
        msg = f"{key} {what} (spend {spend:.2f} of {_money(budget)})"
        effects.append(
            Alert("budget_exhausted", "raised" if exhausted else "cleared", None, spend, budget, msg)
        )

    n = state.out_of_stock
    promoting = state.active and n > 0
    if promoting != state.promoting_out_of_stock:
        state.promoting_out_of_stock = promoting
        if promoting:
            skus = sorted(s for s, out in state.skus.items() if out)
            shown = ", ".join(skus[:5]) + (", ..." if n > 5 else "")
            msg = f"{key} promoting {n} out-of-stock SKU{'s' if n != 1 else ''}: {shown}"
        elif state.active:
            msg = f"{key} no longer promoting out-of-stock SKUs"
        else:
            msg = f"{key} no longer promoting out-of-stock SKUs ({'ended' if state.ended else 'paused'})"
        effects.append(
            Alert("promoting_out_of_stock", "raised" if promoting else "cleared", None, n, None, msg)
        )

    if sends:
        effects.extend(sends)
    return effects


def _lifecycle(
    state: CampaignState, event: Started | Paused | Resumed | Ended, ts_us: int
) -> list[Effect] | None:
    """started / paused / resumed / ended of a campaign not yet ended."""
    t = type(event)
    if t is Paused:
        state.active = False
        return None
    if t is Resumed:
        state.active = True
        return None
    skus = state.skus
    if t is Ended:
        sends: list[Effect] = []
        if skus:
            message = CampaignUnlinked(campaign=state.key, ts=from_us(ts_us))
            sends = [Send("sku", sku, message) for sku in skus]
        state.ended = True
        state.active = False
        state.skus = {}
        state.out_of_stock = 0
        return sends
    # Started.
    listed = event.skus or ()  # type: ignore[union-attr]
    added = [sku for sku in dict.fromkeys(listed) if sku not in skus]
    link = CampaignLinked(campaign=state.key, ts=from_us(ts_us)) if added else None
    state.active = True
    for sku in added:
        skus[sku] = False
    if event.cpa_limit is not None:  # type: ignore[union-attr]
        state.cpa_limit = event.cpa_limit  # type: ignore[union-attr]
    if event.budget is not None:  # type: ignore[union-attr]
        state.budget = event.budget  # type: ignore[union-attr]
    return [Send("sku", sku, link) for sku in added]


def _money(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f}"


def fire(state: CampaignState, name: str, deadline_us: int, th: Thresholds) -> list[Effect]:
    """Campaigns have no timers: every firing is stale."""
    return []


# Whether `timers` can ever return a deadline: a snapshot skips the timer rows of kinds that keep none.
KEEPS_TIMERS: Final = False


def timers(state: CampaignState) -> dict[str, int]:
    return {}


def view(state: CampaignState, th: Thresholds = _DEFAULTS) -> dict[str, Any]:
    """The `state` object of CONTRACT section 5."""
    conversions = state.conversions
    settings = {f: getattr(state, f) for f in CAMPAIGN_SETTINGS if getattr(state, f) is not None}
    effective: dict[str, Any] = {
        f: {"value": v, "from": "entity"} for f, v in settings.items() if f != "cpa_min_spend"
    }
    effective["cpa_min_spend"] = (
        {"value": th.cpa_min_spend, "from": "config"}
        if state.cpa_min_spend is None
        else {"value": state.cpa_min_spend, "from": "entity"}
    )
    return {
        "active": state.active,
        "ended": state.ended,
        "spend": state.spend,
        "conversions": conversions,
        "revenue": state.revenue,
        "skus": sorted(state.skus),
        "out_of_stock_skus": sorted(s for s, out in state.skus.items() if out),
        "cpa": state.spend / conversions if conversions else None,
        "cpa_limit": state.cpa_limit,
        "budget": state.budget,
        "settings": settings,
        "effective": effective,
    }


# Rule names in RULES order (each is a bool field of the state).
_RULES: Final = tuple(r.name for r in RULES_BY_KIND["campaign"])


def raised(state: CampaignState) -> list[dict[str, Any]]:
    """Every rule now raised, in RULES order."""
    return [{"rule": rule, "location": None} for rule in _RULES if getattr(state, rule)]
