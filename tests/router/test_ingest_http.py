"""HTTP ingestion (CONTRACT.md section 7) against a real `router run` process and nats-server:
every status and reason, idempotency past the stream's duplicate window, the batch form, and
503 while NATS is away."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats
import pytest

from contracts.config import Config, load_config
from contracts.times import rfc3339
from router.http.server import read_url_file
from tests.support.harness import now_us
from tests.support.natsserver import NatsServer
from tests.support.procs import RouterProcess, router_process, wait_healthy, write_config

pytestmark = pytest.mark.anyio

GOOD = b'{ "type": "received", "location": "BLR-1",  "qty": 3 }\n'  # stored byte for byte


@asynccontextmanager
async def http_router(
    tmp_path: Path, url: str, extra_toml: str = "", **sections: dict[str, Any]
) -> AsyncIterator[tuple[RouterProcess, httpx.AsyncClient, Config]]:
    """A router process serving HTTP on a free port (config: `sections`, then `extra_toml`), and a client."""
    config = tmp_path / "config.toml"
    write_config(config, url, **sections)
    if extra_toml:
        config.write_text(config.read_text() + "\n" + extra_toml)
    cfg = load_config(config)
    with router_process(config) as rp:
        await wait_healthy(url, rp)
        with anyio.fail_after(20):
            while (base := read_url_file(tmp_path / "data")) is None:
                assert rp.running, rp.tail()
                await anyio.sleep(0.05)
        async with httpx.AsyncClient(base_url=base, timeout=15) as client:
            yield rp, client, cfg


async def stream_last(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jsm().stream_info(stream)).state.last_seq or 0)
    finally:
        await nc.close()


async def stored(url: str, stream: str, seq: int) -> Any:
    nc = await nats.connect(url)
    try:
        return await nc.jsm().get_msg(stream, seq)
    finally:
        await nc.close()


def reason(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]


async def test_every_status_and_reason(tmp_path: Path, nats_server: NatsServer) -> None:
    async with http_router(tmp_path, nats_server.url, rules={"max_future_skew": "1h"}) as (rp, client, cfg):
        r = await client.post("/events/sku/SKU-1", content=GOOD)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body == {"seq": body["seq"], "duplicate": False}
        msg = await stored(nats_server.url, cfg.streams.events, body["seq"])
        assert msg.subject == "events.sku.SKU-1"
        assert msg.data == GOOD  # the body's bytes, unchanged
        assert "Nats-Msg-Id" not in (msg.headers or {})
        last = await stream_last(nats_server.url, cfg.streams.events)

        # A kind or key section 1 does not allow: 400 bad_subject.
        for path in ("/events/widget/X", "/events/sku/a.b", "/events/sku/", "/events/sku", "/events/sku/a/b",
                     "/events/sku/" + "k" * 129, "/events/sku/sp%20ace", "/events/7/sku"):
            r = await client.post(path, content=GOOD)
            assert reason(r) == (400, "bad_subject"), (path, r.text)
            assert r.json()["detail"]

        # Bodies that fail section 2 and 4, each with the router's dead-letter code and detail.
        ahead = rfc3339(now_us() + 5 * 3_600_000_000 + 1_800_000_000)
        cases = [
            (b'{"type": "received",', "malformed", None),
            (b"[1, 2]", "malformed", "payload is a JSON array, not an object"),
            (b'{"type": "received", "location": "X", "qty": NaN}', "malformed", None),
            (b'\xef\xbb\xbf{"type": "received", "location": "X", "qty": 1}', "malformed", None),
            (b'{"location": "X", "qty": 1}', "invalid", "Object missing required field `type`"),
            (b'{"type": 7}', "invalid", "Expected `str`, got `int` - at `$.type`"),
            (b'{"type": "teleported"}', "unknown_type", "unknown sku event type 'teleported' - at `$.type`"),
            (b'{"type": "received", "location": "X", "qty": "2"}', "invalid", "Expected `int`, got `str` - at `$.qty`"),
            (b'{"type": "received", "location": "X", "qty": 2.5}', "invalid", "Expected `int`, got `float` - at `$.qty`"),
            (json.dumps({"type": "received", "location": "X", "qty": 1, "ts": ahead}).encode(), "invalid",
             "`$.ts` is 5h30m ahead of the time of receipt"),
        ]
        for data, code, detail in cases:
            r = await client.post("/events/sku/SKU-1", content=data)
            assert reason(r) == (400, code), (data, r.text)
            if detail is not None:
                assert r.json()["detail"] == detail

        for key in ("", "k" * 129):
            r = await client.post("/events/sku/SKU-1", content=GOOD, headers={"Idempotency-Key": key})
            assert reason(r) == (400, "bad_idempotency_key"), r.text

        # Over the server's maximum payload: 413, with a length and streamed without one.
        big = b'{"type": "received", "location": "X", "qty": 1, "pad": "' + b"x" * (1024 * 1024) + b'"}'
        r = await client.post("/events/sku/SKU-1", content=big)
        assert reason(r) == (413, "too_large"), r.text

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        r = await client.post("/events/sku/SKU-1", content=chunks())
        assert reason(r) == (413, "too_large"), r.text

        # None of it was stored, nor dead-lettered.
        assert await stream_last(nats_server.url, cfg.streams.events) == last
        assert await stream_last(nats_server.url, cfg.streams.deadletter) == 0
        assert rp.running


async def test_ingest_token(tmp_path: Path, nats_server: NatsServer) -> None:
    http = {"token": "read-secret", "ingest_token": "ingest-secret"}
    async with http_router(tmp_path, nats_server.url, http=http) as (rp, client, cfg):
        r = await client.post("/events/sku/SKU-1", content=GOOD)
        assert reason(r) == (401, "unauthorized")
        r = await client.post("/events/sku/SKU-1", content=GOOD, headers={"Authorization": "Bearer read-secret"})
        assert reason(r) == (401, "unauthorized")  # the read token cannot write
        r = await client.post("/events", content=b"", headers={"Authorization": "Bearer read-secret"})
        assert reason(r) == (401, "unauthorized")
        r = await client.post("/events/sku/SKU-1?token=ingest-secret", content=GOOD)
        assert reason(r) == (401, "unauthorized")  # never read from a URL
        assert await stream_last(nats_server.url, cfg.streams.events) == 0
        r = await client.post("/events/sku/SKU-1", content=GOOD, headers={"Authorization": "Bearer ingest-secret"})
        assert r.status_code == 202, r.text
        r = await client.get("/state/sku/SKU-1", headers={"Authorization": "Bearer ingest-secret"})
        assert r.status_code == 401  # a bridge given the ingest token cannot read
    assert "ingest-secret" not in rp.log_text()


async def _window_passed(url: str, stream: str) -> None:
    """Until the stream's duplicate window has passed for everything stored before now: a probe
    published with one id is stored again (not a duplicate) once the window forgot its first copy."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    probe = {"Nats-Msg-Id": f"probe-{time.time_ns()}"}
    data = b'{"type": "received", "location": "PROBE", "qty": 1}'
    try:
        await js.publish("events.sku.PROBE", data, headers=dict(probe))
        with anyio.fail_after(30):
            while (await js.publish("events.sku.PROBE", data, headers=dict(probe))).duplicate:
                await anyio.sleep(0.1)
    finally:
        await nc.close()


async def test_idempotent_retry_after_the_duplicate_window(tmp_path: Path, nats_server: NatsServer) -> None:
    async with http_router(tmp_path, nats_server.url, streams={"duplicate_window": "1s"}) as (_rp, client, cfg):
        headers = {"Idempotency-Key": "order 10482/line 1"}
        first = await client.post("/events/sku/SKU-1", content=GOOD, headers=headers)
        assert first.status_code == 202, first.text
        seq = first.json()["seq"]
        assert first.json()["duplicate"] is False
        again = await client.post("/events/sku/SKU-1", content=GOOD, headers=headers)
        assert again.json() == {"seq": seq, "duplicate": True}
        msg = await stored(nats_server.url, cfg.streams.events, seq)
        assert msg.headers["Nats-Msg-Id"] == "http:sku:SKU-1:order 10482/line 1"

        await _window_passed(nats_server.url, cfg.streams.events)
        last = await stream_last(nats_server.url, cfg.streams.events)
        later = await client.post("/events/sku/SKU-1", content=GOOD, headers=headers)
        assert later.json() == {"seq": seq, "duplicate": True}  # the stream alone would store it again
        assert await stream_last(nats_server.url, cfg.streams.events) == last

        # The same key for another entity is another event.
        other = await client.post("/events/sku/SKU-2", content=GOOD, headers=headers)
        assert other.status_code == 202
        assert other.json()["duplicate"] is False
        assert other.json()["seq"] > last
        # The batch form shares the record.
        line = {"kind": "sku", "key": "SKU-1", "event": json.loads(GOOD), "idempotency_key": "order 10482/line 1"}
        r = await client.post("/events", content=json.dumps(line).encode())
        assert [json.loads(x) for x in r.text.splitlines()] == [{"line": 1, "status": 202, "seq": seq, "duplicate": True}]


async def test_batch_answers_each_line_in_order(tmp_path: Path, nats_server: NatsServer) -> None:
    async with http_router(tmp_path, nats_server.url) as (_rp, client, cfg):
        def line(key: str, event: Any, idem: str | None = None, kind: str = "sku") -> bytes:
            obj: dict[str, Any] = {"kind": kind, "key": key, "event": event}
            if idem is not None:
                obj["idempotency_key"] = idem
            return json.dumps(obj).encode()

        ev = {"type": "received", "location": "L", "qty": 1}
        raw_event = b'{"type":"ordered","location":"L","qty":2,  "order_id":"o-1"}'
        lines = [
            line("A", ev, "a-1"),                                            # 1: stored
            b'{"kind": "sku", "key": "A", "event": ' + raw_event + b"}",     # 2: stored, bytes as in the line
            b"",                                                             # 3: blank, no answer
            line("B", {"type": "received", "location": "L", "qty": "1"}),    # 4: invalid
            b'{"kind": "sku", "key": "B", "event": {"type": ',               # 5: not JSON
            line("a.b", ev),                                                 # 6: bad subject
            line("A", ev, kind="widget"),                                    # 7: bad kind
            line("A", ev, "a-1"),                                            # 8: duplicate of line 1
            b'{"kind": "sku", "key": "C"}',                                  # 9: no event
            line("C", ev, "x" * 200),                                        # 10: bad idempotency key
            *[line(f"K{i % 7}", {"type": "received", "location": "L", "qty": i + 1}) for i in range(40)],  # 11-50
        ]
        r = await client.post("/events", content=b"\n".join(lines) + b"\n")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/x-ndjson")
        answers = [json.loads(x) for x in r.text.splitlines()]
        assert [a["line"] for a in answers] == [1, 2, *range(4, 51)]
        by = {a["line"]: a for a in answers}
        assert by[1]["status"] == 202
        assert by[1]["duplicate"] is False
        assert by[2]["status"] == 202
        assert (by[4]["status"], by[4]["error"]) == (400, "invalid")
        assert (by[5]["status"], by[5]["error"]) == (400, "malformed")
        assert (by[6]["status"], by[6]["error"]) == (400, "bad_subject")
        assert (by[7]["status"], by[7]["error"]) == (400, "bad_subject")
        assert by[8] == {"line": 8, "status": 202, "seq": by[1]["seq"], "duplicate": True}
        assert (by[9]["status"], by[9]["error"]) == (400, "invalid")
        assert (by[10]["status"], by[10]["error"]) == (400, "bad_idempotency_key")
        assert all(by[n]["status"] == 202 and by[n]["duplicate"] is False for n in range(11, 51))
        # Lines of one key are stored in line order.
        for k in range(7):
            seqs = [by[11 + i]["seq"] for i in range(40) if i % 7 == k]
            assert seqs == sorted(seqs)
        assert by[2]["seq"] > by[1]["seq"]
        msg = await stored(nats_server.url, cfg.streams.events, by[2]["seq"])
        assert (msg.subject, msg.data) == ("events.sku.A", raw_event)
        # Exactly the 202 lines that were not duplicates were stored.
        assert await stream_last(nats_server.url, cfg.streams.events) == 42
        # A batch with no line at all is refused as a whole, and stores nothing.
        for empty in (b"", b"\n \n"):
            r = await client.post("/events", content=empty)
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "empty"
        assert await stream_last(nats_server.url, cfg.streams.events) == 42


WMS = """
[sources.wms]
kind = "sku"
key = "$.sku"
type = "counted"
fields = { location = "$.at", on_hand = "$.level" }
idempotency_key = "{$.push}"
"""


async def test_503_while_nats_is_away_then_202(tmp_path: Path, nats_server: NatsServer) -> None:
    push = json.dumps({"push": "p-1", "sku": "SKU-9", "at": "DEL-WH-1", "level": 4}).encode()
    unmappable = json.dumps({"push": "p-2", "at": "DEL-WH-1", "level": 4}).encode()
    async with http_router(tmp_path, nats_server.url, WMS) as (rp, client, cfg):
        assert (await client.post("/events/sku/SKU-1", content=GOOD)).status_code == 202
        nats_server.stop()
        try:
            r = await client.post("/events/sku/SKU-1", content=GOOD, headers={"Idempotency-Key": "k-1"})
            assert reason(r) == (503, "unavailable"), r.text
            assert int(r.headers["Retry-After"]) > 0
            b = await client.post("/events", content=json.dumps({"kind": "sku", "key": "SKU-1", "event": json.loads(GOOD)}).encode())
            assert b.status_code == 200
            assert json.loads(b.text)["status"] == 503
            assert int(b.headers["Retry-After"]) > 0
            # Bad input is still 400 while NATS is away: it is checked first.
            assert reason(await client.post("/events/sku/SKU-1", content=b"{")) == (400, "malformed")
            # A partner's payload, mapped or not, is 503 too: the partner retries.
            for body in (push, unmappable):
                r = await client.post("/sources/wms", content=body)
                assert reason(r) == (503, "unavailable"), r.text
                assert int(r.headers["Retry-After"]) > 0
        finally:
            nats_server.start()
        with anyio.fail_after(30):
            while True:
                r = await client.post("/events/sku/SKU-1", content=GOOD, headers={"Idempotency-Key": "k-1"})
                if r.status_code == 202:
                    break
                assert r.status_code == 503, r.text
                await anyio.sleep(0.1)
        assert r.json()["duplicate"] is False
        r2 = await client.post("/events/sku/SKU-1", content=GOOD, headers={"Idempotency-Key": "k-1"})
        assert r2.json() == {"seq": r.json()["seq"], "duplicate": True}
        assert await stream_last(nats_server.url, cfg.streams.events) == 2
        r = await client.post("/sources/wms", content=push)
        assert r.status_code == 202, r.text
        assert r.json()["events"][0]["duplicate"] is False
        assert (await client.post("/sources/wms", content=unmappable)).json()["error"] == "unmapped"
        assert await stream_last(nats_server.url, cfg.streams.events) == 3
        assert await stream_last(nats_server.url, cfg.streams.deadletter) == 1
        assert rp.running


async def test_idempotency_keys_are_forgotten_after_the_ttl(tmp_path: Path, nats_server: NatsServer) -> None:
    """Past `[http] idempotency_ttl` (and the duplicate window) a key is new again: the record expires."""
    from nats.js.errors import KeyNotFoundError

    from router.jetstream.idempotency import entry_key

    sections: dict[str, Any] = {"streams": {"duplicate_window": "1s"}, "http": {"idempotency_ttl": "2s"}}
    async with http_router(tmp_path, nats_server.url, **sections) as (_rp, client, cfg):
        headers = {"Idempotency-Key": "short-lived"}
        first = await client.post("/events/sku/SKU-1", content=GOOD, headers=headers)
        assert first.json()["duplicate"] is False
        nc = await nats.connect(nats_server.url)
        try:
            kv = await nc.jetstream().key_value(f"{cfg.router.consumer}_ingest")
            info = await nc.jsm().stream_info(f"KV_{cfg.router.consumer}_ingest")
            assert info.config.max_age == 2.0
            key = entry_key("http:sku:SKU-1:short-lived")
            assert int((await kv.get(key)).value or b"") == first.json()["seq"]
            with anyio.fail_after(30):
                while True:
                    try:
                        await kv.get(key)
                    except KeyNotFoundError:
                        break
                    await anyio.sleep(0.1)
        finally:
            await nc.close()
        await _window_passed(nats_server.url, cfg.streams.events)
        again = await client.post("/events/sku/SKU-1", content=GOOD, headers=headers)
        assert again.status_code == 202
        assert again.json()["duplicate"] is False
        assert again.json()["seq"] > first.json()["seq"]


async def test_a_batch_sent_again_is_all_duplicates(tmp_path: Path, nats_server: NatsServer) -> None:
    """600 lines (more than one lookup request holds), sent twice: the second time nothing is stored."""
    async with http_router(tmp_path, nats_server.url) as (_rp, client, cfg):
        lines = [json.dumps({"kind": "sku", "key": f"S{i % 50}", "idempotency_key": f"grn-{i}",
                             "event": {"type": "received", "location": "L", "qty": i + 1}}).encode() for i in range(600)]
        body = b"\n".join(lines)
        first = [json.loads(x) for x in (await client.post("/events", content=body)).text.splitlines()]
        assert [a["status"] for a in first] == [202] * 600
        assert not any(a["duplicate"] for a in first)
        last = await stream_last(nats_server.url, cfg.streams.events)
        assert last == 600
        again = [json.loads(x) for x in (await client.post("/events", content=body)).text.splitlines()]
        assert again == [{**a, "duplicate": True} for a in first]
        assert await stream_last(nats_server.url, cfg.streams.events) == last
