"""The HTTP read API against a real router and nats-server: /state (local and forwarded by a
standby), /metrics in Prometheus text, /readyz while a backlog is applied, and /feed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.router.test_http import served, wait_status, wait_url
from tests.support.natsserver import NatsServer
from tests.support.procs import router_process, wait_healthy, write_config

pytestmark = pytest.mark.anyio


async def publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url)
    try:
        for subject, data in messages:
            await nc.publish(subject, data)
        await nc.flush(timeout=10)
    finally:
        await nc.close()


async def nats_state(url: str, kind: str, key: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        reply = await nc.request(f"router.state.{kind}.{key}", b"", timeout=5)
        return json.loads(reply.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


def received(key: str, qty: int, location: str = "BLR-DS-4") -> tuple[str, bytes]:
    return f"events.sku.{key}", json.dumps({"type": "received", "location": location, "qty": qty}).encode()


def counted(key: str, on_hand: int, location: str = "BLR-DS-4") -> tuple[str, bytes]:
    return f"events.sku.{key}", json.dumps(
        {"type": "counted", "location": location, "on_hand": on_hand}
    ).encode()


async def wait_seq(
    client: httpx.AsyncClient, kind: str, key: str, seq: int, timeout: float = 20.0
) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            r = await client.get(f"/state/{kind}/{key}")
            assert r.status_code == 200, r.text
            if r.json()["seq"] >= seq:
                return r.json()  # type: ignore[no-any-return]
            await anyio.sleep(0.05)


def async_client(client: httpx.Client) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=str(client.base_url), timeout=30)


async def test_state_replies_as_the_nats_query_does(tmp_path: Path, nats_server: NatsServer) -> None:
    with served(tmp_path, nats_server.url) as (_, sync_client):
        wait_status(sync_client, "/readyz", 200)
        client = async_client(sync_client)
        await publish(nats_server.url, [received("SKU-1", 3), received("SKU-1", 1, "DEL-WH-1")])
        body = await wait_seq(client, "sku", "SKU-1", 2)
        assert body == await nats_state(nats_server.url, "sku", "SKU-1")
        assert set(body) == {"kind", "key", "seq", "state", "exceptions"}
        assert body["state"]["available"] == 4
        assert {"rule": "low_stock", "location": "BLR-DS-4"} in body["exceptions"]
        never = await client.get("/state/shipment/NEVER-SEEN")
        assert never.status_code == 200  # not 404: a key never seen is seq 0
        assert never.json() == {
            "kind": "shipment",
            "key": "NEVER-SEEN",
            "seq": 0,
            "state": None,
            "exceptions": [],
        }
        assert never.headers["content-type"] == "application/json"
        for path in ("/state/parcel/X", "/state/sku/A.B", "/state/sku/" + "K" * 129, "/state/sku/%2A"):
            r = await client.get(path)
            assert r.status_code == 400, path
            assert r.json()["error"] == "bad_subject"
        assert (await client.get("/state/sku")).status_code == 404  # no such route
        await client.aclose()


async def test_metrics_is_prometheus_text(tmp_path: Path, nats_server: NatsServer) -> None:
    with served(tmp_path, nats_server.url) as (_, sync_client):
        wait_status(sync_client, "/readyz", 200)
        await publish(nats_server.url, [received("SKU-M", 10)])
        async with async_client(sync_client) as client:
            await wait_seq(client, "sku", "SKU-M", 1)
            r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        assert families, r.text[:500]
        samples = [s for f in families.values() for s in f.samples]
        assert any("lag" in s.name for s in samples)


async def test_a_standby_forwards_state_and_is_not_ready(tmp_path: Path, nats_server: NatsServer) -> None:
    router = {"lease": "3s", "lease_renew_every": "1s"}
    write_config(tmp_path / "a" / "config.toml", nats_server.url, router=router)
    write_config(tmp_path / "b" / "config.toml", nats_server.url, router=router)
    with (
        router_process(tmp_path / "a" / "config.toml") as a,
        router_process(tmp_path / "b" / "config.toml", start=False) as b,
    ):
        await wait_healthy(nats_server.url, a)
        b.start()
        a_client = httpx.AsyncClient(base_url=wait_url(a, tmp_path / "a" / "data"), timeout=10)
        b_client = httpx.AsyncClient(base_url=wait_url(b, tmp_path / "b" / "data"), timeout=10)
        async with a_client, b_client:
            await publish(nats_server.url, [received("SKU-F", 7)])
            owner = await wait_seq(a_client, "sku", "SKU-F", 1)
            forwarded = await b_client.get("/state/sku/SKU-F")
            assert forwarded.status_code == 200
            assert forwarded.json() == owner
            ready = await b_client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["role"] == "standby"
            assert (await b_client.get("/healthz")).status_code == 200


async def test_readyz_is_503_while_the_start_backlog_is_applied(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = tmp_path / "config.toml"
    write_config(config, nats_server.url)
    with router_process(config) as rp:  # creates the streams
        await wait_healthy(nats_server.url, rp)
        assert rp.terminate(timeout=20)[0] == 0
        count = 150_000
        nc = await nats.connect(nats_server.url, pending_size=256 * 1024 * 1024)
        try:
            js = nc.jsm()
            for start in range(0, count, 10_000):
                for i in range(start, start + 10_000):
                    await nc.publish(*counted(f"B-{i % 5000}", i % 50 + 10))
                await nc.flush(timeout=30)
                with anyio.fail_after(60):
                    while int((await js.stream_info("EVENTS")).state.last_seq or 0) < start + 10_000:
                        await anyio.sleep(0.01)
        finally:
            await nc.close()
        rp.start()
        async with httpx.AsyncClient(base_url=wait_url(rp, tmp_path / "data"), timeout=10) as client:
            codes: list[int] = []
            bodies: list[dict[str, Any]] = []
            with anyio.fail_after(120):
                while True:
                    r = await client.get("/readyz")
                    codes.append(r.status_code)
                    bodies.append(r.json())
                    if r.status_code == 200:
                        break
                    await anyio.sleep(0.02)
            assert codes[0] == 503, bodies[0]
            assert codes[-1] == 200
            assert bodies[-1]["partitions"][0]["applied_seq"] >= count
            # Seen while applying: running, its partition there, not caught up yet.
            catching_up = [b for b in bodies if b["partitions"] and not b["partitions"][0]["caught_up"]]
            assert catching_up, bodies[:3]
            assert all(not b["ready"] for b in catching_up)
            print(f"readyz: {codes.count(503)} answers 503 ({len(catching_up)} while catching up), then 200")


async def test_feed_delivers_raises_clears_and_ticks(tmp_path: Path, nats_server: NatsServer) -> None:
    with served(tmp_path, nats_server.url) as (_, client):
        wait_status(client, "/readyz", 200)
        seen: list[tuple[str, Any]] = []
        async with async_client(client) as ac, ac.stream("GET", "/feed") as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
            lines = r.aiter_lines()

            async def next_event() -> tuple[str, Any]:
                event, data = "", ""
                async for line in lines:
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data += line[6:]
                    elif line == "" and event:
                        return event, json.loads(data)
                raise AssertionError("the feed ended")

            assert (await next_event())[0] == "hello"
            assert (await next_event())[0] == "tick"  # at once
            started = time.monotonic()
            await publish(nats_server.url, [received("SKU-FEED", 2)])
            with anyio.fail_after(15):
                while not any(e == "raise" for e, _ in seen):
                    seen.append(await next_event())
            raise_latency = time.monotonic() - started
            await publish(nats_server.url, [received("SKU-FEED", 50)])
            with anyio.fail_after(15):
                while not any(e == "clear" for e, _ in seen):
                    seen.append(await next_event())
            with anyio.fail_after(15):
                while True:
                    event, data = await next_event()
                    if event == "tick" and data["as_of_seq"] >= 2:
                        break
        raised = next(d for e, d in seen if e == "raise")
        assert raised["key"] == "SKU-FEED"
        assert raised["rule"] == "low_stock"
        assert raised["status"] == "raised"
        cleared = next(d for e, d in seen if e == "clear")
        assert cleared["status"] == "cleared"
        assert data["lag"] == 0
        assert data["ready"] is True
        assert data["resident_actors"] >= 1
        assert set(data) >= {
            "events_per_s",
            "exceptions_per_s",
            "dead_letters",
            "resident_actors",
            "last_snapshot_age_s",
            "as_of_seq",
            "lag",
            "partitions",
        }
        print(f"feed: raise seen {raise_latency:.3f}s after the publish")


async def test_the_first_tick_has_rates_while_events_flow(tmp_path: Path, nats_server: NatsServer) -> None:
    """A feed that starts while events are applied says so in its first tick (it said 0.0 events/s)."""
    with served(tmp_path, nats_server.url) as (_, client):
        wait_status(client, "/readyz", 200)
        stop = anyio.Event()

        async def steady() -> None:  # about 200 events/s until the tick was read
            i = 0
            while not stop.is_set():
                await publish(nats_server.url, [received(f"SKU-RATE-{i % 50}", 100 + i)] * 20)
                i += 1
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(steady)
            async with async_client(client) as ac, ac.stream("GET", "/feed") as r:
                first_tick: dict[str, Any] | None = None
                event = ""
                with anyio.fail_after(15):
                    async for line in r.aiter_lines():
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event == "tick":
                            first_tick = json.loads(line[6:])
                            break
            stop.set()
        assert first_tick is not None
        assert first_tick["events_per_s"] > 0, first_tick


async def test_a_feed_client_that_does_not_read_is_dropped(tmp_path: Path, nats_server: NatsServer) -> None:
    """A client that never reads fills its buffer and is dropped; the router and a reading client go on."""
    import socket

    with served(tmp_path, nats_server.url) as (rp, client):
        wait_status(client, "/readyz", 200)
        host, port = str(client.base_url).removeprefix("http://").rstrip("/").split(":")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((host, int(port)))
        slow.sendall(b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n")
        count = 0
        try:
            async with async_client(client) as ac, ac.stream("GET", "/feed") as r:
                lines = r.aiter_lines()
                with anyio.fail_after(120):
                    while "feed_client_dropped" not in rp.log_text():
                        # Each pair raises and clears a stockout: two exceptions, two frames per client.
                        batch = []
                        for _ in range(250):
                            count += 1
                            batch += [counted("SKU-SLOW", 0), counted("SKU-SLOW", 30)]
                        await publish(nats_server.url, batch)
                        with anyio.move_on_after(0.5):
                            async for _line in lines:  # the reading client keeps up
                                pass
                # The reading client was not dropped: a raise published now still reaches it.
                await publish(nats_server.url, [counted("SKU-AFTER", 0)])
                with anyio.fail_after(30):
                    async for line in lines:
                        if line.startswith("data: ") and '"key":"SKU-AFTER"' in line:
                            break
        finally:
            slow.close()
        assert rp.log_text().count("feed_client_dropped") == 1
        assert "ASGI callable returned without completing response" not in rp.log_text()
        assert (await nats_state(nats_server.url, "sku", "SKU-SLOW"))["seq"] > 0
        print(f"feed: the client that did not read was dropped after {count} stockout pairs")


async def test_exceptions_open_filters_pages_and_refuses_bad_filters(tmp_path: Path, nats_server: NatsServer) -> None:
    from router.engine.open_gather import gather_open

    with served(tmp_path, nats_server.url) as (_, sync_client):
        wait_status(sync_client, "/readyz", 200)
        # Three SKUs out of stock at one location (stockout, critical; low_stock, warning) and
        # one low at another; a shipment delivered takes nothing open.
        await publish(
            nats_server.url,
            [counted(f"SKU-O{i}", 0) for i in range(3)] + [counted("SKU-L", 2, "DEL-WH-1")],
        )
        async with async_client(sync_client) as client:
            with anyio.fail_after(20):
                while (await client.get("/exceptions/open")).json()["total"] < 7:
                    await anyio.sleep(0.05)
            everything = (await client.get("/exceptions/open")).json()
            assert set(everything) == {"open", "total", "next", "partitions", "partition_count"}
            assert everything["total"] == 7
            assert everything["partitions"] == [0]
            assert everything["partition_count"] == 1
            assert everything["next"] is None
            assert everything == await _gathered(nats_server.url, gather_open, {})
            keys = [(e["kind"], e["key"], e["rule"], e["location"]) for e in everything["open"]]
            assert keys == sorted(keys)
            first = everything["open"][0]
            assert set(first) >= {"id", "kind", "key", "rule", "status", "severity", "location", "message"}
            assert first["status"] == "raised"

            critical = (await client.get("/exceptions/open?kind=sku&severity=critical&rule=&location=")).json()
            assert critical["total"] == 3
            assert {e["rule"] for e in critical["open"]} == {"stockout"}
            one = (await client.get("/exceptions/open", params={"key": "SKU-L", "location": "DEL-WH-1"})).json()
            assert [(e["key"], e["rule"]) for e in one["open"]] == [("SKU-L", "low_stock")]

            page1 = (await client.get("/exceptions/open?limit=4")).json()
            assert len(page1["open"]) == 4
            assert page1["total"] == 7
            assert page1["next"]
            page2 = (await client.get("/exceptions/open", params={"limit": "4", "after": page1["next"]})).json()
            assert page1["open"] + page2["open"] == everything["open"]
            assert page2["next"] is None

            for query in ("colour=red", "kind=parcel", "rule=nope", "severity=fatal", "limit=0", "limit=1001",
                          "limit=abc", "key=a.b", "after=not-a-cursor", "kind=sku&kind=shipment"):
                r = await client.get(f"/exceptions/open?{query}")
                assert r.status_code == 400, query
                assert set(r.json()) == {"error"}, query
                assert r.json()["error"], query


async def _gathered(url: str, gather: Any, filters: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        return await gather(nc, filters)  # type: ignore[no-any-return]
    finally:
        await nc.close()


async def test_a_graceful_stop_ends_open_feeds(tmp_path: Path, nats_server: NatsServer) -> None:
    """SIGTERM with feed clients connected: their streams end, the router stops cleanly, http.url goes."""
    from router.http.server import read_url_file

    with served(tmp_path, nats_server.url) as (rp, client):
        wait_status(client, "/readyz", 200)
        async with async_client(client) as ac, ac.stream("GET", "/feed") as r:
            lines = r.aiter_lines()
            with anyio.fail_after(10):
                async for line in lines:
                    if line == "event: tick":
                        break
            rc, took = await anyio.to_thread.run_sync(lambda: rp.terminate(timeout=30))
            assert rc == 0, rp.tail()
            with anyio.fail_after(10):
                async for _ in lines:  # the stream ended (not cut off mid-event)
                    pass
        assert read_url_file(tmp_path / "data") is None
        print(f"stop with an open feed took {took:.2f}s")
