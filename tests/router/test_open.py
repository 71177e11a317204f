"""Open exceptions (CONTRACT 5.1): `router.exceptions.open` against the fold of the stream, in-process.

A real nats-server and real SQLite; the expected open set is the fold's (tests/support/oracle.py),
compared entry by entry: the raise's payload as published, `detected_at` aside.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

from router.engine.open_gather import BadFilter, gather_open
from router.engine.open_query import BOARD, BY_RULE
from router.workload import workload
from tests.support.harness import (
    check_against_fold,
    make_config,
    publish_all,
    running_router,
    settle,
    timed_event,
    wait_for,
)
from tests.support.oracle import open_entries, without_detected_at
from tests.support.procs import router_executable

pytestmark = pytest.mark.anyio

DAY_US = 86_400_000_000


def future_workload(seed: int, count: int) -> list[tuple[str, bytes]]:
    """A seeded day a day ahead (no timer fires during the test: the fold predicts every exception)."""
    return list(workload(seed=seed, count=count, bad_share=0.02, now_us=time.time_ns() // 1000 + DAY_US))


async def gather_all(nc: Any, filters: dict[str, Any], limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
    """Every page of a filtered request, and the `total` each page said (all the same)."""
    out: list[dict[str, Any]] = []
    totals = set()
    after = None
    while True:
        req = dict(filters, limit=limit)
        if after:
            req["after"] = after
        reply = await gather_open(nc, req)
        totals.add(reply["total"])
        out += reply["open"]
        after = reply["next"]
        if after is None:
            break
    assert len(totals) == 1, totals
    return out, totals.pop()


def picked(want: list[dict[str, Any]], **filters: str) -> list[dict[str, Any]]:
    return [e for e in want if all(e[k] == v for k, v in filters.items())]


async def test_open_set_equals_the_fold_with_filters_and_paging(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path, router={"partitions": 3}, rules={"max_future_skew": "2d"})
    messages = future_workload(seed=5, count=6000)
    # And a board's worth of low stock at a few dark stores, some of it oversold.
    messages += [
        (f"events.sku.OPEN-{i:03d}", json.dumps({"type": "counted", "location": f"DS-{i % 4}", "on_hand": i % 9 - 2}).encode())
        for i in range(150)
    ]
    async with running_router(cfg) as rt:
        await publish_all(nats_server.url, messages)
        await settle(nats_server.url, cfg, rt)
        exp = await check_against_fold(nats_server.url, cfg)
        want = open_entries(exp)
        assert len(want) > 100, "the workload must leave exceptions open"
        assert {e["kind"] for e in want} == {"sku", "shipment", "campaign"}
        nc = await nats.connect(nats_server.url)
        try:
            resident = sum(len(p.resident) for p in rt.partitions)
            got, total = await gather_all(nc, {})
            assert without_detected_at(got) == want
            assert total == len(want)
            assert all(e["detected_at"].endswith("Z") for e in got)
            reply = await gather_open(nc, {"limit": 3})
            assert (reply["partitions"], reply["partition_count"]) == ([0, 1, 2], 3)
            assert (reply["total"], len(reply["open"])) == (len(want), 3)
            assert reply["next"]

            # Paging in small pages gives the whole, in order.
            paged, _ = await gather_all(nc, {}, limit=7)
            assert paged == got

            # Each filter, and some together.
            some = want[len(want) // 2]
            cases: list[dict[str, str]] = [
                {"kind": "sku"}, {"kind": "shipment"}, {"rule": "low_stock"}, {"severity": "critical"},
                {"key": some["key"]}, {"kind": some["kind"], "key": some["key"], "rule": some["rule"]},
                {"kind": "sku", "severity": "warning"}, {"rule": "sla_breached"},
            ]
            locs = [e["location"] for e in want if e["location"]]
            assert locs
            cases.append({"location": locs[0]})
            cases.append({"kind": "sku", "location": locs[-1], "severity": "critical"})
            for f in cases:
                got_f, total_f = await gather_all(nc, f, limit=5)
                assert without_detected_at(got_f) == picked(want, **f), f
                assert total_f == len(picked(want, **f)), f
            # A query loads no actor.
            assert sum(len(p.resident) for p in rt.partitions) == resident

            # The counts the page and the metrics show.
            board = await rt.open_counts()
            expect: dict[tuple[Any, ...], int] = {}
            for e in want:
                g = tuple(e[c] for c in BOARD)
                expect[g] = expect.get(g, 0) + 1
            assert board == expect
            by_rule = await rt.open_counts(BY_RULE)
            assert sum(by_rule.values()) == len(want)
            assert by_rule[("sku", "low_stock")] == len(picked(want, kind="sku", rule="low_stock"))
        finally:
            await nc.close()


async def test_bad_requests_get_an_error(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path)
    async with running_router(cfg):
        nc = await nats.connect(nats_server.url)
        try:
            bad: list[tuple[bytes, str]] = [
                (b'{"kindd": "sku"}', "unknown filter 'kindd'"),
                (b'{"kind": "parcel"}', "`kind`: 'parcel' is not a kind"),
                (b'{"rule": "stock_out"}', "`rule`: 'stock_out' is not a rule"),
                (b'{"severity": "info"}', "`severity`: 'info' is not a severity"),
                (b'{"limit": 0}', "`limit`: 0 is outside 1-1000"),
                (b'{"limit": 1001}', "`limit`: 1001 is outside 1-1000"),
                (b'{"limit": "5"}', "`limit`: expected an integer"),
                (b'{"limit": 2.5}', "`limit`: expected an integer"),
                (b'{"key": "a b"}', "`key`: 'a b' is not a key"),
                (b'{"kind": 1}', "`kind`: expected a string"),
                (b'{"after": "!!"}', "`after`: '!!' is not a cursor"),
                (b"[1]", "expected empty or a JSON object"),
                (b"{", "expected empty or a JSON object"),
            ]
            for data, error in bad:
                reply = json.loads((await nc.request("router.exceptions.open", data, timeout=5)).data)
                assert set(reply) == {"error"}, (data, reply)
                assert error in reply["error"], (data, reply)
                with pytest.raises(BadFilter) as raised:
                    await gather_open(nc, data)
                assert str(raised.value) == reply["error"]
            # Empty, and null filters: no filter.
            for data in (b"", b"  ", b"{}", b'{"kind": null, "limit": null}'):
                reply = json.loads((await nc.request("router.exceptions.open", data, timeout=5)).data)
                assert reply == {"open": [], "total": 0, "next": None, "partitions": [0], "partition_count": 1}
        finally:
            await nc.close()


async def test_finished_entities_leave_the_open_set(nats_server: Any, tmp_path: Path) -> None:
    """A delivery or an end takes the entity's raises out, also those no event clears (sla_breached,
    temperature_excursion, cpa_exceeded), and raises after it never come in."""
    cfg = make_config(nats_server.url, tmp_path, snapshots={"every": "1h"})
    now = time.time_ns() // 1000
    hour = 3_600_000_000
    before = [
        timed_event("shipment", "SHP-1", now - 3 * hour, type="booked", promised_by="2099-01-01T00:00:00Z",
                    temp_min=2.0, temp_max=8.0),
        timed_event("shipment", "SHP-1", now - 2 * hour, type="temperature", celsius=12.5),
        timed_event("shipment", "SHP-2", now - 2 * hour, type="booked", promised_by="2020-01-01T00:00:00Z",
                    temp_min=2.0, temp_max=8.0),
        timed_event("shipment", "SHP-2", now - 2 * hour, type="temperature", celsius=20.0),
        timed_event("campaign", "CMP-1", now - hour, type="started", cpa_limit=1.0, budget=50.0),
        timed_event("campaign", "CMP-1", now - hour, type="spend", amount=150.0),
        timed_event("sku", "SKU-1", now - hour, type="counted", location="DS-1", on_hand=0),
    ]
    after = [
        timed_event("shipment", "SHP-1", now - hour, type="delivered"),
        timed_event("shipment", "SHP-1", now - hour // 2, type="temperature", celsius=30.0),
        timed_event("campaign", "CMP-1", now - hour // 2, type="ended"),
        timed_event("campaign", "CMP-1", now - hour // 4, type="spend", amount=500.0),
    ]
    async with running_router(cfg) as rt:
        nc = await nats.connect(nats_server.url)
        try:
            await publish_all(nats_server.url, before)
            await settle(nats_server.url, cfg, rt)
            first = {
                ("campaign", "CMP-1", "budget_exhausted"), ("campaign", "CMP-1", "cpa_exceeded"),
                ("shipment", "SHP-1", "temperature_excursion"), ("shipment", "SHP-2", "temperature_excursion"),
                ("shipment", "SHP-2", "sla_breached"),  # by its timer: promised_by passed
                ("sku", "SKU-1", "low_stock"), ("sku", "SKU-1", "stockout"),
            }

            async def board() -> set[tuple[str, str, str]]:
                return {(e["kind"], e["key"], e["rule"]) for e in (await gather_open(nc))["open"]}

            await wait_for(lambda: _equal(board(), first), what="the first open set")
            # Stored, then finished without being stored again (the overlay of dirty actors answers).
            for p in rt.partitions:
                await p._maybe_snapshot(force=True)
            await publish_all(nats_server.url, after)
            await settle(nats_server.url, cfg, rt)
            exp = await check_against_fold(nats_server.url, cfg)
            want = open_entries(exp)
            assert {(e["kind"], e["key"]) for e in want} == {("shipment", "SHP-2"), ("sku", "SKU-1")}
            reply = await gather_open(nc)
            by_timer = [e for e in reply["open"] if e["id"].rsplit(":", 1)[1].startswith("t")]
            assert [(e["key"], e["rule"], e["seq"]) for e in by_timer] == [("SHP-2", "sla_breached", None)]
            assert without_detected_at([e for e in reply["open"] if e not in by_timer]) == want
            assert reply["total"] == len(want) + 1
            assert await rt.open_counts(BY_RULE) == {("shipment", "temperature_excursion"): 1,
                                                     ("shipment", "sla_breached"): 1,
                                                     ("sku", "low_stock"): 1, ("sku", "stockout"): 1}
            # The states still list them (CONTRACT 5.1: they stay in the state reply).
            state = json.loads((await nc.request("router.state.shipment.SHP-1", b"", timeout=5)).data)
            assert {"rule": "temperature_excursion", "location": None} in state["exceptions"]
        finally:
            await nc.close()
    # Stored: after a clean stop the store alone says the same.
    async with running_router(cfg) as rt:
        nc = await nats.connect(nats_server.url)
        try:
            await wait_for(lambda: all(p.ready.is_set() for p in rt.partitions))
            again = await gather_open(nc)
            assert again["open"] == reply["open"]  # detected_at too: nothing was detected again
            assert sum(len(p.resident) for p in rt.partitions) == 0
        finally:
            await nc.close()


async def test_router_open_prints_a_table_and_json(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path, router={"partitions": 2})
    events = [
        timed_event("sku", "SERUM-VITC-30", type="counted", location="BLR-DS-4", on_hand=0),
        timed_event("sku", "SERUM-VITC-30", type="counted", location="DEL-WH-1", on_hand=3),
        timed_event("shipment", "SHP-1042", type="booked", promised_by="2099-01-01T00:00:00Z", temp_min=2, temp_max=8),
        timed_event("shipment", "SHP-1042", type="temperature", celsius=11.5),
    ]
    async with running_router(cfg) as rt:
        await publish_all(nats_server.url, events)
        await settle(nats_server.url, cfg, rt)

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [router_executable(), "open", "--server", nats_server.url, *argv],
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )

        table = await anyio.to_thread.run_sync(cli)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["SEVERITY", "KIND", "KEY", "RULE", "LOCATION", "VALUE", "THRESHOLD", "DETECTED", "MESSAGE"]
        assert [ln.split()[:5] for ln in lines[1:5]] == [
            ["critical", "shipment", "SHP-1042", "temperature_excursion", "-"],
            ["warning", "sku", "SERUM-VITC-30", "low_stock", "BLR-DS-4"],
            ["warning", "sku", "SERUM-VITC-30", "low_stock", "DEL-WH-1"],
            ["critical", "sku", "SERUM-VITC-30", "stockout", "BLR-DS-4"],
        ]
        assert "SERUM-VITC-30 out of stock at BLR-DS-4 (available 0)" in lines[4]
        assert lines[5] == "4 open (partitions 0-1: all 2 answered)"

        one = await anyio.to_thread.run_sync(cli, "--rule", "low_stock", "--limit", "1", "--json")
        assert one.returncode == 0, one.stderr
        reply = json.loads(one.stdout)
        assert [e["location"] for e in reply["open"]] == ["BLR-DS-4"]
        assert (reply["total"], reply["partitions"], reply["partition_count"]) == (2, [0, 1], 2)
        rest = await anyio.to_thread.run_sync(cli, "--rule", "low_stock", "--after", reply["next"], "--json")
        assert [e["location"] for e in json.loads(rest.stdout)["open"]] == ["DEL-WH-1"]

        bad = await anyio.to_thread.run_sync(cli, "--location", "x" * 129)
        assert bad.returncode == 2
        assert "`location`" in bad.stderr
        away = await anyio.to_thread.run_sync(
            functools.partial(
                subprocess.run, [router_executable(), "open", "--server", "nats://127.0.0.1:9", "--timeout", "1"],
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )
        )
        assert away.returncode == 1
        assert "cannot connect" in away.stderr
    # No router answering: says so within the wait.
    gone = await anyio.to_thread.run_sync(functools.partial(cli, "--timeout", "0.5"))
    assert gone.returncode == 1
    assert "no router answered on router.exceptions.open within 0.5s" in gone.stderr


async def _equal(got: Any, want: Any) -> bool:
    return bool(await got == want)
