"""The campaign actor: lifecycle, spend and conversions, linked SKUs, and its three rules."""

from __future__ import annotations

from typing import Any

import pytest

from actors import ActorError, Alert, Send, SetTimer, Thresholds, campaign
from contracts.events import (
    CampaignLinked,
    CampaignUnlinked,
    Conversion,
    Delivered,
    Ended,
    Paused,
    Resumed,
    SkuBackInStock,
    SkuOutOfStock,
    Spend,
    Started,
)
from contracts.times import from_us, to_us

TH = Thresholds()
T0 = 1_700_000_000_000_000


def alerts(effects: list[Any]) -> list[tuple[Any, ...]]:
    return [(e.rule, e.status, e.value, e.threshold) for e in effects if isinstance(e, Alert)]


def sends(effects: list[Any]) -> list[tuple[str, str, str]]:
    return [(e.kind, e.key, e.event.__struct_config__.tag) for e in effects if isinstance(e, Send)]


def run(state: campaign.CampaignState, *events: Any, ts: int = T0, th: Thresholds = TH) -> list[Any]:
    out: list[Any] = []
    for event in events:
        out += campaign.apply(state, event, ts, th)
    return out


# --- lifecycle and links ----------------------------------------------------------------


def test_started_links_new_skus_in_order_without_duplicates() -> None:
    c = campaign.new("C1")
    eff = run(c, Started(skus=["S2", "S1", "S2"]), ts=T0 + 3)
    assert sends(eff) == [("sku", "S2", "campaign_linked"), ("sku", "S1", "campaign_linked")]
    assert eff[0].event == CampaignLinked(campaign="C1", ts=from_us(T0 + 3))
    assert c.active
    assert list(c.skus) == ["S2", "S1"]
    eff = run(c, Started(skus=["S1", "S3"]))
    assert sends(eff) == [("sku", "S3", "campaign_linked")]
    assert run(c, Started()) == []
    assert campaign.view(c)["skus"] == ["S1", "S2", "S3"]


def test_paused_and_resumed() -> None:
    c = campaign.new("C1")
    assert not c.active
    run(c, Resumed())
    assert c.active
    run(c, Paused())
    assert not c.active


def test_ended_unlinks_every_sku_and_stays_ended() -> None:
    c = campaign.new("C1")
    run(c, Started(skus=["S2", "S1"]), SkuOutOfStock(sku="S1"))
    eff = run(c, Ended(), ts=T0 + 9)
    assert sends(eff) == [("sku", "S2", "campaign_unlinked"), ("sku", "S1", "campaign_unlinked")]
    assert eff[-1].event == CampaignUnlinked(campaign="C1", ts=from_us(T0 + 9))
    assert alerts(eff) == [("promoting_out_of_stock", "cleared", 0, None)]
    assert [type(e) for e in eff] == [Alert, Send, Send]  # alerts before messages
    v = campaign.view(c)
    assert (v["active"], v["ended"], v["skus"], v["out_of_stock_skus"]) == (False, True, [], [])
    # once ended: started, paused, resumed change nothing and send nothing
    assert run(c, Started(skus=["S3"], budget=1.0), Resumed(), Paused(), Ended()) == []
    assert (c.active, c.skus, c.budget) == (False, {}, None)
    assert run(c, SkuOutOfStock(sku="S1")) == []
    assert c.out_of_stock == 0


def test_late_spend_and_conversions_still_count_after_ended() -> None:
    c = campaign.new("C1")
    run(c, Started(budget=10.0), Ended())
    assert alerts(run(c, Spend(amount=10.0))) == [("budget_exhausted", "raised", 10.0, 10.0)]
    run(c, Conversion(count=2, revenue=5.0))
    assert (c.spend, c.conversions, c.revenue) == (10.0, 2, 5.0)


# --- counters ---------------------------------------------------------------------------


def test_spend_is_summed_as_floats_in_stream_order() -> None:
    c = campaign.new("C1")
    run(c, Spend(amount=0.1), Spend(amount=0.2))
    assert c.spend == 0.1 + 0.2 == 0.30000000000000004


def test_conversion_defaults() -> None:
    c = campaign.new("C1")
    run(c, Conversion(), Conversion(count=3, revenue=2.5), Conversion(revenue=0.5))
    assert (c.conversions, c.revenue) == (5, 3.0)
    assert campaign.view(c)["conversions"] == 5


# --- out-of-stock SKUs ------------------------------------------------------------------


def test_out_of_stock_skus_only_for_linked_skus() -> None:
    c = campaign.new("C1")
    run(c, Started(skus=["S1", "S2"]))
    run(c, SkuOutOfStock(sku="S9"))  # not linked
    assert campaign.view(c)["out_of_stock_skus"] == []
    run(c, SkuOutOfStock(sku="S2"), SkuOutOfStock(sku="S1"), SkuOutOfStock(sku="S2"))
    assert campaign.view(c)["out_of_stock_skus"] == ["S1", "S2"]
    run(c, SkuBackInStock(sku="S2"), SkuBackInStock(sku="S2"), SkuBackInStock(sku="S9"))
    assert campaign.view(c)["out_of_stock_skus"] == ["S1"]
    assert c.out_of_stock == 1


def test_promoting_out_of_stock_crossings() -> None:
    c = campaign.new("C1")
    run(c, Started(skus=["S1", "S2"]))
    eff = run(c, SkuOutOfStock(sku="S1"))
    assert alerts(eff) == [("promoting_out_of_stock", "raised", 1, None)]
    assert eff[0].message == "C1 promoting 1 out-of-stock SKU: S1"
    assert alerts(run(c, SkuOutOfStock(sku="S2"))) == []  # stays true
    assert alerts(run(c, SkuBackInStock(sku="S1"))) == []
    assert alerts(run(c, Paused())) == [("promoting_out_of_stock", "cleared", 1, None)]
    assert alerts(run(c, Resumed())) == [("promoting_out_of_stock", "raised", 1, None)]
    assert alerts(run(c, SkuBackInStock(sku="S2"))) == [("promoting_out_of_stock", "cleared", 0, None)]


def test_out_of_stock_while_paused_raises_on_resume() -> None:
    c = campaign.new("C1")
    run(c, Started(skus=["S1"]), Paused())
    assert alerts(run(c, SkuOutOfStock(sku="S1"))) == []
    assert alerts(run(c, Started())) == [("promoting_out_of_stock", "raised", 1, None)]


# --- cpa_exceeded and budget_exhausted --------------------------------------------------


def test_cpa_exceeded_needs_a_limit_and_the_minimum_spend() -> None:
    c = campaign.new("C1")
    assert alerts(run(c, Spend(amount=500.0))) == []  # no cpa_limit
    c = campaign.new("C2")
    run(c, Started(cpa_limit=10.0))
    assert alerts(run(c, Spend(amount=99.5))) == []  # below cpa_min_spend
    eff = run(c, Spend(amount=0.5))
    assert alerts(eff) == [("cpa_exceeded", "raised", None, 10.0)]  # no conversions: CPA null
    assert eff[0].message == "C2 spent 100.00 with no conversions (CPA limit 10.00)"
    # 100 / 10 == 10: not above the limit
    assert alerts(run(c, Conversion(count=10))) == [("cpa_exceeded", "cleared", 10.0, 10.0)]
    assert alerts(run(c, Conversion())) == []
    assert alerts(run(c, Spend(amount=11.0))) == [("cpa_exceeded", "raised", 111.0 / 11, 10.0)]
    assert alerts(run(c, Started(cpa_limit=20.0))) == [("cpa_exceeded", "cleared", 111.0 / 11, 20.0)]


def test_cpa_limit_set_after_spend_raises_on_started() -> None:
    c = campaign.new("C1")
    run(c, Spend(amount=150.0), Conversion())
    assert alerts(run(c, Started(cpa_limit=100.0))) == [("cpa_exceeded", "raised", 150.0, 100.0)]


def test_cpa_min_spend_comes_from_thresholds() -> None:
    th = Thresholds(cpa_min_spend=0.0)
    c = campaign.new("C1")
    assert alerts(run(c, Started(cpa_limit=1.0), th=th)) == [("cpa_exceeded", "raised", None, 1.0)]


def test_budget_exhausted_and_raised_budget_clears_it() -> None:
    c = campaign.new("C1")
    run(c, Started(budget=100.0))
    assert alerts(run(c, Spend(amount=99.0))) == []
    eff = run(c, Spend(amount=1.0))
    assert alerts(eff) == [("budget_exhausted", "raised", 100.0, 100.0)]
    assert alerts(run(c, Spend(amount=1.0))) == []
    assert alerts(run(c, Started())) == []  # no budget given: kept
    assert alerts(run(c, Started(budget=150.0))) == [("budget_exhausted", "cleared", 101.0, 150.0)]


def test_view_and_raised() -> None:
    c = campaign.new("C1")
    run(c, Started(skus=["S2", "S1"], cpa_limit=1.0, budget=50.0), SkuOutOfStock(sku="S2"))
    run(c, Spend(amount=120.0), Conversion(count=4, revenue=9.5))
    v = campaign.view(c)
    assert v == {
        "active": True,
        "ended": False,
        "spend": 120.0,
        "conversions": 4,
        "revenue": 9.5,
        "skus": ["S1", "S2"],
        "out_of_stock_skus": ["S2"],
        "cpa": 30.0,
        "cpa_limit": 1.0,
        "budget": 50.0,
        "settings": {"cpa_limit": 1.0, "budget": 50.0},
        "effective": {
            "cpa_limit": {"value": 1.0, "from": "entity"},
            "budget": {"value": 50.0, "from": "entity"},
            "cpa_min_spend": {"value": 100.0, "from": "config"},
        },
    }
    assert campaign.raised(c) == [
        {"rule": "cpa_exceeded", "location": None},
        {"rule": "budget_exhausted", "location": None},
        {"rule": "promoting_out_of_stock", "location": None},
    ]


def test_messages_carry_the_causing_ts() -> None:
    c = campaign.new("C1")
    (send,) = run(c, Started(skus=["S1"]), ts=T0 + 123)
    assert to_us(send.event.ts) == T0 + 123


def test_no_timers_and_foreign_events_fail_before_mutating() -> None:
    from actors import encode_state

    c = campaign.new("C1")
    run(c, Spend(amount=1.0))
    assert campaign.timers(c) == {}
    assert campaign.fire(c, "sla", T0, TH) == []
    before = encode_state(c)
    with pytest.raises(ActorError, match="not a campaign event"):
        campaign.apply(c, Delivered(), T0, TH)  # type: ignore[arg-type]
    assert encode_state(c) == before
    assert not any(isinstance(e, SetTimer) for e in run(c, Started(skus=["S1"]), Ended()))
