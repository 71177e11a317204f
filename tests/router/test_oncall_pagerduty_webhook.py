"""PagerDuty Events v2 and the signed webhook against a local receiver that fails on purpose for a while.

The router and the sink run in this process against a real nats-server. While the receiver
answers 503 the sink retries with backoff and loses nothing; once it accepts again, every
delivery arrives in stream order, each trigger once, each resolve once, routed as configured.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401  (see tests/support/alertmanager.py)
import pytest

from router.oncall.alerts import dedup_key, verify_signature
from router.oncall.status import read_status
from tests.router.test_oncall_alertmanager import running_sink, sku
from tests.support.harness import make_config, publish_all, running_router, stream_last_seq, wait_for
from tests.support.natsserver import NatsServer
from tests.support.oracle import read_stream
from tests.support.receiver import running_receiver

pytestmark = pytest.mark.anyio

SECRET = "whsec-test-0123456789"


async def test_retry_then_in_order_catch_up_without_duplicates(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PD_ROUTING_KEY", "R0UT1NGKEY")
    with running_receiver() as rx:
        cfg = make_config(nats_server.url, tmp_path / "data", oncall={
            "console_url": "https://router.example.com",
            "pagerduty": {"routing_key_env": "TEST_PD_ROUTING_KEY", "url": rx.url + "/v2/enqueue"},
            "webhook": {"url": rx.url + "/hook", "signing_secret": SECRET},
            "routes": [{"target": "pagerduty", "severity": ["critical"]},
                       {"target": "webhook", "kind": ["sku"]}],
        })
        rx.failing = True
        async with running_router(cfg), running_sink(cfg):
            # Three SKUs go low, then out of stock (critical), then two are restocked.
            events = []
            for i in range(3):
                events.append(sku(f"SKU-{i}", type="received", location="BLR-DS-4", qty=3))
            for i in range(3):
                events.append(sku(f"SKU-{i}", type="picked", location="BLR-DS-4", qty=3))
            for i in range(2):
                events.append(sku(f"SKU-{i}", type="received", location="BLR-DS-4", qty=40))
            await publish_all(nats_server.url, events)
            await wait_for(lambda: rx.refused() >= 6, 30, "both targets refused several times")

            def status_shows_retrying() -> bool:
                status = read_status(cfg)
                targets = status["targets"] if status else {}
                return all((targets.get(t) or {}).get("retrying") for t in ("pagerduty", "webhook"))

            await wait_for(status_shows_retrying, 10, "status: retrying")
            assert rx.accepted() == []
            rx.failing = False

            stored = [json.loads(m.data) for m in await read_stream(nats_server.url, cfg.streams.exceptions)]
            # Webhook: every sku exception, in stream order, each payload exactly as published.
            want_hook = [e["id"] for e in stored if e["kind"] == "sku"]
            # PagerDuty: the critical ones only (stockout): trigger, and resolve for the restocked.
            crit = [e for e in stored if e["severity"] == "critical"]
            want_pd = [("trigger" if e["status"] == "raised" else "resolve",
                        dedup_key(e["kind"], e["rule"], e["key"], e["location"])) for e in crit]
            assert len(want_hook) == 3 * 2 + 2 * 2
            assert len(want_pd) == 3 + 2

            def pd_got() -> list[tuple[str, str]]:
                return [(r.json()["event_action"], r.json()["dedup_key"]) for r in rx.accepted("/v2/enqueue")]

            await wait_for(lambda: len(rx.accepted("/hook")) >= len(want_hook) and len(pd_got()) >= len(want_pd),
                           60, "caught up")
            hook = rx.accepted("/hook")
            assert [r.json()["id"] for r in hook] == want_hook
            raw = {json.loads(m.data)["id"]: m.data for m in await read_stream(nats_server.url, cfg.streams.exceptions)}
            for r in hook:
                assert r.body == raw[r.json()["id"]]  # the payload as is
                assert verify_signature(SECRET, r.body, r.headers["x-router-signature"])
                assert r.headers["x-router-exception-id"] == r.json()["id"]
            assert pd_got() == want_pd
            assert Counter(pd_got()).most_common(1)[0][1] == 1  # no duplicate trigger or resolve
            trigger = rx.accepted("/v2/enqueue")[0].json()
            assert trigger["routing_key"] == "R0UT1NGKEY"
            assert trigger["payload"]["severity"] == "critical"
            assert trigger["payload"]["summary"] == crit[0]["message"]
            assert trigger["client_url"] == f"https://router.example.com/#sku/{crit[0]['key']}"

            def status_caught_up() -> bool:
                status = read_status(cfg)
                if status is None:
                    return False
                t: dict[str, Any] = status["targets"]
                return (t["webhook"]["sent"]["open"] + t["webhook"]["sent"]["close"] == len(want_hook)
                        and t["pagerduty"]["sent"]["open"] == 3 and t["pagerduty"]["sent"]["close"] == 2
                        and t["pagerduty"]["retrying"] is None and t["pagerduty"]["pending"]["stream"] == 0)

            await wait_for(status_caught_up, 10, "status: caught up")


async def test_pagerduty_resolves_a_delivered_shipments_incident(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No clear ends a temperature excursion once the shipment is delivered: the sink finds it gone
    from router.exceptions.open and resolves the incident. The webhook gets what was published."""
    pytest.importorskip("router.engine.open_gather", reason="needs the router's open-exceptions query (5.1)")
    from contracts.times import rfc3339
    from tests.support.harness import now_us

    monkeypatch.setenv("TEST_PD_ROUTING_KEY", "R0UT1NGKEY")
    with running_receiver() as rx:
        cfg = make_config(nats_server.url, tmp_path / "data", oncall={
            "reconcile_every": "1s",
            "pagerduty": {"routing_key_env": "TEST_PD_ROUTING_KEY", "url": rx.url + "/v2/enqueue"},
            "webhook": {"url": rx.url + "/hook", "signing_secret": SECRET},
        })
        async with running_router(cfg), running_sink(cfg):
            await publish_all(nats_server.url, [
                ("events.shipment.SHP-3", json.dumps({
                    "type": "booked", "promised_by": rfc3339(now_us() + 86_400_000_000),
                    "temp_min": 2.0, "temp_max": 8.0}).encode()),
                ("events.shipment.SHP-3", b'{"type":"temperature","celsius": 11.0}'),
            ])
            key = "shipment.temperature_excursion.SHP-3"

            def actions() -> list[tuple[str, str]]:
                return [(r.json()["event_action"], r.json()["dedup_key"]) for r in rx.accepted("/v2/enqueue")]

            await wait_for(lambda: actions() == [("trigger", key)], 20, "triggered")
            await publish_all(nats_server.url, [("events.shipment.SHP-3", b'{"type":"delivered"}')])
            await wait_for(lambda: actions() == [("trigger", key), ("resolve", key)], 20, "resolved")
            await wait_for(lambda: len(rx.accepted("/hook")) >= 1, 20, "webhook")
            assert [r.json()["status"] for r in rx.accepted("/hook")] == ["raised"]


async def test_a_sink_taking_over_elsewhere_resolves_what_cleared_meanwhile(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sink A triggers and stops; the stockout clears while no sink runs; sink B starts on another
    data folder (a first start: it folds the stream silently) and resolves the incident."""
    monkeypatch.setenv("TEST_PD_ROUTING_KEY", "R0UT1NGKEY")
    with running_receiver() as rx:
        oncall = {"pagerduty": {"routing_key_env": "TEST_PD_ROUTING_KEY", "url": rx.url + "/v2/enqueue"},
                  "reconcile_every": "1s"}
        cfg_a = make_config(nats_server.url, tmp_path / "a", oncall=oncall)
        cfg_b = make_config(nats_server.url, tmp_path / "b", oncall=oncall)
        key = "sku.stockout.SKU-9.BLR-DS-4"

        def actions() -> list[tuple[str, str]]:
            return [(r.json()["event_action"], r.json()["dedup_key"]) for r in rx.accepted("/v2/enqueue")
                    if r.json()["dedup_key"] == key]

        async with running_router(cfg_a):
            async with running_sink(cfg_a):
                await publish_all(nats_server.url, [sku("SKU-9", type="counted", location="BLR-DS-4", on_hand=0)])
                await wait_for(lambda: actions() == [("trigger", key)], 20, "triggered by A")
            await publish_all(nats_server.url, [sku("SKU-9", type="received", location="BLR-DS-4", qty=50)])

            async def cleared_in_stream() -> bool:  # (stockout and low_stock raised, then both cleared)
                return await stream_last_seq(nats_server.url, cfg_a.streams.exceptions) == 4

            await wait_for(cleared_in_stream, 20, "the clears stored")
            async with running_sink(cfg_b):
                await wait_for(lambda: actions() == [("trigger", key), ("resolve", key)], 20, "resolved by B")
