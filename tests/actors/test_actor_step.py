"""The actors' front door: step's sequence guard, dispatch by kind, state (de)serialization."""

from __future__ import annotations

import datetime as dt

import pytest

import actors
from actors import ActorError, Thresholds
from contracts.events import KINDS, Booked, Delayed, PickedUp, Received, Spend, Started
from contracts.rules import RULES_BY_KIND

TH = Thresholds()
T0 = 1_700_000_000_000_000


def test_every_kind_has_an_actor_and_a_state_type() -> None:
    assert set(actors.ACTORS) == set(KINDS) == set(actors.STATE_TYPES)
    for kind, mod in actors.ACTORS.items():
        state = mod.new("K-1")
        assert isinstance(state, actors.STATE_TYPES[kind])
        assert (state.key, state.seq) == ("K-1", 0)
        for name in ("new", "apply", "fire", "timers", "view", "raised"):
            assert callable(getattr(mod, name))


def test_step_creates_applies_and_records_the_sequence() -> None:
    state, effects = actors.step("sku", None, "SKU-1", 7, Received(location="A", qty=1), T0, TH)
    assert state.seq == 7
    assert state.key == "SKU-1"
    assert [e.rule for e in effects] == ["low_stock"]  # type: ignore[union-attr]
    again, effects = actors.step("sku", state, "SKU-1", 8, Received(location="A", qty=9), T0, TH)
    assert again is state
    assert state.seq == 8


def test_step_never_applies_a_sequence_twice() -> None:
    state, _ = actors.step("sku", None, "SKU-1", 7, Received(location="A", qty=1), T0, TH)
    before = actors.encode_state(state)
    for seq in (7, 6, 1):
        same, effects = actors.step("sku", state, "SKU-1", seq, Received(location="A", qty=1), T0, TH)
        assert same is state
        assert effects == []
    assert actors.encode_state(state) == before


def test_step_with_seq_zero_on_a_new_key_applies_nothing() -> None:
    state, effects = actors.step("campaign", None, "C1", 0, Spend(amount=1.0), T0, TH)
    assert effects == []
    assert state.seq == 0
    assert state.spend == 0.0


def test_step_reports_a_failure_as_actor_error_naming_key_and_seq() -> None:
    with pytest.raises(ActorError, match="not a shipment event"):
        actors.step("shipment", None, "SHP-1", 3, Received(location="A", qty=1), T0, TH)
    state, _ = actors.step("sku", None, "SKU-1", 1, Received(location="A", qty=1), T0, TH)
    before = actors.encode_state(state)
    bad = Received(location="A", qty="2")  # type: ignore[arg-type]  # Struct() does not validate
    with pytest.raises(ActorError, match=r"^sku:SKU-1 seq 4: TypeError"):
        actors.step("sku", state, "SKU-1", 4, bad, T0, TH)
    assert actors.encode_state(state) == before
    assert state.seq == 1


def test_fire_timers_view_raised_dispatch_by_kind() -> None:
    state, effects = actors.step(
        "shipment", None, "SHP-1", 1, Booked(promised_by=dt.datetime(2024, 1, 1, tzinfo=dt.UTC)), T0, TH
    )
    deadline = actors.timers("shipment", state)["sla"]
    assert effects == [actors.SetTimer("sla", deadline)]
    fired = actors.fire("shipment", state, "sla", deadline, TH)
    assert [type(e) for e in fired] == [actors.Alert, actors.SetTimer]
    assert fired[0] == actors.Alert("sla_breached", "raised", None, None, None, fired[0].message)  # type: ignore[union-attr]
    assert actors.raised("shipment", state) == [{"rule": "sla_breached", "location": None}]
    assert actors.view("shipment", state)["promised_by"] == "2024-01-01T00:00:00Z"
    assert actors.fire("shipment", state, "sla", deadline, TH) == []


@pytest.mark.parametrize(
    ("kind", "events"),
    [
        ("sku", [Received(location="A", qty=3), Received(location="B", qty=1)]),
        (
            "shipment",
            [
                Booked(promised_by=dt.datetime(2024, 1, 1, tzinfo=dt.UTC), temp_max=8.0, carrier="DHL"),
                PickedUp(),
                Delayed(eta=dt.datetime(2024, 1, 2, tzinfo=dt.UTC)),
            ],
        ),
        ("campaign", [Started(skus=["S1", "S2"], budget=5.0), Spend(amount=7.5)]),
    ],
)
def test_state_round_trips_through_msgpack(kind: str, events: list[object]) -> None:
    state = None
    for seq, event in enumerate(events, 1):
        state, _ = actors.step(kind, state, "K-1", seq, event, T0 + seq, TH)
    assert state is not None
    data = actors.encode_state(state)
    back = actors.decode_state(kind, data)
    assert back == state
    assert type(back) is type(state)
    assert actors.encode_state(back) == data
    assert actors.view(kind, back) == actors.view(kind, state)


def test_a_new_state_encodes_small() -> None:
    # omit_defaults: an idle actor costs little in SQLite.
    for kind, mod in actors.ACTORS.items():
        assert len(actors.encode_state(mod.new("K-1"))) < 16, kind


def test_every_rule_of_the_table_is_reported_by_its_kind() -> None:
    from actors import campaign, shipment, sku

    assert tuple(r.name for r in RULES_BY_KIND["sku"]) == (*sku._LOCATION_RULES, "return_spike")
    assert tuple(r.name for r in RULES_BY_KIND["shipment"]) == shipment._RULES
    assert tuple(r.name for r in RULES_BY_KIND["campaign"]) == campaign._RULES


def test_views_and_raised_lists_encode_as_json() -> None:
    import msgspec

    events = {
        "sku": [Received(location="A", qty=1)],
        "shipment": [Booked(promised_by=dt.datetime(2024, 1, 1, tzinfo=dt.UTC)), PickedUp()],
        "campaign": [Started(skus=["S1"]), Spend(amount=1.5)],
    }
    for kind, evs in events.items():
        state = None
        for seq, event in enumerate(evs, 1):
            state, _ = actors.step(kind, state, "K-1", seq, event, T0, TH)
        assert state is not None
        reply = {"state": actors.view(kind, state), "exceptions": actors.raised(kind, state)}
        assert msgspec.json.decode(msgspec.json.encode(reply)) == reply
