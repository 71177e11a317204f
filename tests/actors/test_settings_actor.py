"""`settings` events in the pure actors (CONTRACT 2.4): inheritance, re-evaluation, timers, views."""

from __future__ import annotations

from typing import Any

import msgspec

import actors
from actors import Alert, SetTimer, Thresholds, campaign, shipment, sku
from contracts.events import (
    Booked,
    CampaignSettings,
    Conversion,
    Ended,
    InTransit,
    Ordered,
    Paused,
    Picked,
    PickedUp,
    Received,
    Returned,
    ShipmentSettings,
    SkuSettings,
    Spend,
    Started,
)
from contracts.times import from_us

TH = Thresholds()
H = 3_600_000_000
M = 60_000_000
T0 = 472_222 * H


def alerts(effects: list[Any]) -> list[tuple[Any, ...]]:
    return [(e.rule, e.status, e.location, e.value, e.threshold) for e in effects if isinstance(e, Alert)]


def timer_fx(effects: list[Any]) -> list[tuple[str, int | None]]:
    return [(e.name, e.deadline_us) for e in effects if isinstance(e, SetTimer)]


class Actor:
    """One key driven through actors.step with increasing sequences."""

    def __init__(self, kind: str, th: Thresholds = TH) -> None:
        self.kind, self.th, self.state, self.seq = kind, th, None, 0

    def __call__(self, *events: Any, ts: int = T0) -> list[Any]:
        out: list[Any] = []
        for event in events:
            self.seq += 1
            self.state, effects = actors.step(self.kind, self.state, "K-1", self.seq, event, ts, self.th)
            out += effects
        return out

    def view(self) -> dict[str, Any]:
        assert self.state is not None
        return actors.view(self.kind, self.state, self.th)


# --- sku ----------------------------------------------------------------------------------


def test_a_location_threshold_raises_and_clears_at_once() -> None:
    a = Actor("sku")
    assert alerts(a(Received(location="DS", qty=8), Received(location="WH", qty=600))) == []
    # The dark store's own threshold: raised by the settings event itself.
    assert alerts(a(SkuSettings(location="DS", low_stock_threshold=10))) == [
        ("low_stock", "raised", "DS", 8, 10)
    ]
    # The warehouse's: 600 <= 700.
    assert alerts(a(SkuSettings(location="WH", low_stock_threshold=700))) == [
        ("low_stock", "raised", "WH", 600, 700)
    ]
    # A counter event reports the threshold in effect.
    assert alerts(a(Received(location="DS", qty=3))) == [("low_stock", "cleared", "DS", 11, 10)]
    # The threshold drops: the raised warehouse alert clears at once.
    assert alerts(a(SkuSettings(location="WH", low_stock_threshold=100))) == [
        ("low_stock", "cleared", "WH", 600, 100)
    ]


def test_location_then_sku_then_config() -> None:
    a = Actor("sku")
    a(Received(location="A", qty=7), Received(location="B", qty=7))
    # SKU-wide 8: both raise.
    assert alerts(a(SkuSettings(low_stock_threshold=8))) == [
        ("low_stock", "raised", "A", 7, 8),
        ("low_stock", "raised", "B", 7, 8),
    ]
    # A's own 3 wins over the SKU's 8.
    assert alerts(a(SkuSettings(location="A", low_stock_threshold=3))) == [("low_stock", "cleared", "A", 7, 3)]
    v = a.view()
    assert v["locations"]["A"]["low_stock_threshold"] == 3
    assert v["locations"]["A"]["low_stock_threshold_from"] == "location"
    assert v["locations"]["B"]["low_stock_threshold"] == 8
    assert v["locations"]["B"]["low_stock_threshold_from"] == "entity"
    assert v["settings"] == {"low_stock_threshold": 8, "locations": {"A": {"low_stock_threshold": 3}}}
    assert v["effective"]["low_stock_threshold"] == {"value": 8, "from": "entity"}
    # Reset the SKU-wide one: B falls back to the config's 5, A keeps its own.
    assert alerts(a(SkuSettings(reset=["low_stock_threshold"]))) == [("low_stock", "cleared", "B", 7, 5)]
    # Reset A's: it inherits the config's 5 too.
    assert alerts(a(SkuSettings(location="A", reset=["low_stock_threshold"]))) == []
    v = a.view()
    assert v["settings"] == {}
    assert v["locations"]["A"]["low_stock_threshold_from"] == "config"
    assert a.state.settings is None  # nothing left: as if never set


def test_a_setting_for_an_unseen_location_waits_for_it() -> None:
    a = Actor("sku")
    a(Received(location="A", qty=50))
    assert alerts(a(SkuSettings(location="NEW", low_stock_threshold=20))) == []
    assert list(a.state.locations) == ["A"]  # not created
    assert a.view()["settings"]["locations"] == {"NEW": {"low_stock_threshold": 20}}
    assert "NEW" not in a.view()["locations"]
    assert alerts(a(Received(location="NEW", qty=15))) == [("low_stock", "raised", "NEW", 15, 20)]


def test_a_first_settings_event_creates_the_key_but_no_location() -> None:
    a = Actor("sku")
    assert a(SkuSettings(low_stock_threshold=1)) == []
    assert a.state.seq == 1
    assert a.view()["locations"] == {}
    assert a.view()["out_of_stock"] is True


def test_return_spike_settings_apply_at_once_and_never_move_the_window() -> None:
    a = Actor("sku")
    a(Received(location="A", qty=100), ts=T0)
    a(Picked(location="A", qty=10), Returned(location="A", qty=4), ts=T0 + 10 * M)
    assert a.state.return_spike is False  # 4 < 10 units
    # A settings event a day later (ts far ahead) lowers the minimum: raised, window unmoved.
    out = a(SkuSettings(return_spike_min_units=4), ts=T0 + 48 * H)
    assert alerts(out) == [("return_spike", "raised", None, 4, 4)]
    assert a.state.latest_hour == (T0 + 10 * M) // H
    assert (a.state.returned, a.state.picked) == (4, 10)
    # The ratio: 4 >= 0.5 * 10 is false: cleared.
    assert alerts(a(SkuSettings(return_spike_ratio=0.5), ts=T0 + 48 * H)) == [
        ("return_spike", "cleared", None, 4, 4)
    ]
    v = a.view()
    assert v["effective"]["return_spike_min_units"] == {"value": 4, "from": "entity"}
    assert v["effective"]["return_spike_ratio"] == {"value": 0.5, "from": "entity"}
    assert alerts(a(SkuSettings(reset=["return_spike_ratio", "return_spike_min_units"]))) == []
    assert a.view()["effective"]["return_spike_ratio"] == {"value": 0.2, "from": "config"}
    # A later real event still moves the window as before.
    a(Returned(location="A", qty=1), ts=T0 + 30 * H)
    assert a.state.latest_hour == (T0 + 30 * H) // H


def test_low_stock_alert_threshold_is_the_one_in_effect_on_counter_events() -> None:
    a = Actor("sku")
    a(SkuSettings(low_stock_threshold=-2))
    assert alerts(a(Ordered(location="A", qty=2, order_id="o"))) == [
        ("stockout", "raised", "A", -2, 0),
        ("low_stock", "raised", "A", -2, -2),
        ("oversold", "raised", "A", -2, 0),
    ]


# --- shipment -----------------------------------------------------------------------------


def test_a_changed_stall_after_moves_the_pending_timer() -> None:
    a = Actor("shipment")
    a(Booked(promised_by=from_us(T0 + 48 * H)), ts=T0)
    assert timer_fx(a(PickedUp(), ts=T0 + H)) == [("stall", T0 + H + 6 * H)]
    out = a(ShipmentSettings(stall_after="90m"), ts=T0 + 2 * H)
    assert timer_fx(out) == [("stall", T0 + H + 90 * M)]
    assert alerts(out) == []
    # The old deadline is stale.
    assert actors.fire("shipment", a.state, "stall", T0 + 7 * H, TH) == []
    fired = actors.fire("shipment", a.state, "stall", T0 + H + 90 * M, TH)
    assert [(e.rule, e.status) for e in fired if isinstance(e, Alert)] == [("stalled", "raised")]
    assert a.view()["settings"] == {"stall_after": "90m"}
    assert a.view()["effective"] == {"stall_after": {"value": "90m", "from": "entity"}}


def test_a_deadline_already_past_is_still_set_for_the_timer_path() -> None:
    a = Actor("shipment")
    a(PickedUp(), ts=T0)
    out = a(ShipmentSettings(stall_after="1.5h"), ts=T0 + 5 * H)
    assert timer_fx(out) == [("stall", T0 + 90 * M)]  # in the past: it fires through the timer path


def test_stalled_once_per_last_movement_whatever_the_setting() -> None:
    a = Actor("shipment")
    a(PickedUp(), ts=T0)
    actors.fire("shipment", a.state, "stall", T0 + 6 * H, TH)
    assert a.state.stalled
    out = a(ShipmentSettings(stall_after="1h"))
    assert timer_fx(out) == []
    assert alerts(out) == []
    assert "stall" not in actors.timers("shipment", a.state)


def test_carrier_stall_after_and_a_later_booked_rederives_it() -> None:
    th = Thresholds.from_rules(
        msgspec.convert({"shipment": {"carriers": {"SURFACE-CO": "24h", "EXPRESS": "2h"}}}, type=_rules())
    )
    a = Actor("shipment", th)
    a(Booked(promised_by=from_us(T0 + 99 * H), carrier="SURFACE-CO"), ts=T0)
    assert timer_fx(a(InTransit(), ts=T0 + H)) == [("stall", T0 + 25 * H)]
    assert a.view()["effective"] == {"stall_after": {"value": "24h", "from": "carrier"}}
    # A later booked changing the carrier re-derives stall_after.
    assert timer_fx(a(Booked(promised_by=from_us(T0 + 99 * H), carrier="EXPRESS"), ts=T0 + 2 * H)) == [
        ("stall", T0 + 3 * H)
    ]
    # Case-sensitive: no match, the config's 6h.
    assert timer_fx(a(Booked(promised_by=from_us(T0 + 99 * H), carrier="express"), ts=T0 + 2 * H)) == [
        ("stall", T0 + 7 * H)
    ]
    assert a.view()["effective"] == {"stall_after": {"value": "6h", "from": "config"}}
    # The shipment's own setting wins over the carrier; a reset returns to it.
    a(Booked(promised_by=from_us(T0 + 99 * H), carrier="SURFACE-CO"), ts=T0 + 2 * H)
    assert timer_fx(a(ShipmentSettings(stall_after="30m"))) == [("stall", T0 + H + 30 * M)]
    assert timer_fx(a(ShipmentSettings(reset=["stall_after"]))) == [("stall", T0 + 25 * H)]
    assert a.view()["settings"] == {}


def _rules() -> type:
    from contracts.config import RulesConfig

    return RulesConfig


# --- campaign -----------------------------------------------------------------------------


def test_campaign_settings_reevaluate_and_apply_when_ended() -> None:
    a = Actor("campaign")
    a(Started(cpa_limit=10.0), Spend(amount=50.0), Conversion(count=1))
    assert a.state.cpa_exceeded is False  # spend 50 < cpa_min_spend 100
    assert alerts(a(CampaignSettings(cpa_min_spend=40.0))) == [("cpa_exceeded", "raised", None, 50.0, 10.0)]
    assert alerts(a(CampaignSettings(cpa_limit=60.0))) == [("cpa_exceeded", "cleared", None, 50.0, 60.0)]
    assert alerts(a(CampaignSettings(budget=50.0))) == [("budget_exhausted", "raised", None, 50.0, 50.0)]
    assert a.view()["settings"] == {"cpa_limit": 60.0, "budget": 50.0, "cpa_min_spend": 40.0}
    a(Paused(), Ended())
    # Ended: settings still apply, and never activate or link anything.
    assert alerts(a(CampaignSettings(reset=["budget"]))) == [("budget_exhausted", "cleared", None, 50.0, None)]
    out = a(CampaignSettings(reset=["cpa_limit", "cpa_min_spend"]))
    assert [e for e in out if not isinstance(e, Alert)] == []
    assert (a.state.active, a.state.ended, a.state.skus) == (False, True, {})
    assert a.view()["settings"] == {}
    assert a.view()["effective"] == {"cpa_min_spend": {"value": 100.0, "from": "config"}}
    # A later `started` changes nothing once ended (2.3), settings still do.
    a(Started(cpa_limit=1.0))
    assert a.state.cpa_limit is None


def test_started_and_settings_replace_each_other() -> None:
    a = Actor("campaign")
    a(Started(cpa_limit=10.0, budget=100.0), CampaignSettings(cpa_limit=20.0))
    assert (a.state.cpa_limit, a.state.budget) == (20.0, 100.0)
    a(Started(budget=5.0))
    assert (a.state.cpa_limit, a.state.budget) == (20.0, 5.0)


# --- snapshots ----------------------------------------------------------------------------


def test_settings_survive_encode_decode_and_old_snapshots_still_decode() -> None:
    a = Actor("sku")
    a(Received(location="A", qty=5), SkuSettings(location="B", low_stock_threshold=2))
    a(SkuSettings(return_spike_ratio=1.5))
    back = actors.decode_state("sku", actors.encode_state(a.state))
    assert back == a.state
    assert back.settings is not None
    assert back.settings.locations == {"B": 2}
    # A snapshot written before settings existed has no such field.
    old = msgspec.msgpack.encode({"key": "K-1", "seq": 3, "locations": {"A": {"on_hand": 2}}, "available": 2})
    state = actors.decode_state("sku", old)
    assert state.settings is None
    assert state.locations["A"].on_hand == 2
    old = msgspec.msgpack.encode({"key": "S", "seq": 3, "status": "picked_up", "last_movement": T0})
    ship = actors.decode_state("shipment", old)
    assert (ship.stall_after, ship.stall_after_us) == (None, None)
    old = msgspec.msgpack.encode({"key": "C", "seq": 3, "cpa_limit": 2.0})
    assert actors.decode_state("campaign", old).cpa_min_spend is None
    # And a state without settings encodes exactly as before (omit_defaults).
    plain = sku.new("K-1")
    assert b"settings" not in actors.encode_state(plain)
    assert shipment.new("S").stall_after is None
    assert campaign.new("C").cpa_min_spend is None
