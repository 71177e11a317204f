"""The shipment actor: status by rank, ETA by latest ts, movements, rules, and virtual timers."""

from __future__ import annotations

from typing import Any

import pytest

from actors import ActorError, Alert, SetTimer, Thresholds, shipment
from contracts.events import (
    Booked,
    Delayed,
    Delivered,
    DeliveryFailed,
    InTransit,
    OutForDelivery,
    PickedUp,
    Received,
    Temperature,
)
from contracts.times import from_us

TH = Thresholds()
H = 3_600_000_000
T0 = 472_222 * H  # 2023-11-14T22:00:00Z
STALL = TH.stall_after_us


def at(us: int) -> Any:
    return from_us(us)


def alerts(effects: list[Any]) -> list[tuple[Any, ...]]:
    return [(e.rule, e.status, e.value, e.threshold) for e in effects if isinstance(e, Alert)]


def timer_fx(effects: list[Any]) -> list[tuple[str, int | None]]:
    return [(e.name, e.deadline_us) for e in effects if isinstance(e, SetTimer)]


def run(state: shipment.ShipmentState, *events: Any, ts: int = T0, th: Thresholds = TH) -> list[Any]:
    out: list[Any] = []
    for event in events:
        out += shipment.apply(state, event, ts, th)
    return out


def booked(pb: int, **kw: Any) -> Booked:
    return Booked(promised_by=at(pb), **kw)


# --- status, eta, movements -------------------------------------------------------------


def test_status_is_none_until_a_status_event() -> None:
    s = shipment.new("SHP-1")
    run(s, Temperature(celsius=4.0), Delayed(eta=at(T0)))
    assert s.status is None
    assert shipment.view(s)["status"] is None


def test_status_is_the_highest_rank_seen_ties_to_the_later() -> None:
    s = shipment.new("SHP-1")
    run(s, InTransit(), ts=T0 + 2 * H)
    run(s, PickedUp(), ts=T0 + 1 * H)  # late: lower rank
    assert s.status == "in_transit"
    run(s, booked(T0 + 48 * H))
    assert s.status == "in_transit"
    run(s, DeliveryFailed())
    assert s.status == "delivery_failed"
    run(s, OutForDelivery())  # same rank, later in stream order
    assert s.status == "out_for_delivery"
    run(s, DeliveryFailed())
    assert s.status == "delivery_failed"
    run(s, Delivered(), InTransit(), DeliveryFailed())
    assert s.status == "delivered"


def test_eta_comes_from_the_latest_ts_ties_to_the_later_in_stream() -> None:
    s = shipment.new("SHP-1")
    run(s, InTransit(eta=at(T0 + 10 * H)), ts=T0 + 2 * H)
    assert s.eta == T0 + 10 * H
    run(s, Delayed(eta=at(T0 + 20 * H)), ts=T0 + 1 * H)  # older report: ignored
    assert s.eta == T0 + 10 * H
    run(s, InTransit(), ts=T0 + 5 * H)  # carries no eta
    assert s.eta == T0 + 10 * H
    run(s, OutForDelivery(eta=at(T0 + 3 * H)), ts=T0 + 2 * H)  # tie: later in stream wins
    assert s.eta == T0 + 3 * H
    run(s, Delayed(eta=at(T0 + 30 * H)), ts=T0 + 4 * H)
    assert shipment.view(s)["eta"] == "2023-11-16T04:00:00Z"


def test_last_movement_is_the_latest_movement_ts() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + 48 * H), ts=T0 + 9 * H)
    assert s.last_movement is None
    run(s, InTransit(), ts=T0 + 3 * H)
    run(s, PickedUp(), ts=T0 + 1 * H)
    run(s, Delayed(eta=at(T0)), Temperature(celsius=1.0), ts=T0 + 8 * H)  # not movements
    assert s.last_movement == T0 + 3 * H
    run(s, Delivered(), ts=T0 + 5 * H)
    assert s.last_movement == T0 + 5 * H


def test_delivered_at_is_the_first_delivered_in_stream_order() -> None:
    s = shipment.new("SHP-1")
    run(s, Delivered(), ts=T0 + 5 * H)
    run(s, Delivered(), ts=T0 + 1 * H)
    assert s.delivered_at == T0 + 5 * H
    assert shipment.view(s)["delivered_at"] == "2023-11-15T03:00:00Z"


def test_a_later_booked_replaces_promised_by_and_each_bound_it_gives() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + 24 * H, temp_min=2.0, temp_max=8.0, carrier="DHL"))
    run(s, booked(T0 + 48 * H, temp_max=10.0))
    assert (s.promised_by, s.temp_min, s.temp_max, s.carrier) == (T0 + 48 * H, 2.0, 10.0, "DHL")


# --- sla_at_risk ------------------------------------------------------------------------


def test_sla_at_risk_crossings() -> None:
    s = shipment.new("SHP-1")
    assert alerts(run(s, InTransit(eta=at(T0 + 30 * H)), ts=T0)) == []  # no promised_by yet
    assert alerts(run(s, booked(T0 + 24 * H), ts=T0)) == [("sla_at_risk", "raised", None, None)]
    assert alerts(run(s, Delayed(eta=at(T0 + 31 * H)), ts=T0 + 1)) == []
    assert alerts(run(s, Delayed(eta=at(T0 + 24 * H)), ts=T0 + 2)) == [("sla_at_risk", "cleared", None, None)]
    assert alerts(run(s, Delayed(eta=at(T0 + 25 * H)), ts=T0 + 3)) == [("sla_at_risk", "raised", None, None)]
    eff = run(s, Delivered(), ts=T0 + 4)
    assert alerts(eff) == [("sla_at_risk", "cleared", None, None)]


# --- sla_breached -----------------------------------------------------------------------


def test_sla_breached_by_a_late_delivered_raises_once() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + 24 * H))
    assert alerts(run(s, Delivered(), ts=T0 + 24 * H + 1)) == [("sla_breached", "raised", None, None)]
    assert alerts(run(s, Delivered(), ts=T0 + 25 * H)) == []
    assert alerts(run(s, booked(T0 + 48 * H))) == []  # never cleared
    assert shipment.raised(s) == [{"rule": "sla_breached", "location": None}]


def test_delivered_on_time_is_no_breach() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + 24 * H))
    assert alerts(run(s, Delivered(), ts=T0 + 24 * H)) == []
    assert shipment.timers(s) == {}


def test_a_booked_after_delivered_can_reveal_the_breach() -> None:
    s = shipment.new("SHP-1")
    run(s, Delivered(), ts=T0 + 10 * H)
    assert alerts(run(s, booked(T0 + 9 * H), ts=T0 + 11 * H)) == [("sla_breached", "raised", None, None)]


def test_sla_timer_is_set_moved_and_cancelled() -> None:
    s = shipment.new("SHP-1")
    assert timer_fx(run(s, booked(T0 + 24 * H))) == [("sla", T0 + 24 * H)]
    assert shipment.timers(s) == {"sla": T0 + 24 * H}
    assert timer_fx(run(s, booked(T0 + 24 * H))) == []  # unchanged: no effect
    assert timer_fx(run(s, booked(T0 + 30 * H))) == [("sla", T0 + 30 * H)]
    assert timer_fx(run(s, Delivered(), ts=T0)) == [("sla", None)]
    assert shipment.timers(s) == {}


def test_sla_timer_fires_once_and_stale_firings_do_nothing() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + 24 * H))
    run(s, booked(T0 + 30 * H))
    assert shipment.fire(s, "sla", T0 + 24 * H, TH) == []  # stale deadline
    assert shipment.fire(s, "stall", T0 + 30 * H, TH) == []  # wrong name
    eff = shipment.fire(s, "sla", T0 + 30 * H, TH)
    assert alerts(eff) == [("sla_breached", "raised", None, None)]
    assert timer_fx(eff) == [("sla", None)]
    assert "not delivered by promised_by 2023-11-16T04:00:00Z" in eff[0].message
    assert shipment.fire(s, "sla", T0 + 30 * H, TH) == []  # the same timer twice
    assert shipment.timers(s) == {}
    # a late delivery after a timer breach raises nothing more, and a new booked sets no timer
    assert alerts(run(s, Delivered(), ts=T0 + 31 * H)) == []
    s2 = shipment.new("SHP-2")
    run(s2, booked(T0))
    shipment.fire(s2, "sla", T0, TH)
    assert timer_fx(run(s2, booked(T0 + 99 * H))) == []


def test_sla_timer_after_delivery_is_stale() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + 24 * H), Delivered())
    assert shipment.fire(s, "sla", T0 + 24 * H, TH) == []
    assert shipment.raised(s) == []


# --- stalled ----------------------------------------------------------------------------


def test_stall_timer_follows_last_movement_while_moving() -> None:
    s = shipment.new("SHP-1")
    assert timer_fx(run(s, booked(T0 + 99 * H), ts=T0)) == [("sla", T0 + 99 * H)]
    assert timer_fx(run(s, PickedUp(), ts=T0 + H)) == [("stall", T0 + H + STALL)]
    assert timer_fx(run(s, InTransit(), ts=T0 + H)) == []  # same last_movement
    assert timer_fx(run(s, InTransit(), ts=T0)) == []  # older movement
    assert timer_fx(run(s, InTransit(), ts=T0 + 2 * H)) == [("stall", T0 + 2 * H + STALL)]
    assert shipment.timers(s) == {"sla": T0 + 99 * H, "stall": T0 + 2 * H + STALL}
    assert timer_fx(run(s, DeliveryFailed(), ts=T0 + 3 * H)) == [("stall", None)]
    assert timer_fx(run(s, OutForDelivery(), ts=T0 + 4 * H)) == [("stall", T0 + 4 * H + STALL)]
    assert timer_fx(run(s, Delivered(), ts=T0 + 5 * H)) == [("sla", None), ("stall", None)]


def test_stalled_raises_by_timer_once_and_clears_when_movement_advances() -> None:
    s = shipment.new("SHP-1")
    run(s, PickedUp(), ts=T0)
    assert shipment.fire(s, "stall", T0 + STALL - 1, TH) == []  # stale
    eff = shipment.fire(s, "stall", T0 + STALL, TH)
    assert alerts(eff) == [("stalled", "raised", None, None)]
    assert timer_fx(eff) == [("stall", None)]
    assert shipment.fire(s, "stall", T0 + STALL, TH) == []  # repeated
    assert shipment.timers(s) == {}
    assert run(s, InTransit(), ts=T0) == []  # not strictly later: stays raised, no timer
    assert run(s, Temperature(celsius=3.0), ts=T0 + 9 * H) == []
    eff = run(s, InTransit(), ts=T0 + 1)
    assert alerts(eff) == [("stalled", "cleared", None, None)]
    assert timer_fx(eff) == [("stall", T0 + 1 + STALL)]


def test_stalled_clears_when_the_status_leaves_the_moving_three() -> None:
    s = shipment.new("SHP-1")
    run(s, InTransit(), ts=T0)
    shipment.fire(s, "stall", T0 + STALL, TH)
    eff = run(s, DeliveryFailed(), ts=T0 + 1)
    assert alerts(eff) == [("stalled", "cleared", None, None), ("delivery_failed", "raised", None, None)]
    # back to a moving status with no newer movement: one last_movement raises at most once
    eff = run(s, OutForDelivery(), ts=T0 - 1)
    assert alerts(eff) == [("delivery_failed", "cleared", None, None)]
    assert timer_fx(eff) == []
    assert shipment.timers(s) == {}
    assert shipment.fire(s, "stall", T0 + STALL, TH) == []
    # a newer movement arms it again
    assert timer_fx(run(s, OutForDelivery(), ts=T0 + 2)) == [("stall", T0 + 2 + STALL)]


def test_stalled_clears_on_delivered() -> None:
    s = shipment.new("SHP-1")
    run(s, PickedUp(), ts=T0)
    shipment.fire(s, "stall", T0 + STALL, TH)
    assert alerts(run(s, Delivered(), ts=T0 - 5)) == [("stalled", "cleared", None, None)]


def test_stall_after_comes_from_thresholds_and_the_set_deadline_stays_valid() -> None:
    th = Thresholds(stall_after_us=60_000_000)
    s = shipment.new("SHP-1")
    assert timer_fx(run(s, PickedUp(), ts=T0, th=th)) == [("stall", T0 + 60_000_000)]
    # the deadline was fixed when it was set, so a different config cannot orphan it
    assert alerts(shipment.fire(s, "stall", T0 + 60_000_000, TH)) == [("stalled", "raised", None, None)]


# --- temperature_excursion --------------------------------------------------------------


def test_temperature_without_bounds_never_raises() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + H))
    assert alerts(run(s, Temperature(celsius=80.0), Temperature(celsius=-80.0))) == []


def test_temperature_excursion_values_and_thresholds() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + H, temp_min=2.0, temp_max=8.0))
    assert alerts(run(s, Temperature(celsius=8.0))) == []
    assert alerts(run(s, Temperature(celsius=9.5))) == [("temperature_excursion", "raised", 9.5, 8.0)]
    assert alerts(run(s, Temperature(celsius=1.0))) == []  # stays out of range
    assert alerts(run(s, Temperature(celsius=2.0))) == [("temperature_excursion", "cleared", 2.0, None)]
    assert alerts(run(s, Temperature(celsius=1.5))) == [("temperature_excursion", "raised", 1.5, 2.0)]
    assert shipment.view(s)["temperature"] == 1.5


def test_each_bound_is_independent() -> None:
    s = shipment.new("SHP-1")
    run(s, booked(T0 + H, temp_max=8))
    assert alerts(run(s, Temperature(celsius=-40.0))) == []
    assert alerts(run(s, Temperature(celsius=8.1))) == [("temperature_excursion", "raised", 8.1, 8.0)]


def test_a_new_booked_reevaluates_the_last_temperature() -> None:
    s = shipment.new("SHP-1")
    assert alerts(run(s, Temperature(celsius=9.0))) == []  # no range yet
    assert alerts(run(s, booked(T0 + H, temp_max=8.0))) == [("temperature_excursion", "raised", 9.0, 8.0)]
    assert alerts(run(s, booked(T0 + H, temp_min=1.0))) == []  # temp_max kept
    assert alerts(run(s, booked(T0 + H, temp_max=10.0))) == [("temperature_excursion", "cleared", 9.0, None)]


# --- delivery_failed and the rest -------------------------------------------------------


def test_delivery_failed_follows_the_status() -> None:
    s = shipment.new("SHP-1")
    eff = run(s, DeliveryFailed(reason="no one home"))
    assert alerts(eff) == [("delivery_failed", "raised", None, None)]
    assert eff[0].message == "SHP-1 delivery failed: no one home"
    assert alerts(run(s, DeliveryFailed())) == []
    assert alerts(run(s, Delivered())) == [("delivery_failed", "cleared", None, None)]


def test_view_and_raised() -> None:
    s = shipment.new("SHP-1")
    assert shipment.view(s)["promised_by"] is None
    run(s, booked(T0 + 24 * H, temp_max=8.0), ts=T0)
    run(s, InTransit(eta=at(T0 + 25 * H)), ts=T0 + 1_500)
    run(s, Temperature(celsius=9.0), DeliveryFailed(), ts=T0 + 2 * H)
    shipment.fire(s, "sla", T0 + 24 * H, TH)
    v = shipment.view(s)
    assert {k: v[k] for k in ("status", "promised_by", "eta", "last_movement", "temperature")} == {
        "status": "delivery_failed",
        "promised_by": "2023-11-15T22:00:00Z",
        "eta": "2023-11-15T23:00:00Z",
        "last_movement": "2023-11-14T22:00:00.001500Z",
        "temperature": 9.0,
    }
    assert [r["rule"] for r in shipment.raised(s)] == [
        "sla_at_risk",
        "sla_breached",
        "temperature_excursion",
        "delivery_failed",
    ]


def test_a_foreign_event_is_an_actor_error_and_changes_nothing() -> None:
    from actors import encode_state

    s = shipment.new("SHP-1")
    run(s, PickedUp())
    before = encode_state(s)
    with pytest.raises(ActorError, match="not a shipment event"):
        shipment.apply(s, Received(location="A", qty=1), T0, TH)  # type: ignore[arg-type]
    assert encode_state(s) == before
