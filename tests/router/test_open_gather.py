"""The gather over several instances (router/engine/open_gather.py) on a real nats-server, with
responders that answer `router.exceptions.open` for given partitions as instances do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest

from router.engine.open_gather import BadFilter, Incomplete, gather_open
from router.engine.open_query import encode_cursor, parse_request, sort_key

pytestmark = pytest.mark.anyio


def entry(kind: str, key: str, rule: str, location: str | None = None) -> dict[str, Any]:
    sev = "critical" if rule in ("stockout", "oversold", "temperature_excursion") else "warning"
    return {
        "id": f"{kind}:{key}:{rule}:{location or ''}:raised:7", "kind": kind, "key": key, "rule": rule,
        "status": "raised", "severity": sev, "location": location, "value": 0, "threshold": 0, "seq": 7,
        "event_ts": "2026-12-01T10:00:00Z", "detected_at": "2026-12-01T10:00:00.1Z", "message": "m",
    }


# Two instances: one runs partition 0, the other partitions 1 and 2.
INSTANCE_A = [entry("sku", "A-1", "stockout", "DS-1"), entry("sku", "A-1", "low_stock", "DS-1"),
              entry("shipment", "S-9", "sla_at_risk"), entry("sku", "C-3", "oversold", "DS-2")]
INSTANCE_B = [entry("sku", "A-2", "low_stock"), entry("sku", "A-2", "low_stock", "DS-1"),
              entry("campaign", "K-1", "cpa_exceeded"), entry("sku", "B-7", "stockout", "DS-9"),
              entry("sku", "C-3", "low_stock", "DS-2")]


def instance_reply(entries: list[dict[str, Any]], partitions: list[int], count: int, data: bytes) -> dict[str, Any]:
    """What an instance answers: its matches after the cursor, sorted and cut, with the total."""
    req = parse_request(data)
    match = sorted((e for e in entries if all(e[k] == v for k, v in req.filters.items())), key=sort_key)
    after = [e for e in match if req.after is None or sort_key(e) > req.after]
    page = after[: req.limit]
    more = len(after) > req.limit
    return {"open": page, "total": len(match), "next": encode_cursor(sort_key(page[-1])) if more else None,
            "partitions": partitions, "partition_count": count}


@asynccontextmanager
async def responder(url: str, answer: Callable[[bytes], dict[str, Any] | None]) -> AsyncIterator[None]:
    nc = await nats.connect(url)

    async def on(msg: Any) -> None:
        body = answer(msg.data)
        if body is not None:
            await nc.publish(msg.reply, json.dumps(body).encode())

    await nc.subscribe("router.exceptions.open", cb=on)
    await nc.flush()  # subscribed at the server before any request
    try:
        yield
    finally:
        await nc.close()


async def test_replies_of_two_instances_are_merged_and_paged(nats_server: Any) -> None:
    every = sorted(INSTANCE_A + INSTANCE_B, key=sort_key)
    async with (
        responder(nats_server.url, lambda d: instance_reply(INSTANCE_A, [0], 3, d)),
        responder(nats_server.url, lambda d: instance_reply(INSTANCE_B, [1, 2], 3, d)),
    ):
        nc = await nats.connect(nats_server.url)
        try:
            whole = await gather_open(nc)
            assert whole["open"] == every
            assert (whole["total"], whole["next"], whole["partitions"], whole["partition_count"]) == (9, None, [0, 1, 2], 3)
            # Null first: A-2's low_stock without a location comes before DS-1's.
            assert [(e["kind"], e["key"], e["location"]) for e in whole["open"][:5]] == [
                ("campaign", "K-1", None), ("shipment", "S-9", None), ("sku", "A-1", "DS-1"), ("sku", "A-1", "DS-1"),
                ("sku", "A-2", None),
            ]
            for limit in (1, 2, 4):
                pages, after = [], None
                while True:
                    reply = await gather_open(nc, {"limit": limit, **({"after": after} if after else {})})
                    assert reply["total"] == 9
                    assert len(reply["open"]) <= limit
                    pages += reply["open"]
                    after = reply["next"]
                    if after is None:
                        break
                assert pages == every, limit
            sku = await gather_open(nc, {"kind": "sku", "location": "DS-2"})
            assert [(e["key"], e["rule"]) for e in sku["open"]] == [("C-3", "low_stock"), ("C-3", "oversold")]
            assert sku["total"] == 2
        finally:
            await nc.close()


async def test_missing_partitions_are_named_and_errors_passed_on(nats_server: Any) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(Incomplete) as none:
            await gather_open(nc, wait_s=0.3)
        assert str(none.value) == "no router answered on router.exceptions.open within 0.3s"
        async with responder(nats_server.url, lambda d: instance_reply(INSTANCE_B, [1, 3], 5, d)):
            with pytest.raises(Incomplete) as missing:
                await gather_open(nc, wait_s=0.3)
            assert missing.value.missing == [0, 2, 4]
            assert "no answer for partitions 0, 2, 4 of 5" in str(missing.value)
            # A second owner of partition 1 for a moment (a takeover): counted once.
            async with (
                responder(nats_server.url, lambda d: instance_reply(INSTANCE_B, [1], 5, d)),
                responder(nats_server.url, lambda d: instance_reply(INSTANCE_A, [0, 2, 4], 5, d)),
            ):
                reply = await gather_open(nc, wait_s=2)
                assert reply["partitions"] == [0, 1, 2, 3, 4]
                assert reply["total"] == 9
        # The router's own error (a rule this client does not know yet, say) is passed on.
        async with responder(nats_server.url, lambda d: {"error": "`rule`: 'x' is not a rule"}):
            with pytest.raises(BadFilter, match="is not a rule"):
                await gather_open(nc, wait_s=2)
        # A bad request is refused before it is sent.
        with pytest.raises(BadFilter, match="unknown filter 'colour'"):
            await gather_open(nc, {"colour": "red"})
    finally:
        await nc.close()
