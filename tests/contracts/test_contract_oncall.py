"""`[oncall]` config checks and the pure on-call mapping (labels, dedup keys, signatures, back-fill)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from contracts.config import ConfigError, config_from_dict
from router.oncall import alerts


@pytest.mark.parametrize(
    ("oncall", "message"),
    [
        ({"alertmanager": "localhost:9093"}, 'oncall.alertmanager: \'localhost:9093\' is not an http:// or https:// URL, e.g. alertmanager = "http://127.0.0.1:9093"'),
        ({"alertmanager": "http://am:secret@am:9093"}, "oncall.alertmanager: credentials do not belong in a URL"),
        ({"min_open": {"low_stock": "2 m"}}, 'oncall.min_open.low_stock: \'2 m\' is not a duration, e.g. min_open = { low_stock = "2m" }'),
        ({"min_open": {"lowstock": "2m"}}, "oncall.min_open.lowstock: not a rule"),
        ({"runbooks": {"stockout": "wiki/stockout"}}, "oncall.runbooks.stockout: 'wiki/stockout' is not an http:// or https:// URL"),
        ({"resend_every": "10m"}, 'oncall.resend_every: \'10m\' must be 1s to 3m'),
        ({"backfill_age": "1 day"}, "oncall.backfill_age: \"1 day\" is not a duration"),
        ({"routes": [{"target": "pagerduty"}]}, "oncall.routes[0].target: 'pagerduty' is not configured (set [oncall.pagerduty] routing_key)"),
        ({"pagerduty": {"routing_key": "k"}, "routes": [{"target": "pagerduty", "rule": ["stock_out"]}]},
         "oncall.routes[0].rule: 'stock_out' is not one of"),
        ({"webhook": {"url": "https://hooks.example.com/x"}}, "oncall.webhook.signing_secret: required with oncall.webhook.url"),
        ({"pagerduty": {"routing_key": "a", "routing_key_env": "B"}}, "oncall.pagerduty.routing_key: given as routing_key and routing_key_env"),
    ],
)
def test_bad_oncall_values_fail_with_the_key_path_and_an_example(oncall: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"oncall": oncall})
    assert str(info.value).startswith(message), str(info.value)


def test_good_oncall_config_and_routes() -> None:
    cfg = config_from_dict({"oncall": {
        "alertmanager": "http://127.0.0.1:9093", "min_open": {"low_stock": "2m"},
        "pagerduty": {"routing_key_file": "/run/secrets/pd"},
        "webhook": {"url": "https://hooks.example.com/r", "signing_secret_env": "S"},
        "routes": [{"target": "pagerduty", "severity": ["critical"]}, {"target": "pagerduty", "rule": ["stalled"]}],
    }}).oncall
    assert cfg.targets() == ["alertmanager", "pagerduty", "webhook"]
    assert cfg.routed("pagerduty", "sku", "stockout", "critical")
    assert cfg.routed("pagerduty", "shipment", "stalled", "warning")
    assert not cfg.routed("pagerduty", "sku", "low_stock", "warning")
    assert cfg.routed("webhook", "sku", "low_stock", "warning")  # no route names it: everything
    assert not config_from_dict({}).oncall.configured


def test_dedup_key_is_readable_and_hashed_over_255() -> None:
    assert alerts.dedup_key("sku", "stockout", "SKU-1", "BLR-DS-4") == "sku.stockout.SKU-1.BLR-DS-4"
    assert alerts.dedup_key("shipment", "stalled", "SHP-1", None) == "shipment.stalled.SHP-1"
    long_loc = "L" * 128
    key = "K" * 128
    d = alerts.dedup_key("sku", "low_stock", key, long_loc)
    assert len(d) <= 255
    assert d.endswith(hashlib.sha256(f"sku.low_stock.{key}.{long_loc}".encode()).hexdigest())
    assert d != alerts.dedup_key("sku", "low_stock", key, long_loc[:-1] + "M")


def test_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"id":"sku:SKU-1:stockout:BLR:raised:7"}'
    sig = alerts.signature("s3cret", body)
    assert sig == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert alerts.verify_signature("s3cret", body, sig)
    assert not alerts.verify_signature("s3cret", body + b" ", sig)


def _exc(**over: Any) -> dict[str, Any]:
    base = {"id": "x", "kind": "shipment", "key": "SHP-1", "rule": "sla_at_risk", "status": "raised",
            "severity": "warning", "location": None, "seq": 5, "event_ts": "2026-01-01T00:00:00Z",
            "detected_at": "2026-01-03T00:00:00Z", "message": "m"}
    return {**base, **over}


def test_backfill_is_by_event_ts_against_detected_at_and_never_a_timer() -> None:
    day = 86_400_000_000
    assert alerts.is_backfill(_exc(), day)
    assert not alerts.is_backfill(_exc(), 3 * day)
    assert not alerts.is_backfill(_exc(), 0)  # off
    assert not alerts.is_backfill(_exc(seq=None), day)  # a timer's event_ts is its deadline


def test_labels_and_alert() -> None:
    cfg = config_from_dict({"oncall": {"console_url": "https://r.example.com/",
                                       "runbooks": {"sla_at_risk": "https://wiki/x"}}}).oncall
    exc = _exc()
    lab = alerts.labels(exc, "SURFACE-CO")
    assert lab == {"alertname": "sla_at_risk", "kind": "shipment", "key": "SHP-1", "severity": "warning",
                   "carrier": "SURFACE-CO"}
    a = alerts.am_alert(cfg, exc, lab, ends_at_us=0)
    assert a["startsAt"] == a["endsAt"] == "2026-01-03T00:00:00Z"  # never ends before it starts
    assert a["generatorURL"] == "https://r.example.com/#shipment/SHP-1"
    assert a["annotations"] == {"summary": "m", "id": "x", "runbook_url": "https://wiki/x"}
