"""`[sources.<name>]` mappings: paths, templates, arrays, status tables, times, signatures, config errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.config import ConfigError, config_from_dict
from contracts.decode import DecodeError, check_ingest
from contracts.sources import (
    MappingError,
    SourceConfig,
    body_id,
    compile_source,
    idempotency_text,
    parse_path,
    signature,
    signature_ok,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sources"
HOUR_US = 3_600_000_000


def mapping(**table: Any) -> Any:
    return compile_source("t", msgspec.convert(table, SourceConfig))


def events(m: Any, doc: Any, headers: dict[str, str] | None = None) -> list[tuple[str, str, dict[str, Any], str | None]]:
    return [(e.kind, e.key, json.loads(e.data), e.idempotency_key) for e in m.apply(doc, headers or {})]


def test_paths_read_names_quoted_names_and_indexes() -> None:
    doc = {"a": {"b c": [10, 20, {"d": "x"}]}}
    assert parse_path('$.a["b c"][1]').read(doc, None) == 20
    assert parse_path("$.a['b c'][-1].d").read(doc, None) == "x"
    assert parse_path("@[0]").read(doc, [7]) == 7
    assert parse_path("$.nope").read(doc, None) is not None  # the missing marker, not a value
    with pytest.raises(ValueError, match="only for `each`"):
        parse_path("$.a[*]")
    with pytest.raises(ValueError, match="starts with"):
        parse_path("a.b")


def test_one_payload_to_many_events_over_an_array() -> None:
    """A WMS inventory push listing several SKU-locations: one event per row."""
    m = mapping(
        each="$.levels[*]", kind="sku", key="@.sku", type="counted",
        fields={"location": "{$.warehouse}-{@.bin}", "on_hand": "@.qty", "ts": "$.at"},
        idempotency_key="{header:X-Push-Id}:{index}",
    )
    doc = {"warehouse": "BLR", "at": "2026-12-01T10:00:00Z",
           "levels": [{"sku": "SKU-1", "bin": "A1", "qty": 4}, {"sku": "SKU-2", "bin": "B2", "qty": 0}]}
    got = events(m, doc, {"x-push-id": "p-77"})
    assert got == [
        ("sku", "SKU-1", {"type": "counted", "location": "BLR-A1", "on_hand": 4, "ts": "2026-12-01T10:00:00Z"}, "t:p-77:0"),
        ("sku", "SKU-2", {"type": "counted", "location": "BLR-B2", "on_hand": 0, "ts": "2026-12-01T10:00:00Z"}, "t:p-77:1"),
    ]


def test_nested_arrays_walk_to_the_innermost_element() -> None:
    m = mapping(each="$.skus[*].moves[*]", kind="sku", key="$.k", type="@.t", fields={"location": "@.l", "qty": "@.q"})
    doc = {"k": "S", "skus": [{"moves": [{"t": "received", "l": "X", "q": 1}]}, {"moves": [{"t": "received", "l": "Y", "q": 2}]}]}
    assert [e[2]["location"] for e in events(m, doc)] == ["X", "Y"]


def test_status_words_map_to_types_and_an_empty_type_skips() -> None:
    m = mapping(each="$.cps", kind="shipment", key="$.n", type="@.tag",
                types={"InTransit": "in_transit", "Delivered": "delivered", "InfoReceived": ""})
    doc = {"n": "T1", "cps": [{"tag": "InfoReceived"}, {"tag": "InTransit"}, {"tag": "Delivered"}]}
    assert [e[2]["type"] for e in events(m, doc)] == ["in_transit", "delivered"]
    with pytest.raises(MappingError, match=r"status 'Lost' is not in sources.t.types .*element \$.cps\[0\]"):
        m.apply({"n": "T1", "cps": [{"tag": "Lost"}]}, {})


def test_missing_values() -> None:
    m = mapping(kind="sku", key="$.sku", type="received", fields={"location": "$.loc", "qty": "$.qty", "reason": "$.why"})
    # A missing optional field is left out; the contract's check then decides.
    assert events(m, {"sku": "A", "loc": "L", "qty": 1}) == [("sku", "A", {"type": "received", "location": "L", "qty": 1}, None)]
    with pytest.raises(MappingError, match=r"`\$.sku` is missing"):
        m.apply({"loc": "L"}, {})
    with pytest.raises(MappingError, match="is not an array"):
        mapping(each="$.x", kind="sku", key="k", type="received").apply({"x": {}}, {})
    with pytest.raises(MappingError, match="header X-Id is missing"):
        mapping(kind="sku", key="k", type="received", idempotency_key="{header:X-Id}").apply({}, {})
    with pytest.raises(MappingError, match="JSON object, not a value"):
        mapping(kind="sku", key="K-{$.o}", type="received").apply({"o": {}}, {})


def test_time_formats() -> None:
    def ts(fmt: str, value: Any, zone: str = "") -> str:
        m = mapping(kind="shipment", key="S", type="delivered", fields={"ts": "$.t"}, time_format=fmt, time_zone=zone)
        return str(events(m, {"t": value})[0][2]["ts"])

    assert ts("rfc3339", "2026-12-01T10:00:00.123456789+05:30") == "2026-12-01T10:00:00.123456789+05:30"  # kept as is
    assert ts("rfc3339", "2026-12-01T10:00:00", "+05:30") == "2026-12-01T10:00:00+05:30"
    assert ts("epoch_s", 1796204855) == "2026-12-02T09:47:35Z"
    assert ts("epoch_ms", "1796204855250") == "2026-12-02T09:47:35.250000Z"
    assert ts("%d/%m/%Y %H:%M", "02/12/2026 15:17", "+05:30") == "2026-12-02T09:47:00Z"
    assert ts("%Y-%m-%d %H:%M:%S%z", "2026-12-02 09:47:35+0000") == "2026-12-02T09:47:35Z"
    with pytest.raises(MappingError, match="has no offset"):
        ts("%d/%m/%Y %H:%M", "02/12/2026 15:17")
    with pytest.raises(MappingError, match="does not match time_format"):
        ts("%d/%m/%Y", "2026-12-02")
    # Without a zone, an RFC 3339 time without an offset passes through: the contract refuses it.
    m = mapping(kind="shipment", key="S", type="delivered", fields={"ts": "$.t"})
    (ev,) = m.apply({"t": "2026-12-01T10:00:00"}, {})
    with pytest.raises(DecodeError, match="ts"):
        check_ingest(ev.kind, ev.key, ev.data, 1_800_000_000_000_000, HOUR_US)


def test_templates_escape_braces_and_keep_literals() -> None:
    m = mapping(kind="sku", key="K", type="adjusted", fields={"location": "L", "delta": -2, "reason": "{{{$.r}}}"})
    assert events(m, {"r": "x"})[0][2] == {"type": "adjusted", "location": "L", "delta": -2, "reason": "{x}"}


def test_idempotency_keys_are_per_source_and_hashed_when_too_long() -> None:
    assert idempotency_text("shop", "abc") == "shop:abc"
    long = idempotency_text("shop", "x" * 200)
    assert long == "shop:sha256:" + hashlib.sha256(b"x" * 200).hexdigest()
    assert idempotency_text("shop", "caf\u00e9").startswith("shop:sha256:")


def test_signatures_hex_base64_and_prefix() -> None:
    secret, body = b"s3cret", b'{"a":1}'
    digest = hmac.new(secret, body, hashlib.sha256).digest()
    assert signature(secret, body, "hex") == digest.hex()
    assert signature_ok(secret, body, base64.b64encode(digest).decode(), "base64")
    assert signature_ok(secret, body, "sha256=" + digest.hex(), "hex", "sha256=")
    assert not signature_ok(secret, body, digest.hex(), "hex", "sha256=")
    assert not signature_ok(secret, body + b" ", digest.hex(), "hex")
    assert not signature_ok(secret, body, None, "hex")
    assert not signature_ok(secret, body, "not base64!", "base64")
    assert not signature_ok(b"other", body, digest.hex(), "hex")


def test_body_id_is_never_a_sequence() -> None:
    from contracts.exceptions import effect_cause

    assert effect_cause(body_id("shop", b"0")) is None


def test_the_worked_examples_map_to_valid_events() -> None:
    cfg = config_from_dict(tomllib.loads((DOCS / "sources.toml").read_text()))
    after = compile_source("aftership", cfg.sources["aftership"])
    doc = json.loads((DOCS / "aftership-tracking-update.json").read_text())
    got = after.apply(doc, {})
    assert [(e.kind, e.key, json.loads(e.data)["type"]) for e in got] == [
        ("shipment", "1Z999AA10123456784", "in_transit"), ("shipment", "1Z999AA10123456784", "in_transit"),
    ]  # InfoReceived is skipped
    assert len({e.idempotency_key for e in got}) == 2
    shop = compile_source("shopify", cfg.sources["shopify"])
    doc = json.loads((DOCS / "shopify-inventory-levels-update.json").read_text())
    (ev,) = shop.apply(doc, {"x-shopify-webhook-id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"})
    assert (ev.kind, ev.key, ev.idempotency_key) == ("sku", "SHOP-49148385476790", "shopify:b54557e4-bdd9-4b37-8a5f-bf7d70bcd043")
    assert json.loads(ev.data) == {"type": "counted", "location": "shopify-76329468118", "on_hand": 3,
                                   "ts": "2026-12-02T05:15:27-05:00"}
    for e in [*got, ev]:
        check_ingest(e.kind, e.key, e.data, 1_900_000_000_000_000, HOUR_US)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "sku", "key": "$.k"}, "sources.s.type: Object missing required field `type`, e.g. [sources."),
        ({"kind": "sku", "key": "$.k[", "type": "x"}, "sources.s.key: '$.k[' is not a path"),
        ({"kind": "sku", "key": "$.k", "type": "x", "each": "$.a[*]", "idempotency_key": "{header:X-Id}"},
         "sources.s.idempotency_key: with `each`, the key must differ per element"),
        ({"kind": "sku", "key": "$.k", "type": "x", "signature_header": "X-Sig"},
         "sources.s.secret: signature_header and a secret go together"),
        ({"kind": "sku", "key": "$.k", "type": "x", "secret": "a", "secret_env": "B", "signature_header": "X"},
         "sources.s.secret: given as secret and secret_env"),
        ({"kind": "sku", "key": "$.k", "type": "x", "fields": {"qty": [1]}}, "sources.s.fields.qty: [1] is not a path"),
        ({"kind": "sku", "key": "$.k", "type": "x", "types": {"A": "Not A Type"}}, "sources.s.types.A: 'Not A Type'"),
        ({"kind": "sku", "key": "$.k", "type": "x", "time_format": "iso"}, "sources.s.time_format: 'iso' is not"),
        ({"kind": "sku", "key": "$.k", "type": "x", "time_zone": "IST"}, "sources.s.time_zone: 'IST' is not an offset"),
        ({"kind": "sku", "key": "$.k", "type": "x", "signature_encoding": "b32"}, "sources.s.signature_encoding: Invalid enum"),
        ({"kind": "sku", "key": "$.k", "type": "x", "bogus": 1}, "sources.s.bogus: \"bogus\" is not a key of [sources.s]. Its keys: kind, key, type,"),
        ({"kind": "sku", "key": "$.k", "type": "x", "fields": {"type": "$.t"}}, "sources.s.fields.type: the type comes from"),
    ],
)
def test_bad_mappings_fail_at_start_with_the_key_path_and_an_example(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"sources": {"s": table}})
    assert str(err.value).startswith(message), str(err.value)
    assert "e.g." in str(err.value)


def test_a_source_name_must_fit_a_path() -> None:
    with pytest.raises(ConfigError, match=r"sources.a\.b: 'a.b' is not a source name"):
        config_from_dict({"sources": {"a.b": {"kind": "sku", "key": "k", "type": "x"}}})


def test_the_signing_secret_is_redacted_and_resolved() -> None:
    from contracts.secrets import redact
    from router.secrets import resolve_all

    raw = {"sources": {"s": {"kind": "sku", "key": "k", "type": "x", "signature_header": "X-Sig", "secret": "hush"}}}
    assert redact(raw)["sources"]["s"]["secret"] == "***"
    cfg = config_from_dict(raw)
    assert resolve_all(cfg) == {"sources.s.secret": "hush"}
    env_cfg = config_from_dict({"sources": {"s": {**raw["sources"]["s"], "secret": None, "secret_env": "HUSH"}}})
    assert resolve_all(env_cfg, {"HUSH": "from-env"}) == {"sources.s.secret": "from-env"}
    with pytest.raises(ConfigError, match=r"sources\.s\.secret_env: environment variable HUSH is not set"):
        resolve_all(env_cfg, {})
