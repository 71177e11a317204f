"""Partner webhooks end to end: the two worked examples of docs/sources (an AfterShip tracking
update, a Shopify inventory level) with their [sources.*] config, signed, against a real
`router run` process and nats-server; bad signatures, unmappable payloads and retries."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import subprocess
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts.sources import body_id
from tests.router.test_ingest_http import http_router, stored, stream_last
from tests.support.natsserver import NatsServer
from tests.support.oracle import read_stream
from tests.support.procs import router_executable

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sources"
AFTERSHIP_SECRET = "whsec-aftership-test"
SHOPIFY_SECRET = "shpss-test"


def sign(secret: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def aftership(body: bytes, secret: str = AFTERSHIP_SECRET) -> dict[str, str]:
    return {"aftership-hmac-sha256": sign(secret, body), "Content-Type": "application/json"}


def shopify(body: bytes, webhook_id: str, secret: str = SHOPIFY_SECRET) -> dict[str, str]:
    return {
        "X-Shopify-Hmac-Sha256": sign(secret, body),
        "X-Shopify-Topic": "inventory_levels/update",
        "X-Shopify-Webhook-Id": webhook_id,
        "Content-Type": "application/json",
    }


async def state(url: str, kind: str, key: str) -> Any:
    nc = await nats.connect(url)
    try:
        return json.loads((await nc.request(f"router.state.{kind}.{key}", b"", timeout=5)).data)
    finally:
        await nc.close()


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worked example's config reads the secrets from these variables (the router inherits them)."""
    monkeypatch.setenv("AFTERSHIP_WEBHOOK_SECRET", AFTERSHIP_SECRET)
    monkeypatch.setenv("SHOPIFY_WEBHOOK_SECRET", SHOPIFY_SECRET)


@pytest.mark.usefixtures("secrets_env")
async def test_carrier_tracking_webhook(tmp_path: Path, nats_server: NatsServer) -> None:
    """AfterShip's tracking_update: one shipment event per checkpoint, redeliveries stored once."""
    url = nats_server.url
    toml = (DOCS / "sources.toml").read_text()
    payload = json.loads((DOCS / "aftership-tracking-update.json").read_text())
    body = (DOCS / "aftership-tracking-update.json").read_bytes()
    async with http_router(tmp_path, url, toml) as (rp, client, cfg):
        # A bad or missing signature: 401, nothing kept anywhere.
        for headers in ({}, aftership(body, "wrong-secret"), {"aftership-hmac-sha256": "not base64!"}):
            r = await client.post("/sources/aftership", content=body, headers=headers)
            assert r.status_code == 401, r.text
        r = await client.post("/sources/aftership", content=body + b" ", headers=aftership(body))
        assert r.status_code == 401  # signed for other bytes
        assert await stream_last(url, cfg.streams.events) == 0
        assert await stream_last(url, cfg.streams.deadletter) == 0
        assert (await client.post("/sources/nobody", content=body)).status_code == 404

        r = await client.post("/sources/aftership", content=body, headers=aftership(body))
        assert r.status_code == 202, r.text
        events = r.json()["events"]
        # InfoReceived is skipped by the types table; the two InTransit scans are stored in order.
        assert [(e["kind"], e["key"], e["duplicate"]) for e in events] == [("shipment", "1Z999AA10123456784", False)] * 2
        assert events[0]["seq"] < events[1]["seq"]
        first = await stored(url, cfg.streams.events, events[0]["seq"])
        assert first.subject == "events.shipment.1Z999AA10123456784"
        assert json.loads(first.data) == {"type": "in_transit", "ts": "2026-12-01T22:10:00-05:00",
                                          "location": "Louisville, KY, US", "eta": "2026-12-03T20:00:00-05:00",
                                          "reason": "Origin Scan"}
        assert first.headers["Nats-Msg-Id"] == (
            "http:shipment:1Z999AA10123456784:aftership:k3x9w2p7q1m8r5t0v6y4z2a1:2026-12-01T22:10:00-05:00:InTransit_001"
        )

        # AfterShip retries the same delivery: every event is a duplicate.
        r = await client.post("/sources/aftership", content=body, headers=aftership(body))
        assert [(e["seq"], e["duplicate"]) for e in r.json()["events"]] == [(e["seq"], True) for e in events]

        # The next webhook repeats the old checkpoints and adds one: only the new one is stored.
        nxt = copy.deepcopy(payload)
        nxt["event_id"] = "0a7d3c52-2f4e-4b5a-8e51-7d1c9b6f0e22"
        nxt["msg"]["tag"] = "OutForDelivery"
        nxt["msg"]["checkpoints"].append({**nxt["msg"]["checkpoints"][-1], "tag": "OutForDelivery",
                                          "subtag": "OutForDelivery_001", "message": "Out For Delivery Today",
                                          "checkpoint_time": "2026-12-02T05:12:00-05:00", "location": "Austin, TX, US"})
        nbody = json.dumps(nxt).encode()
        r = await client.post("/sources/aftership", content=nbody, headers=aftership(nbody))
        assert r.status_code == 202, r.text
        assert [e["duplicate"] for e in r.json()["events"]] == [True, True, False]
        assert await stream_last(url, cfg.streams.events) == 3

        async def applied() -> Any:
            s = await state(url, "shipment", "1Z999AA10123456784")
            return s if s["seq"] == 3 else None

        with anyio.fail_after(20):
            while (s := await applied()) is None:
                await anyio.sleep(0.05)
        assert s["state"]["status"] == "out_for_delivery"
        assert s["state"]["last_movement"] == "2026-12-02T10:12:00Z"
        assert s["state"]["eta"] == "2026-12-04T01:00:00Z"

        # A status the table does not know: the whole payload is kept in DEADLETTER, none of its events stored.
        lost = copy.deepcopy(nxt)
        lost["msg"]["checkpoints"].append({**nxt["msg"]["checkpoints"][-1], "tag": "Lost", "subtag": "Lost_001",
                                           "checkpoint_time": "2026-12-02T05:40:00-05:00"})
        lbody = json.dumps(lost).encode()
        r = await client.post("/sources/aftership", content=lbody, headers=aftership(lbody))
        assert r.status_code == 202, r.text
        assert r.json()["error"] == "unmapped"
        assert "status 'Lost' is not in sources.aftership.types" in r.json()["detail"]
        assert "$.msg.checkpoints[4]" in r.json()["detail"]
        assert await stream_last(url, cfg.streams.events) == 3
        dead = await stored(url, cfg.streams.deadletter, r.json()["deadletter_seq"])
        assert dead.subject == "deadletter.unknown"
        assert dead.data == lbody
        assert dead.headers["Router-Error"] == "unmapped"
        assert dead.headers["Router-Subject"] == "aftership"
        assert dead.headers["Nats-Msg-Id"] == body_id("aftership", lbody)
        assert rp.running
    assert AFTERSHIP_SECRET not in rp.log_text()


@pytest.mark.usefixtures("secrets_env")
async def test_inventory_level_webhook(tmp_path: Path, nats_server: NatsServer) -> None:
    """Shopify's inventory_levels/update: a count of the SKU at the location; low stock raises."""
    url = nats_server.url
    toml = (DOCS / "sources.toml").read_text()
    body = (DOCS / "shopify-inventory-levels-update.json").read_bytes()
    async with http_router(tmp_path, url, toml) as (_rp, client, cfg):
        r = await client.post("/sources/shopify", content=body, headers=shopify(body, "wh-1", "not-the-secret"))
        assert r.status_code == 401
        r = await client.post("/sources/shopify", content=body, headers=shopify(body, "wh-1"))
        assert r.status_code == 202, r.text
        (ev,) = r.json()["events"]
        assert (ev["kind"], ev["key"], ev["duplicate"]) == ("sku", "SHOP-49148385476790", False)
        # Shopify retries the delivery with the same X-Shopify-Webhook-Id: stored once.
        r = await client.post("/sources/shopify", content=body, headers=shopify(body, "wh-1"))
        assert r.json()["events"] == [{**ev, "duplicate": True}]

        with anyio.fail_after(20):
            while True:
                raised = [json.loads(m.data) for m in await read_stream(url, cfg.streams.exceptions)]
                if raised:
                    break
                await anyio.sleep(0.05)
        assert [(e["rule"], e["key"], e["location"], e["value"]) for e in raised] == [
            ("low_stock", "SHOP-49148385476790", "shopify-76329468118", 3)
        ]
        s = await state(url, "sku", "SHOP-49148385476790")
        assert s["state"]["locations"]["shopify-76329468118"]["on_hand"] == 3

        # Shopify sends `available: null` for an item it does not track: no count, so unmapped.
        untracked = json.loads(body)
        untracked["available"] = None
        ubody = json.dumps(untracked).encode()
        r = await client.post("/sources/shopify", content=ubody, headers=shopify(ubody, "wh-2"))
        assert r.status_code == 202, r.text
        assert r.json()["error"] == "unmapped"
        assert "on_hand" in r.json()["detail"]
        seq = r.json()["deadletter_seq"]
        again = await client.post("/sources/shopify", content=ubody, headers=shopify(ubody, "wh-2"))
        assert again.json()["deadletter_seq"] == seq  # a retry of the same body is kept once
        assert again.json()["duplicate"] is True
        notjson = b"<xml/>"
        r = await client.post("/sources/shopify", content=notjson, headers=shopify(notjson, "wh-3"))
        assert r.json()["error"] == "unmapped"
        assert "not JSON" in r.json()["detail"]
        assert await stream_last(url, cfg.streams.deadletter) == 2
        assert await stream_last(url, cfg.streams.events) == 1

        # Counted on /metrics by source and outcome.
        metrics = await client.get("/metrics")
        found = {
            (s.labels.get("source"), s.labels.get("outcome")): s.value
            for fam in text_string_to_metric_families(metrics.text)
            for s in fam.samples
            if s.name in ("ops_router_http_source_payloads_total", "ops_router_http_ingest_events_total")
        }
        assert found[("shopify", "mapped")] == 2
        assert found[("shopify", "unmapped")] == 3
        assert found[("shopify", "bad_signature")] == 1
        assert found[(None, "stored")] == 1
        assert found[(None, "duplicate")] == 1

        # `router dlq` shows them, with the source's name.
        done = await anyio.run_process([router_executable(), "dlq", "list", "--server", url], check=False)
        out = done.stdout.decode()
        assert done.returncode == 0, done.stderr.decode()
        assert out.count("unmapped") == 2
        assert "shopify" in out
        assert "not JSON" in out
        assert "a partner payload to POST /sources/<name>, not in EVENTS" in out


async def test_a_source_without_a_signature_takes_the_ingest_token(tmp_path: Path, nats_server: NatsServer) -> None:
    toml = """
[sources.wms]
each = "$.levels[*]"
kind = "sku"
key = "@.sku"
type = "counted"
fields = { location = "$.warehouse", on_hand = "@.on_hand", ts = "$.counted_at" }
idempotency_key = "{$.push_id}:{@.sku}"
"""
    push = {"push_id": "p-1", "warehouse": "DEL-WH-1", "counted_at": "2026-12-01T06:00:00+05:30",
            "levels": [{"sku": "SKU-1", "on_hand": 40}, {"sku": "SKU-2", "on_hand": 0}, {"sku": "SKU-3", "on_hand": 12}]}
    body = json.dumps(push).encode()
    async with http_router(tmp_path, nats_server.url, toml, http={"ingest_token": "bridge"}) as (_rp, client, cfg):
        assert (await client.post("/sources/wms", content=body)).status_code == 401
        r = await client.post("/sources/wms", content=body, headers={"Authorization": "Bearer bridge"})
        assert r.status_code == 202, r.text
        assert [e["key"] for e in r.json()["events"]] == ["SKU-1", "SKU-2", "SKU-3"]
        assert await stream_last(nats_server.url, cfg.streams.events) == 3


def test_config_check_names_a_bad_mapping(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[sources.carrier]\nkind = "shipment"\nkey = "$.tracking["\ntype = "$.status"\n')
    done = subprocess.run([router_executable(), "check-config", "--config", str(config)], capture_output=True, check=False)
    assert done.returncode == 2
    err = done.stderr.decode()
    assert "sources.carrier.key" in err
    assert "e.g." in err
