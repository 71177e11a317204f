"""`settings` events (CONTRACT 2.4) and their config keys (section 6): what decodes, what is `invalid`."""

from __future__ import annotations

import pytest

from actors import Thresholds
from contracts.config import ConfigError, config_from_dict
from contracts.decode import INVALID, UNKNOWN_TYPE, DecodeError, decode_payload
from contracts.events import CampaignSettings, ShipmentSettings, SkuSettings


@pytest.mark.parametrize(
    ("kind", "data", "expected"),
    [
        ("sku", b'{"type":"settings"}', SkuSettings()),
        ("sku", b'{"type":"settings","low_stock_threshold":-3}', SkuSettings(low_stock_threshold=-3)),
        (
            "sku",
            b'{"type":"settings","location":"BLR-DS-4","low_stock_threshold":2}',
            SkuSettings(location="BLR-DS-4", low_stock_threshold=2),
        ),
        (
            "sku",
            b'{"type":"settings","location":"BLR-DS-4","reset":["low_stock_threshold"]}',
            SkuSettings(location="BLR-DS-4", reset=["low_stock_threshold"]),
        ),
        (
            "sku",
            b'{"type":"settings","return_spike_min_units":0,"return_spike_ratio":1,"reset":["low_stock_threshold"]}',
            SkuSettings(return_spike_min_units=0, return_spike_ratio=1.0, reset=["low_stock_threshold"]),
        ),
        # null is absent: neither set nor a conflict with reset.
        (
            "sku",
            b'{"type":"settings","low_stock_threshold":null,"reset":["low_stock_threshold"],"location":null}',
            SkuSettings(reset=["low_stock_threshold"]),
        ),
        # Another kind's field names are unknown fields, ignored.
        ("sku", b'{"type":"settings","stall_after":"bogus","cpa_limit":"x"}', SkuSettings()),
        ("shipment", b'{"type":"settings","stall_after":"90m"}', ShipmentSettings(stall_after="90m")),
        ("shipment", b'{"type":"settings","stall_after":"1.5h"}', ShipmentSettings(stall_after="1.5h")),
        ("shipment", b'{"type":"settings","reset":["stall_after"]}', ShipmentSettings(reset=["stall_after"])),
        ("shipment", b'{"type":"settings","location":"X","low_stock_threshold":"x"}', ShipmentSettings()),
        (
            "campaign",
            b'{"type":"settings","cpa_limit":-1,"budget":5,"cpa_min_spend":0}',
            CampaignSettings(cpa_limit=-1.0, budget=5.0, cpa_min_spend=0.0),
        ),
        (
            "campaign",
            b'{"type":"settings","reset":["cpa_limit","budget","cpa_min_spend"]}',
            CampaignSettings(reset=["cpa_limit", "budget", "cpa_min_spend"]),
        ),
    ],
)
def test_valid_settings(kind: str, data: bytes, expected: object) -> None:
    assert decode_payload(kind, data) == expected


@pytest.mark.parametrize(
    ("kind", "data", "where"),
    [
        # A reset name that is not a settable field of the kind.
        ("sku", b'{"type":"settings","reset":["location"]}', "`$.reset[0]`"),
        ("sku", b'{"type":"settings","reset":["stall_after"]}', "`$.reset[0]`"),
        ("sku", b'{"type":"settings","reset":["low_stock_threshold","nope"]}', "`$.reset[1]`"),
        ("shipment", b'{"type":"settings","reset":["low_stock_threshold"]}', "`$.reset[0]`"),
        ("campaign", b'{"type":"settings","reset":["stall_after"]}', "`$.reset[0]`"),
        ("sku", b'{"type":"settings","reset":"low_stock_threshold"}', "`$.reset`"),
        ("sku", b'{"type":"settings","reset":[1]}', "`$.reset[0]`"),
        # SKU-wide-only fields with a location, set or reset.
        ("sku", b'{"type":"settings","location":"A","return_spike_min_units":3}', "`$.return_spike_min_units`"),
        ("sku", b'{"type":"settings","location":"A","return_spike_ratio":0.5}', "`$.return_spike_ratio`"),
        ("sku", b'{"type":"settings","location":"A","reset":["return_spike_ratio"]}', "`$.reset`"),
        ("sku", b'{"type":"settings","location":"A","reset":["return_spike_min_units"]}', "`$.reset`"),
        # A field both set and reset.
        ("sku", b'{"type":"settings","low_stock_threshold":3,"reset":["low_stock_threshold"]}', "`$.reset`"),
        ("shipment", b'{"type":"settings","stall_after":"1h","reset":["stall_after"]}', "`$.reset`"),
        ("campaign", b'{"type":"settings","budget":1,"reset":["budget"]}', "`$.reset`"),
        # Types and ranges.
        ("sku", b'{"type":"settings","low_stock_threshold":2.5}', "`$.low_stock_threshold`"),
        ("sku", b'{"type":"settings","low_stock_threshold":"2"}', "`$.low_stock_threshold`"),
        ("sku", b'{"type":"settings","low_stock_threshold":9007199254740992}', "`$.low_stock_threshold`"),
        ("sku", b'{"type":"settings","return_spike_min_units":-1}', "`$.return_spike_min_units`"),
        ("sku", b'{"type":"settings","return_spike_ratio":-0.1}', "`$.return_spike_ratio`"),
        ("sku", b'{"type":"settings","location":""}', "`$.location`"),
        ("sku", b'{"type":"settings","location":"a\\u0007b"}', "`$.location`"),
        ("sku", b'{"type":"settings","location":5}', "`$.location`"),
        ("campaign", b'{"type":"settings","cpa_min_spend":-1}', "`$.cpa_min_spend`"),
        ("campaign", b'{"type":"settings","cpa_limit":"5"}', "`$.cpa_limit`"),
        # Durations as in config, > 0.
        ("shipment", b'{"type":"settings","stall_after":"90"}', "`$.stall_after`"),
        ("shipment", b'{"type":"settings","stall_after":"1w"}', "`$.stall_after`"),
        ("shipment", b'{"type":"settings","stall_after":"-1h"}', "`$.stall_after`"),
        ("shipment", b'{"type":"settings","stall_after":"0s"}', "`$.stall_after`"),
        ("shipment", b'{"type":"settings","stall_after":"0.0h"}', "`$.stall_after`"),
        ("shipment", b'{"type":"settings","stall_after":90}', "`$.stall_after`"),
        ("shipment", b'{"type":"settings","stall_after":"99999999999999999999d"}', "`$.stall_after`"),
        ("shipment", b'{"type":"settings","stall_after":"' + b"9" * 400 + b'd"}', "`$.stall_after`"),
        # Common fields are checked too.
        ("campaign", b'{"type":"settings","ts":"2024-01-01T00:00:00"}', "`$.ts`"),
    ],
)
def test_invalid_settings(kind: str, data: bytes, where: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_payload(kind, data)
    assert info.value.code == INVALID, info.value.detail
    assert where in info.value.detail
    assert "\n" not in info.value.detail


def test_the_details_say_what_is_wrong() -> None:
    def detail(kind: str, data: bytes) -> str:
        with pytest.raises(DecodeError) as info:
            decode_payload(kind, data)
        return info.value.detail

    assert "both set and reset" in detail("sku", b'{"type":"settings","low_stock_threshold":1,"reset":["low_stock_threshold"]}')
    assert "SKU-wide only" in detail("sku", b'{"type":"settings","location":"A","return_spike_ratio":1}')
    assert "> 0" in detail("shipment", b'{"type":"settings","stall_after":"0ms"}')
    assert "'location'" in detail("sku", b'{"type":"settings","reset":["location"]}')


def test_settings_is_a_known_type_of_every_kind() -> None:
    for kind in ("sku", "shipment", "campaign"):
        decode_payload(kind, b'{"type":"settings"}')
    with pytest.raises(DecodeError) as info:
        decode_payload("sku", b'{"type":"setting"}')
    assert info.value.code == UNKNOWN_TYPE


# --- config: [rules] max_future_skew and [rules.shipment] carriers ----------------------


def test_the_new_keys_default_as_the_contract_says() -> None:
    cfg = config_from_dict({})
    assert cfg.rules.max_future_skew == "1h"
    assert cfg.rules.shipment.carriers == {}
    th = Thresholds.from_rules(cfg.rules)
    assert th.carriers_us == {}


def test_carriers_reach_the_thresholds() -> None:
    cfg = config_from_dict(
        {"rules": {"max_future_skew": "90m", "shipment": {"carriers": {"SURFACE-CO": "24h", "express co": "1.5h"}}}}
    )
    assert cfg.rules.max_future_skew == "90m"
    th = Thresholds.from_rules(cfg.rules)
    assert th.carriers_us == {"SURFACE-CO": 24 * 3_600_000_000, "express co": 5_400_000_000}
    assert th.carriers == {"SURFACE-CO": "24h", "express co": "1.5h"}
    assert config_from_dict({"rules": {"max_future_skew": "0s"}}).rules.max_future_skew == "0s"


@pytest.mark.parametrize(
    ("raw", "prefix", "example"),
    [
        ({"rules": {"max_future_skew": "1x"}}, "rules.max_future_skew:", 'max_future_skew = "1h"'),
        ({"rules": {"max_future_skew": 60}}, "rules.max_future_skew:", 'max_future_skew = "1h"'),
        ({"rules": {"max_future_skew": "-1h"}}, "rules.max_future_skew:", 'max_future_skew = "1h"'),
        ({"rules": {"max_future_skew": "9999999999d"}}, "rules.max_future_skew:", 'max_future_skew = "1h"'),
        ({"rules": {"shipment": {"carriers": "24h"}}}, "rules.shipment.carriers:", 'SURFACE-CO = "24h"'),
        ({"rules": {"shipment": {"carriers": ["24h"]}}}, "rules.shipment.carriers:", 'SURFACE-CO = "24h"'),
        (
            {"rules": {"shipment": {"carriers": {"SURFACE-CO": "24"}}}},
            "rules.shipment.carriers.SURFACE-CO:",
            'SURFACE-CO = "24h"',
        ),
        (
            {"rules": {"shipment": {"carriers": {"SURFACE-CO": 24}}}},
            "rules.shipment.carriers.SURFACE-CO:",
            'SURFACE-CO = "24h"',
        ),
        (
            {"rules": {"shipment": {"carriers": {"SURFACE-CO": "0s"}}}},
            "rules.shipment.carriers.SURFACE-CO:",
            'SURFACE-CO = "24h"',
        ),
        ({"rules": {"shipment": {"carriers": {"": "1h"}}}}, "rules.shipment.carriers:", 'SURFACE-CO = "24h"'),
        ({"rules": {"shipment": {"stall_after": "0s"}}}, "rules.shipment.stall_after:", 'stall_after = "6h"'),
        ({"rules": {"max_future_skeww": "1h"}}, "rules.max_future_skeww:", ""),
    ],
)
def test_bad_values_name_the_key_and_an_example(raw: dict[str, object], prefix: str, example: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert message.startswith(prefix), message
    assert example in message
    assert "\n" not in message
