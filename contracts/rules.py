"""The exception rules of CONTRACT.md section 3 as data: kind, rule, scope, severity."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

Scope = Literal["location", "entity"]
Severity = Literal["critical", "warning"]


class Rule(msgspec.Struct, frozen=True):
    kind: str
    name: str
    scope: Scope
    severity: Severity
    condition: str


RULES: Final[tuple[Rule, ...]] = (
    Rule("sku", "stockout", "location", "critical", "available <= 0"),
    Rule("sku", "low_stock", "location", "warning", "available <= low_stock_threshold"),
    Rule("sku", "oversold", "location", "critical", "available < 0"),
    Rule(
        "sku", "return_spike", "entity", "warning",
        "in the window, returned >= return_spike_min_units and returned >= return_spike_ratio x picked",
    ),
    Rule("shipment", "sla_at_risk", "entity", "warning", "not delivered, eta known and eta > promised_by"),
    Rule(
        "shipment", "sla_breached", "entity", "critical",
        "delivered later than promised_by, or the wall clock passes promised_by undelivered (never cleared)",
    ),
    Rule(
        "shipment", "stalled", "entity", "warning",
        "the wall clock passes last_movement + stall_after while picked_up, in_transit or out_for_delivery",
    ),
    Rule(
        "shipment", "temperature_excursion", "entity", "critical",
        "the last temperature is outside [temp_min, temp_max]",
    ),
    Rule("shipment", "delivery_failed", "entity", "warning", "status is delivery_failed"),
    Rule(
        "campaign", "cpa_exceeded", "entity", "warning",
        "cpa_limit set, spend >= cpa_min_spend, and no conversions or spend / conversions > cpa_limit",
    ),
    Rule("campaign", "budget_exhausted", "entity", "warning", "budget set and spend >= budget"),
    Rule(
        "campaign", "promoting_out_of_stock", "entity", "critical",
        "active and at least one linked SKU out of stock",
    ),
)

SEVERITY: Final[dict[str, Severity]] = {r.name: r.severity for r in RULES}
RULES_BY_KIND: Final[dict[str, tuple[Rule, ...]]] = {
    k: tuple(r for r in RULES if r.kind == k) for k in ("sku", "shipment", "campaign")
}
