"""The SKU actor: counters per event type, the location rules, the return window, campaign messages."""

from __future__ import annotations

from typing import Any

import pytest

from actors import ActorError, Alert, Send, SetTimer, Thresholds, sku
from contracts.events import (
    Adjusted,
    CampaignLinked,
    CampaignUnlinked,
    Cancelled,
    Counted,
    Delivered,
    Ordered,
    Picked,
    Received,
    Returned,
    SkuBackInStock,
    SkuOutOfStock,
)
from contracts.times import from_us

TH = Thresholds()
H = 3_600_000_000
T0 = 472_222 * H  # 2023-11-14T22:00:00Z, the start of an hour


def alerts(effects: list[Any]) -> list[tuple[Any, ...]]:
    return [(e.rule, e.status, e.location, e.value, e.threshold) for e in effects if isinstance(e, Alert)]


def sends(effects: list[Any]) -> list[tuple[str, str, str, int]]:
    from contracts.times import to_us

    return [
        (e.kind, e.key, e.event.__struct_config__.tag, to_us(e.event.ts))
        for e in effects
        if isinstance(e, Send)
    ]


def run(state: sku.SkuState, *events: Any, ts: int = T0, th: Thresholds = TH) -> list[Any]:
    out: list[Any] = []
    for event in events:
        out += sku.apply(state, event, ts, th)
    return out


def loc(state: sku.SkuState, name: str) -> tuple[int, int, int]:
    v = sku.view(state)["locations"][name]
    return v["on_hand"], v["reserved"], v["available"]


# --- counters ---------------------------------------------------------------------------


def test_counters_of_every_location_event() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=20))
    assert loc(s, "A") == (20, 0, 20)
    run(s, Ordered(location="A", qty=5, order_id="o1"))
    assert loc(s, "A") == (20, 5, 15)
    run(s, Cancelled(location="A", qty=2, order_id="o1"))
    assert loc(s, "A") == (20, 3, 17)
    run(s, Cancelled(location="A", qty=10, order_id="o1"))  # floors at 0
    assert loc(s, "A") == (20, 0, 20)
    run(s, Ordered(location="A", qty=4, order_id="o2"), Picked(location="A", qty=3))
    assert loc(s, "A") == (17, 1, 16)
    run(s, Picked(location="A", qty=5))  # reserved floors at 0
    assert loc(s, "A") == (12, 0, 12)
    run(s, Returned(location="A", qty=2))  # restockable absent: true
    assert loc(s, "A") == (14, 0, 14)
    run(s, Returned(location="A", qty=2, restockable=True))
    assert loc(s, "A") == (16, 0, 16)
    run(s, Returned(location="A", qty=2, restockable=False))
    assert loc(s, "A") == (16, 0, 16)
    run(s, Adjusted(location="A", delta=-6), Adjusted(location="A", delta=1))
    assert loc(s, "A") == (11, 0, 11)
    run(s, Ordered(location="A", qty=2, order_id="o3"), Counted(location="A", on_hand=7))
    assert loc(s, "A") == (7, 2, 5)


def test_available_is_summed_over_locations_and_may_be_negative() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="B", qty=4), Ordered(location="A", qty=6, order_id="o"))
    v = sku.view(s)
    assert v["available"] == -2
    assert list(v["locations"]) == ["A", "B"]  # sorted
    assert v["locations"]["A"] == {
        "on_hand": 0,
        "reserved": 6,
        "available": -6,
        "low_stock_threshold": 5,
        "low_stock_threshold_from": "config",
    }


def test_campaign_link_events_touch_no_location() -> None:
    s = sku.new("SKU-1")
    run(s, CampaignLinked(campaign="C1"), CampaignUnlinked(campaign="C1"))
    assert sku.view(s)["locations"] == {}
    assert s.locations == {}


# --- location rules ---------------------------------------------------------------------


def test_new_location_starts_false_so_a_first_event_at_or_below_zero_raises() -> None:
    s = sku.new("SKU-1")
    eff = run(s, Ordered(location="A", qty=2, order_id="o"))
    assert alerts(eff) == [
        ("stockout", "raised", "A", -2, 0),
        ("low_stock", "raised", "A", -2, 5),
        ("oversold", "raised", "A", -2, 0),
    ]
    s = sku.new("SKU-2")
    eff = run(s, Counted(location="A", on_hand=0))
    assert alerts(eff) == [("stockout", "raised", "A", 0, 0), ("low_stock", "raised", "A", 0, 5)]


def test_first_event_in_stock_raises_nothing_above_threshold() -> None:
    s = sku.new("SKU-1")
    assert alerts(run(s, Received(location="A", qty=6))) == []
    assert alerts(run(s, Received(location="B", qty=5))) == [("low_stock", "raised", "B", 5, 5)]


def test_each_crossing_alerts_once_then_nothing_while_it_stays() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=10))
    assert alerts(run(s, Picked(location="A", qty=5))) == [("low_stock", "raised", "A", 5, 5)]
    assert alerts(run(s, Picked(location="A", qty=2))) == []
    assert alerts(run(s, Picked(location="A", qty=3))) == [("stockout", "raised", "A", 0, 0)]
    assert alerts(run(s, Ordered(location="A", qty=1, order_id="o"))) == [("oversold", "raised", "A", -1, 0)]
    assert alerts(run(s, Ordered(location="A", qty=1, order_id="o"))) == []
    assert alerts(run(s, Cancelled(location="A", qty=2, order_id="o"))) == [
        ("oversold", "cleared", "A", 0, 0)
    ]
    assert alerts(run(s, Received(location="A", qty=3))) == [("stockout", "cleared", "A", 3, 0)]
    assert alerts(run(s, Adjusted(location="A", delta=3))) == [("low_stock", "cleared", "A", 6, 5)]


def test_one_event_can_clear_every_location_rule_in_table_order() -> None:
    s = sku.new("SKU-1")
    run(s, Ordered(location="A", qty=3, order_id="o"))
    assert alerts(run(s, Counted(location="A", on_hand=100))) == [
        ("stockout", "cleared", "A", 97, 0),
        ("low_stock", "cleared", "A", 97, 5),
        ("oversold", "cleared", "A", 97, 0),
    ]


def test_locations_are_independent() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=1))
    eff = run(s, Received(location="B", qty=1))
    assert alerts(eff) == [("low_stock", "raised", "B", 1, 5)]
    eff = run(s, Picked(location="A", qty=1))
    assert alerts(eff) == [("stockout", "raised", "A", 0, 0)]
    assert sku.raised(s) == [
        {"rule": "stockout", "location": "A"},
        {"rule": "low_stock", "location": "A"},
        {"rule": "low_stock", "location": "B"},
    ]


def test_low_stock_threshold_comes_from_thresholds() -> None:
    th = Thresholds(low_stock_threshold=-3)
    s = sku.new("SKU-1")
    eff = run(s, Ordered(location="A", qty=2, order_id="o"), th=th)
    assert alerts(eff) == [("stockout", "raised", "A", -2, 0), ("oversold", "raised", "A", -2, 0)]
    eff = run(s, Ordered(location="A", qty=1, order_id="o"), th=th)
    assert alerts(eff) == [("low_stock", "raised", "A", -3, -3)]


def test_alert_values_are_ints_and_messages_name_key_and_location() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="BLR-DS-4", qty=1))
    (alert,) = [e for e in run(s, Picked(location="BLR-DS-4", qty=1)) if isinstance(e, Alert)]
    assert alert.message == "SKU-1 out of stock at BLR-DS-4 (available 0)"
    assert type(alert.value) is int
    assert type(alert.threshold) is int


# --- return_spike -----------------------------------------------------------------------


def test_return_spike_raises_at_min_units_and_ratio() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=100), Picked(location="A", qty=50))
    assert alerts(run(s, Returned(location="A", qty=9))) == []
    # 10 >= 10 and 10 >= 0.2 * 50
    assert alerts(run(s, Returned(location="A", qty=1, restockable=False))) == [
        ("return_spike", "raised", None, 10, 10)
    ]
    assert sku.view(s)["returned_in_window"] == 10
    assert alerts(run(s, Returned(location="A", qty=5))) == []
    # 15 < 0.2 * 80: cleared by picks, which count over all locations
    run(s, Received(location="B", qty=100))
    assert alerts(run(s, Picked(location="B", qty=30))) == [("return_spike", "cleared", None, 15, 10)]


def test_return_spike_window_moves_with_the_latest_hour_of_any_event() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=50), ts=T0)
    assert alerts(run(s, Returned(location="A", qty=10), ts=T0 + 30 * 60 * 1_000_000)) == [
        ("return_spike", "raised", None, 10, 10)
    ]
    # hour T0+23h: window [T0, T0+23h] still holds the returns.
    assert alerts(run(s, CampaignLinked(campaign="C1"), ts=T0 + 23 * H + H - 1)) == []
    # hour T0+24h: the returns' hour falls out; a campaign message moves the window too.
    assert alerts(run(s, CampaignUnlinked(campaign="C1"), ts=T0 + 24 * H)) == [
        ("return_spike", "cleared", None, 0, 10)
    ]
    assert s.returned_by_hour == {}
    assert s.returned == 0


def test_late_events_count_only_inside_the_window() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=50), ts=T0 + 30 * H)
    # hour T0+6h is outside [T0+7h, T0+30h]: never counted.
    assert alerts(run(s, Returned(location="A", qty=20), ts=T0 + 6 * H)) == []
    assert s.returned == 0
    assert loc(s, "A") == (70, 0, 70)  # counters still apply
    # hour T0+7h is inside.
    assert alerts(run(s, Returned(location="A", qty=10), ts=T0 + 7 * H)) == [
        ("return_spike", "raised", None, 10, 10)
    ]
    # a later hour pushes T0+7h out.
    assert alerts(run(s, Received(location="A", qty=1), ts=T0 + 31 * H)) == [
        ("return_spike", "cleared", None, 0, 10)
    ]


def test_return_window_hours_and_ratio_come_from_thresholds() -> None:
    th = Thresholds(return_window_hours=1, return_spike_min_units=2, return_spike_ratio=1.0)
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=10), Picked(location="A", qty=2), ts=T0, th=th)
    assert alerts(run(s, Returned(location="A", qty=2), ts=T0 + H - 1, th=th)) == [
        ("return_spike", "raised", None, 2, 2)
    ]
    # a one-hour window: hour T0's picks and returns fall out, the new returns alone still spike
    assert alerts(run(s, Returned(location="A", qty=2), ts=T0 + H, th=th)) == []
    assert (s.returned, s.picked) == (2, 0)
    assert alerts(run(s, Picked(location="A", qty=3), ts=T0 + H, th=th)) == [
        ("return_spike", "cleared", None, 2, 2)
    ]


def test_return_spike_with_zero_minimum_holds_as_written() -> None:
    th = Thresholds(return_spike_min_units=0)
    s = sku.new("SKU-1")
    # 0 >= 0 and 0 >= 0.2 * 0: the condition is true from the first event.
    assert alerts(run(s, Received(location="A", qty=50), th=th)) == [("return_spike", "raised", None, 0, 0)]
    assert alerts(run(s, Picked(location="A", qty=1), th=th)) == [("return_spike", "cleared", None, 0, 0)]


# --- campaigns --------------------------------------------------------------------------


def test_a_new_sku_is_out_of_stock_and_tells_a_linking_campaign_at_once() -> None:
    s = sku.new("SKU-1")
    eff = run(s, CampaignLinked(campaign="C1"), ts=T0 + 5)
    assert sends(eff) == [("campaign", "C1", "sku_out_of_stock", T0 + 5)]
    assert eff[0].event == SkuOutOfStock(sku="SKU-1", ts=from_us(T0 + 5))
    assert run(s, CampaignLinked(campaign="C1")) == []  # a repeat: nothing
    assert sku.view(s)["campaigns"] == ["C1"]


def test_linking_while_in_stock_sends_nothing() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=10))
    assert sends(run(s, CampaignLinked(campaign="C1"))) == []


def test_stock_flips_are_sent_to_every_linked_campaign_in_sorted_order() -> None:
    s = sku.new("SKU-1")
    run(s, CampaignLinked(campaign="C2"), CampaignLinked(campaign="C1"))
    assert sku.view(s)["campaigns"] == ["C1", "C2"]
    eff = run(s, Received(location="A", qty=2), ts=T0 + 7)
    assert sends(eff) == [
        ("campaign", "C1", "sku_back_in_stock", T0 + 7),
        ("campaign", "C2", "sku_back_in_stock", T0 + 7),
    ]
    assert isinstance(eff[-1].event, SkuBackInStock)
    # the sum over locations decides: B going negative leaves the SKU in stock while A covers it
    assert sends(run(s, Ordered(location="B", qty=1, order_id="o"))) == []
    eff = run(s, Ordered(location="B", qty=1, order_id="o"), ts=T0 + 9)
    assert sends(eff) == [
        ("campaign", "C1", "sku_out_of_stock", T0 + 9),
        ("campaign", "C2", "sku_out_of_stock", T0 + 9),
    ]
    assert sends(run(s, Ordered(location="A", qty=1, order_id="o"))) == []  # stays out of stock
    # alerts come before messages
    eff = run(s, Received(location="B", qty=10))
    assert [type(e) for e in eff] == [Alert, Alert, Alert, Send, Send]


def test_unlinked_campaigns_are_not_told() -> None:
    s = sku.new("SKU-1")
    run(s, CampaignLinked(campaign="C1"), CampaignLinked(campaign="C2"))
    assert run(s, CampaignUnlinked(campaign="C1")) == []
    assert run(s, CampaignUnlinked(campaign="C9")) == []
    assert sends(run(s, Received(location="A", qty=1), ts=T0)) == [
        ("campaign", "C2", "sku_back_in_stock", T0)
    ]
    assert sku.view(s)["campaigns"] == ["C2"]


def test_flips_without_linked_campaigns_are_tracked_silently() -> None:
    s = sku.new("SKU-1")
    assert s.out_of_stock
    run(s, Received(location="A", qty=1))
    assert not s.out_of_stock
    run(s, Picked(location="A", qty=1))
    assert s.out_of_stock
    assert sku.view(s)["out_of_stock"]
    assert sends(run(s, CampaignLinked(campaign="C1"), ts=T0)) == [("campaign", "C1", "sku_out_of_stock", T0)]


def test_message_ts_outside_utc_datetime_range_is_still_exact() -> None:
    from contracts.times import to_us

    s = sku.new("SKU-1")
    early = -62_135_683_140_000_000  # 0001-01-01T00:00:00+23:59, UTC year 0
    (send,) = run(s, CampaignLinked(campaign="C1"), ts=early)
    assert to_us(send.event.ts) == early


# --- the rest of the interface ----------------------------------------------------------


def test_no_timers() -> None:
    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=1))
    assert sku.timers(s) == {}
    assert sku.fire(s, "sla", T0, TH) == []
    assert not any(isinstance(e, SetTimer) for e in run(s, Picked(location="A", qty=1)))


def test_a_foreign_event_is_an_actor_error_and_changes_nothing() -> None:
    from actors import encode_state

    s = sku.new("SKU-1")
    run(s, Received(location="A", qty=1))
    before = encode_state(s)
    with pytest.raises(ActorError, match="not a sku event"):
        sku.apply(s, Delivered(), T0, TH)  # type: ignore[arg-type]
    assert encode_state(s) == before


def test_view_has_the_contract_fields() -> None:
    s = sku.new("SKU-1")
    assert sku.view(s) == {
        "locations": {},
        "available": 0,
        "campaigns": [],
        "out_of_stock": True,
        "returned_in_window": 0,
        "picked_in_window": 0,
        "settings": {},
        "effective": {
            "low_stock_threshold": {"value": 5, "from": "config"},
            "return_spike_min_units": {"value": 10, "from": "config"},
            "return_spike_ratio": {"value": 0.2, "from": "config"},
        },
    }
    assert sku.raised(s) == []
