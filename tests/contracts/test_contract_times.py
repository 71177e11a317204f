"""Times as whole microseconds, their RFC 3339 form, exception ids and the rules table."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.exceptions import ExceptionEvent, exception_id, exception_subject, timer_cause
from contracts.rules import RULES, RULES_BY_KIND, SEVERITY
from contracts.times import EPOCH, from_us, ns_to_us, rfc3339, rfc3339_opt, to_us

OFFSET = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
ANY_TIME = st.datetimes(
    min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59, 999999), timezones=OFFSET
)


def test_to_us() -> None:
    assert to_us(EPOCH) == 0
    assert to_us(dt.datetime(1970, 1, 1, 5, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))) == 0
    assert to_us(dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)) == -1
    assert to_us(dt.datetime(2024, 1, 1, tzinfo=dt.UTC)) == 1_704_067_200_000_000


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1, "1970-01-01T00:00:00.000001Z"),
        (-1, "1969-12-31T23:59:59.999999Z"),
        (1_704_067_200_000_000, "2024-01-01T00:00:00Z"),
        (1_704_067_200_120_000, "2024-01-01T00:00:00.120000Z"),
        (to_us(dt.datetime(999, 5, 6, 7, 8, 9, tzinfo=dt.UTC)), "0999-05-06T07:08:09Z"),
        (to_us(dt.datetime(1, 1, 1, tzinfo=dt.UTC)), "0001-01-01T00:00:00Z"),
        # valid inputs whose UTC instant is outside `datetime`'s range
        (to_us(dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))), "0000-12-31T23:00:00Z"),
        (
            to_us(dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-2)))),
            "10000-01-01T01:00:00Z",
        ),
    ],
)
def test_rfc3339(us: int, text: str) -> None:
    assert rfc3339(us) == text
    assert rfc3339_opt(us) == text
    assert rfc3339_opt(None) is None


@settings(max_examples=200, deadline=None)
@given(ANY_TIME)
def test_every_valid_input_time_has_a_utc_form_and_a_datetime(t: dt.datetime) -> None:
    us = to_us(t)
    back = from_us(us)
    assert back == t
    assert to_us(back) == us
    text = rfc3339(us)
    assert text.endswith("Z")
    if _in_range(t):
        assert dt.datetime.fromisoformat(text) == t
    else:
        assert text.startswith(("0000-", "10000-"))


def _in_range(t: dt.datetime) -> bool:
    try:
        t.astimezone(dt.UTC)
    except OverflowError:
        return False
    return True


def test_from_us_is_utc_when_it_can_be() -> None:
    assert from_us(0) == EPOCH
    assert from_us(0).utcoffset() == dt.timedelta(0)
    early = from_us(to_us(dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))))
    assert early.utcoffset() == dt.timedelta(hours=23, minutes=59)


def test_ns_to_us_rounds_half_up() -> None:
    assert [ns_to_us(n) for n in (0, 499, 500, 1499, 1500)] == [0, 0, 1, 1, 2]


def test_exception_ids_and_subjects() -> None:
    assert exception_id("sku", "SKU-1", "stockout", "BLR-DS-4", "raised", "1234") == (
        "sku:SKU-1:stockout:BLR-DS-4:raised:1234"
    )
    assert exception_id("shipment", "S1", "stalled", None, "raised", timer_cause(1_700_000_000_123_999)) == (
        "shipment:S1:stalled::raised:t1700000000123"
    )
    assert timer_cause(-1) == "t-1"  # floored
    assert exception_subject("campaign", "cpa_exceeded", "C1") == "exceptions.campaign.cpa_exceeded.C1"
    fields = ExceptionEvent.__struct_fields__
    assert fields == (
        "id", "kind", "key", "rule", "status", "severity", "location", "value", "threshold",
        "seq", "event_ts", "detected_at", "message",
    )  # fmt: skip


def test_rules_table() -> None:
    assert [(r.kind, r.name, r.scope, r.severity) for r in RULES] == [
        ("sku", "stockout", "location", "critical"),
        ("sku", "low_stock", "location", "warning"),
        ("sku", "oversold", "location", "critical"),
        ("sku", "return_spike", "entity", "warning"),
        ("shipment", "sla_at_risk", "entity", "warning"),
        ("shipment", "sla_breached", "entity", "critical"),
        ("shipment", "stalled", "entity", "warning"),
        ("shipment", "temperature_excursion", "entity", "critical"),
        ("shipment", "delivery_failed", "entity", "warning"),
        ("campaign", "cpa_exceeded", "entity", "warning"),
        ("campaign", "budget_exhausted", "entity", "warning"),
        ("campaign", "promoting_out_of_stock", "entity", "critical"),
    ]
    assert len(SEVERITY) == len(RULES)
    assert sum(len(v) for v in RULES_BY_KIND.values()) == len(RULES)
