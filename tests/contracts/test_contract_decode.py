"""Decoding with the dead-letter reasons of CONTRACT section 4, in the contract's order."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from contracts.decode import (
    BAD_SUBJECT,
    INVALID,
    MALFORMED,
    UNKNOWN_TYPE,
    DecodeError,
    decode_event,
    decode_payload,
    parse_subject,
    subject_kind_token,
)
from contracts.events import EVENT_TYPES, EVENT_UNIONS, KINDS, Picked, Received, Returned, Spend

PAYLOAD_CODES = (MALFORMED, INVALID, UNKNOWN_TYPE)


def code_of(kind: str, data: bytes) -> str | None:
    try:
        decode_payload(kind, data)
    except DecodeError as err:
        error = err
    else:
        return None
    assert error.code in PAYLOAD_CODES
    assert error.detail
    assert "\n" not in error.detail
    return error.code


# --- examples of each reason and of the order between them ------------------------------

R = b'{"type":"received","location":"A","qty":2'  # completed by each case


@pytest.mark.parametrize(
    ("kind", "data", "code", "where"),
    [
        # malformed comes first, whatever else is wrong
        ("sku", b"\xef\xbb\xbf" + R + b"}", MALFORMED, ""),
        ("sku", R + b',"x":NaN}', MALFORMED, ""),
        ("sku", R + b',"x":Infinity}', MALFORMED, ""),
        ("sku", R + b',"x":-Infinity}', MALFORMED, ""),
        ("sku", b'{"type":"received","location":"\\ud800","qty":2}', MALFORMED, ""),
        ("sku", R + b',"x":"\\udc00"}', MALFORMED, ""),
        ("sku", R + b',"x":"\\ud800"}', MALFORMED, ""),
        ("sku", b'{"type":"nope","x":"\\ud800"}', MALFORMED, ""),
        ("sku", b'{"qty":2.5,"x":NaN}', MALFORMED, ""),
        ("sku", R + b',"x":"\xff"}', MALFORMED, ""),
        ("sku", b'{"type":"received","location":"\xc3","qty":2}', MALFORMED, ""),
        ("sku", b'{"type":"nope","x":"\xed\xa0\x80"}', MALFORMED, ""),  # UTF-8 encoded surrogate
        ("sku", b"", MALFORMED, ""),
        ("sku", b"[]", MALFORMED, ""),
        ("sku", b'"received"', MALFORMED, ""),
        ("sku", b"null", MALFORMED, ""),
        ("sku", R + b"}{}", MALFORMED, ""),
        ("sku", R + b"", MALFORMED, ""),
        # then `type` missing or not a string
        ("sku", b'{"location":"A","qty":2.5}', INVALID, "type"),
        ("sku", b'{"type":null,"qty":"2"}', INVALID, "type"),
        ("sku", b'{"type":7}', INVALID, "$.type"),
        ("sku", b'{"type":["received"]}', INVALID, "$.type"),
        # then an unknown type, even with bad fields
        ("sku", b'{"type":"shipped","qty":2.5}', UNKNOWN_TYPE, "$.type"),
        ("sku", b'{"type":"booked"}', UNKNOWN_TYPE, "$.type"),  # another kind's type
        ("campaign", b'{"type":"Spend","amount":1}', UNKNOWN_TYPE, "$.type"),
        # then any other field problem
        ("sku", b'{"type":"received","location":"A","qty":2.5}', INVALID, "$.qty"),
        ("sku", b'{"type":"received","location":"A","qty":2.0}', INVALID, "$.qty"),
        ("sku", b'{"type":"received","location":"A","qty":"2"}', INVALID, "$.qty"),
        ("sku", b'{"type":"received","location":"A","qty":true}', INVALID, "$.qty"),
        ("sku", b'{"type":"received","location":"A","qty":0}', INVALID, "$.qty"),
        ("sku", b'{"type":"received","location":"A","qty":null}', INVALID, "$.qty"),
        ("sku", b'{"type":"received","location":"A"}', INVALID, "qty"),
        ("sku", b'{"type":"received","location":"A","qty":9007199254740992}', INVALID, "$.qty"),
        ("sku", b'{"type":"received","location":"A","qty":99999999999999999999999}', INVALID, "$.qty"),
        ("sku", b'{"type":"adjusted","location":"A","delta":-9007199254740992}', INVALID, "$.delta"),
        ("sku", b'{"type":"adjusted","location":"A","delta":0}', INVALID, "$.delta"),
        ("sku", b'{"type":"counted","location":"A","on_hand":-1}', INVALID, "$.on_hand"),
        ("sku", b'{"type":"received","location":"","qty":1}', INVALID, "$.location"),
        ("sku", b'{"type":"received","location":"a\\u0007b","qty":1}', INVALID, "$.location"),
        ("sku", b'{"type":"received","location":"a\\u0085b","qty":1}', INVALID, "$.location"),
        ("sku", b'{"type":"received","location":"' + b"x" * 129 + b'","qty":1}', INVALID, "$.location"),
        ("sku", b'{"type":"picked","location":"A","qty":1,"order_id":5}', INVALID, "$.order_id"),
        ("sku", b'{"type":"campaign_linked","campaign":"a.b"}', INVALID, "$.campaign"),
        ("sku", b'{"type":"campaign_linked","campaign":"' + b"c" * 129 + b'"}', INVALID, "$.campaign"),
        ("sku", R + b',"ts":"2024-01-01T00:00:00"}', INVALID, "$.ts"),
        ("sku", R + b',"ts":"2024-01-01"}', INVALID, "$.ts"),
        ("sku", R + b',"ts":1704067200}', INVALID, "$.ts"),
        ("sku", R + b',"id":5}', INVALID, "$.id"),
        ("shipment", b'{"type":"booked"}', INVALID, "promised_by"),
        ("shipment", b'{"type":"booked","promised_by":null}', INVALID, "$.promised_by"),
        ("shipment", b'{"type":"delayed","eta":"2024-01-01T00:00:00+24:00"}', INVALID, "$.eta"),
        ("shipment", b'{"type":"temperature","celsius":"4"}', INVALID, "$.celsius"),
        ("shipment", b'{"type":"temperature"}', INVALID, "celsius"),
        ("campaign", b'{"type":"spend","amount":0}', INVALID, "$.amount"),
        ("campaign", b'{"type":"spend","amount":-0.0}', INVALID, "$.amount"),
        ("campaign", b'{"type":"conversion","count":0}', INVALID, "$.count"),
        ("campaign", b'{"type":"conversion","count":1.5}', INVALID, "$.count"),
        ("campaign", b'{"type":"conversion","revenue":-0.01}', INVALID, "$.revenue"),
        ("campaign", b'{"type":"started","skus":"S1"}', INVALID, "$.skus"),
        ("campaign", b'{"type":"started","skus":["ok","not ok"]}', INVALID, "$.skus[1]"),
        ("campaign", b'{"type":"started","skus":[' + b",".join([b'"s"'] * 101) + b"]}", INVALID, "$.skus"),
        ("campaign", b'{"type":"sku_out_of_stock"}', INVALID, "sku"),
    ],
)
def test_reasons_and_their_order(kind: str, data: bytes, code: str, where: str) -> None:
    """The contract is the code and where the problem is (a JSON path, or the missing field);
    the sentence around them is msgspec's and changes with its releases."""
    with pytest.raises(DecodeError) as info:
        decode_payload(kind, data)
    detail = info.value.detail
    assert info.value.code == code, detail
    assert detail
    assert "\n" not in detail
    if where:
        assert names(detail, where), f"{detail!r} does not name {where!r}"


def names(detail: str, where: str) -> bool:
    """True when `detail` names `where`: a JSON path (`$.skus` is not `$.skus[1]`) or a field."""
    if where.startswith("$"):
        return re.search(re.escape(where) + r"(?![\w.\[])", detail) is not None
    return re.search(r"(?<![\w.$])" + re.escape(where) + r"(?!\w)", detail) is not None


@pytest.mark.parametrize(
    ("kind", "data", "expected"),
    [
        # null is absent: an optional field takes its default
        (
            "sku",
            b'{"type":"picked","location":"A","qty":1,"order_id":null,"ts":null,"id":null}',
            Picked(location="A", qty=1),
        ),
        (
            "sku",
            b'{"type":"returned","location":"A","qty":1,"restockable":null}',
            Returned(location="A", qty=1),
        ),
        # unknown fields are ignored, whatever they hold (valid JSON)
        (
            "sku",
            b'{"type":"received","location":"A","qty":1,"x":{"y":[1,2.5,"\\ud83d\\ude00",null]}}',
            Received(location="A", qty=1),
        ),
        # the largest integer
        (
            "sku",
            b'{"type":"received","location":"A","qty":9007199254740991}',
            Received(location="A", qty=2**53 - 1),
        ),
        # an integer literal where a float is expected
        ("campaign", b'{"type":"spend","amount":5}', Spend(amount=5.0)),
        # a key may use every allowed character, and a location any non-control one
        (
            "sku",
            b'{"type":"received","location":"Blr \xc3\xa9 DS-4 / \\"x\\"","qty":1}',
            Received(location='Blr \u00e9 DS-4 / "x"', qty=1),
        ),
        # surrounding whitespace and a trailing newline
        ("sku", b' {"type":"received","location":"A","qty":1}\r\n', Received(location="A", qty=1)),
    ],
)
def test_valid_payloads(kind: str, data: bytes, expected: Any) -> None:
    assert decode_payload(kind, data) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00Z", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        ("2024-01-01t00:00:00z", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        ("2024-01-01 05:30:00+05:30", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        ("2023-12-31T19:00:00-05:00", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        ("2024-01-01T00:00:00.1Z", dt.datetime(2024, 1, 1, 0, 0, 0, 100_000, tzinfo=dt.UTC)),
        # digits beyond microseconds round half up
        ("2024-01-01T00:00:00.0000004Z", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        ("2024-01-01T00:00:00.0000005Z", dt.datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC)),
        ("2024-01-01T00:00:00.9999995Z", dt.datetime(2024, 1, 1, 0, 0, 1, tzinfo=dt.UTC)),
    ],
)
def test_times(text: str, expected: dt.datetime) -> None:
    event = decode_payload("sku", b'{"type":"received","location":"A","qty":1,"ts":"%s"}' % text.encode())
    assert event.ts == expected


# --- fuzz: only the documented reasons, never a crash ------------------------------------


PREFIXES = [
    b"",
    b"{",
    b'{"type":',
    b'{"type":"received",',
    b'{"type":"booked","promised_by":',
    b'{"type":"spend",',
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=64), st.sampled_from(KINDS))
def test_random_bytes_raise_only_documented_reasons(prefix: bytes, tail: bytes, kind: str) -> None:
    code_of(kind, prefix + tail)


FIELD_NAMES = sorted(
    {f for union in EVENT_UNIONS.values() for cls in union.__args__ for f in cls.__struct_fields__}
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()  # NaN and infinities too
    | st.text(max_size=8)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)  # lone surrogates
    | st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-01T00:00:00", "A", "S-1", "a.b"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)
TYPES = st.sampled_from(sorted(set().union(*EVENT_TYPES.values()))) | st.text(max_size=6) | SCALARS
OBJECTS = st.fixed_dictionaries({}, optional={"type": TYPES}).flatmap(
    lambda base: st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=4).map(
        lambda d: {**d, **base}
    )
)


def _bad(value: Any, escaped: bool) -> bool:
    """NaN, an infinity or a lone surrogate anywhere: not strict JSON.

    Escaped (`ensure_ascii`), a high surrogate followed by a low one is a valid pair; written
    raw, any surrogate becomes invalid UTF-8.
    """
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        if not escaped:
            return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
        return _LONE.search(value) is not None
    if isinstance(value, list):
        return any(_bad(v, escaped) for v in value)
    if isinstance(value, dict):
        return any(_bad(k, escaped) or _bad(v, escaped) for k, v in value.items())
    return False


_LONE = re.compile("[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")


@settings(max_examples=300, deadline=None)
@given(OBJECTS | JSON_VALUES, st.booleans(), st.sampled_from(KINDS))
@example({"type": "received", "location": "A", "qty": 2}, True, "sku")
@example({"type": "received", "location": "A", "qty": float("nan")}, True, "sku")
@example({"type": "received", "location": "A", "qty": "\ud800"}, False, "sku")
def test_random_json_is_classified_in_the_contract_order(value: Any, ascii_only: bool, kind: str) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)  # writes NaN / Infinity as bare words
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8
    code = code_of(kind, data)
    if _bad(value, ascii_only) or not isinstance(value, dict):
        assert code == MALFORMED
        return
    etype = value.get("type")
    if not isinstance(etype, str):
        assert code == INVALID
    elif etype not in EVENT_TYPES[kind]:
        assert code == UNKNOWN_TYPE
    elif code is None:
        event = decode_payload(kind, data)
        assert event.__struct_config__.tag == etype
    else:
        assert code == INVALID


# --- subjects -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("events.sku.SKU-1", ("sku", "SKU-1")),
        ("events.7.shipment.S_1", ("shipment", "S_1")),
        ("events.campaign." + "k" * 128, ("campaign", "k" * 128)),
    ],
)
def test_subjects(subject: str, expected: tuple[str, str]) -> None:
    assert parse_subject(subject) == expected


@pytest.mark.parametrize(
    ("subject", "kind_token"),
    [
        ("events.box.K", "unknown"),
        ("events.sku", "sku"),
        ("events.sku.a.b", "sku"),
        ("events.x7.sku.K", "unknown"),
        ("events.7.sku.K.L", "sku"),
        ("events.sku." + "k" * 129, "sku"),
        ("events.sku.K!", "sku"),
        ("other.sku.K", "unknown"),
        ("events.7.box.K", "unknown"),
    ],
)
def test_bad_subjects(subject: str, kind_token: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_subject(subject)
    assert info.value.code == BAD_SUBJECT
    assert subject_kind_token(subject) == kind_token


def test_bad_subject_comes_before_the_payload() -> None:
    with pytest.raises(DecodeError) as info:
        decode_event("events.box.K", b"not json")
    assert info.value.code == BAD_SUBJECT
    assert decode_event("events.3.sku.K", b'{"type":"received","location":"A","qty":1}') == (
        "sku",
        "K",
        Received(location="A", qty=1),
    )
