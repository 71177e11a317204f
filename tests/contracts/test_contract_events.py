"""Every event type survives an encode/decode round trip; the tables cover every type."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.decode import decode_payload
from contracts.events import (
    EVENT_TYPES,
    EVENT_UNIONS,
    KEY_RE,
    KINDS,
    MAX_INT,
    Adjusted,
    Booked,
    CampaignLinked,
    CampaignSettings,
    CampaignUnlinked,
    Cancelled,
    Conversion,
    Counted,
    Delayed,
    Delivered,
    DeliveryFailed,
    Ended,
    InTransit,
    Ordered,
    OutForDelivery,
    Paused,
    Picked,
    PickedUp,
    Received,
    Resumed,
    Returned,
    ShipmentSettings,
    SkuBackInStock,
    SkuOutOfStock,
    SkuSettings,
    Spend,
    Started,
    Temperature,
    encode_event,
    json_schema,
)

KEY = st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True)
LOCATION = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=128)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
OPT_TEXT = st.none() | TEXT
OFFSET = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
TIME = st.datetimes(
    min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59), timezones=OFFSET
)
FLOAT = st.floats(allow_nan=False, allow_infinity=False)
POS_INT = st.integers(1, MAX_INT)
COMMON = {"ts": st.none() | TIME, "id": OPT_TEXT}


def ev(cls: type, **fields: Any) -> st.SearchStrategy[Any]:
    return st.builds(cls, **fields, **COMMON)


@st.composite
def settings_event(draw: st.DrawFn, cls: type, fields: dict[str, st.SearchStrategy[Any]]) -> Any:
    """A valid `settings` event: each field set, reset or left alone, never both."""
    values: dict[str, Any] = {}
    reset: list[str] = []
    for name, strategy in fields.items():
        choice = draw(st.sampled_from(["set", "reset", "absent"]))
        if choice == "set":
            values[name] = draw(strategy)
        elif choice == "reset":
            reset.append(name)
    return cls(**values, reset=reset or draw(st.sampled_from([None, []])), **draw(st.fixed_dictionaries(COMMON)))


DURATION = st.from_regex(r"[1-9][0-9]{0,3}(\.[0-9]{1,3})?(us|ms|s|m|h|d)", fullmatch=True)
SKU_SETTINGS = st.one_of(
    settings_event(
        SkuSettings,
        {
            "low_stock_threshold": st.integers(-MAX_INT, MAX_INT),
            "return_spike_min_units": st.integers(0, MAX_INT),
            "return_spike_ratio": st.floats(min_value=0, allow_infinity=False),
        },
    ),
    st.builds(
        lambda loc, e: SkuSettings(
            location=loc, low_stock_threshold=e.low_stock_threshold, reset=e.reset, ts=e.ts, id=e.id
        ),
        LOCATION,
        settings_event(SkuSettings, {"low_stock_threshold": st.integers(-MAX_INT, MAX_INT)}),
    ),
)

STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    SkuSettings: SKU_SETTINGS,
    ShipmentSettings: settings_event(ShipmentSettings, {"stall_after": DURATION}),
    CampaignSettings: settings_event(
        CampaignSettings,
        {"cpa_limit": FLOAT, "budget": FLOAT, "cpa_min_spend": st.floats(min_value=0, allow_infinity=False)},
    ),
    Received: ev(Received, location=LOCATION, qty=POS_INT),
    Ordered: ev(Ordered, location=LOCATION, qty=POS_INT, order_id=TEXT),
    Cancelled: ev(Cancelled, location=LOCATION, qty=POS_INT, order_id=TEXT),
    Picked: ev(Picked, location=LOCATION, qty=POS_INT, order_id=OPT_TEXT),
    Returned: ev(
        Returned, location=LOCATION, qty=POS_INT, restockable=st.none() | st.booleans(), reason=OPT_TEXT
    ),
    Adjusted: ev(
        Adjusted, location=LOCATION, delta=st.integers(-MAX_INT, MAX_INT).filter(bool), reason=OPT_TEXT
    ),
    Counted: ev(Counted, location=LOCATION, on_hand=st.integers(0, MAX_INT)),
    CampaignLinked: ev(CampaignLinked, campaign=KEY),
    CampaignUnlinked: ev(CampaignUnlinked, campaign=KEY),
    Booked: ev(
        Booked,
        promised_by=TIME,
        carrier=OPT_TEXT,
        origin=OPT_TEXT,
        destination=OPT_TEXT,
        order_id=OPT_TEXT,
        temp_min=st.none() | FLOAT,
        temp_max=st.none() | FLOAT,
    ),
    PickedUp: ev(PickedUp, location=OPT_TEXT),
    InTransit: ev(InTransit, location=OPT_TEXT, eta=st.none() | TIME),
    Delayed: ev(Delayed, eta=TIME, reason=OPT_TEXT),
    OutForDelivery: ev(OutForDelivery, eta=st.none() | TIME),
    DeliveryFailed: ev(DeliveryFailed, reason=OPT_TEXT),
    Delivered: ev(Delivered),
    Temperature: ev(Temperature, celsius=FLOAT),
    Started: ev(
        Started,
        skus=st.none() | st.lists(KEY, max_size=5),
        cpa_limit=st.none() | FLOAT,
        budget=st.none() | FLOAT,
    ),
    Spend: ev(Spend, amount=st.floats(min_value=0, exclude_min=True, allow_infinity=False)),
    Conversion: ev(
        Conversion,
        count=st.none() | POS_INT,
        revenue=st.none() | st.floats(min_value=0, allow_infinity=False),
    ),
    Paused: ev(Paused),
    Resumed: ev(Resumed),
    Ended: ev(Ended),
    SkuOutOfStock: ev(SkuOutOfStock, sku=KEY),
    SkuBackInStock: ev(SkuBackInStock, sku=KEY),
}

KIND_OF = {cls: kind for kind, union in EVENT_UNIONS.items() for cls in union.__args__}


def test_the_strategies_cover_every_event_type() -> None:
    assert set(STRATEGIES) == set(KIND_OF)
    assert {k: {c.__struct_config__.tag for c in KIND_OF if KIND_OF[c] == k} for k in KINDS} == {
        k: set(v) for k, v in EVENT_TYPES.items()
    }


def test_the_contract_tables_list_these_types() -> None:
    assert {
        "sku": frozenset(
            {"received", "ordered", "cancelled", "picked", "returned", "adjusted", "counted"}
            | {"campaign_linked", "campaign_unlinked", "settings"}
        ),
        "shipment": frozenset(
            {"booked", "picked_up", "in_transit", "delayed", "out_for_delivery", "delivery_failed"}
            | {"delivered", "temperature", "settings"}
        ),
        "campaign": frozenset(
            {"started", "spend", "conversion", "paused", "resumed", "ended", "sku_out_of_stock"}
            | {"sku_back_in_stock", "settings"}
        ),
    } == EVENT_TYPES


@settings(max_examples=300, deadline=None)
@given(st.one_of(*STRATEGIES.values()))
def test_every_event_round_trips(event: Any) -> None:
    data = encode_event(event)
    assert data.startswith(b"{")
    assert b'"type":' in data
    back = decode_payload(KIND_OF[type(event)], data)
    assert back == event
    assert type(back) is type(event)
    assert encode_event(back) == data


def test_a_trailing_newline_is_allowed() -> None:
    assert decode_payload("campaign", encode_event(Paused()) + b"\n") == Paused()


def test_actor_messages_round_trip_with_their_ts() -> None:
    when = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
    for event in (SkuOutOfStock(sku="SKU-1", ts=when), CampaignLinked(campaign="C-1", ts=when)):
        assert decode_payload(KIND_OF[type(event)], encode_event(event)) == event


def test_json_schema_lists_every_kind() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == set(KINDS)
    assert "Received" in schema["$defs"]
    for kind, name in (("sku", "SkuSettings"), ("shipment", "ShipmentSettings"), ("campaign", "CampaignSettings")):
        assert name in schema["$defs"]
        assert schema["$defs"][name]["properties"]["type"] == {"enum": ["settings"]}
        assert {"$ref": f"#/$defs/{name}"} in schema["properties"][kind]["anyOf"]
    sku = schema["$defs"]["SkuSettings"]["properties"]
    assert sku["reset"]["anyOf"][0]["items"]["enum"] == [
        "low_stock_threshold", "return_spike_min_units", "return_spike_ratio"
    ]


def test_the_key_pattern_takes_a_whole_key() -> None:
    """One pattern for subjects, payload keys and the CLI: 1-128 of A-Z a-z 0-9 _ -, nothing after."""
    assert KEY_RE.match("SKU-1_a")
    assert KEY_RE.match("K" * 128)
    for bad in ("", "K" * 129, "A.B", "A B", "A\n", "A\r", "Ä"):
        assert KEY_RE.match(bad) is None, bad
    schema = json_schema()
    assert '"pattern":"^[A-Za-z0-9_-]{1,128}$"' in json.dumps(schema, separators=(",", ":"))
