"""`router settings import | show | export` against a real nats-server and router."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from router.cli.settings import msg_id, parse_rows
from tests.support.harness import make_config, query_state, running_router, settle, stream_last_seq

ROOT = Path(__file__).resolve().parents[2]
HEADER = "kind,key,location,field,value\n"


def run_process(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("NATS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


# --- the file, checked before anything is published ---------------------------------------


def test_rows_group_per_entity_and_location() -> None:
    groups, errors = parse_rows(
        HEADER
        + "sku,SERUM-30,BLR-DS-4,low_stock_threshold,8\n"
        + "sku,SERUM-30,,low_stock_threshold,2\n"
        + "sku,SERUM-30,,return_spike_ratio,0.5\n"
        + "sku,SERUM-30,BLR-WH-1,low_stock_threshold,\n"
        + "\n"
        + "shipment,SHP-1,,stall_after,90m\n"
        + "campaign,CAMP-1,,cpa_limit,\n"
        + "campaign,CAMP-1,,budget,5000\n"
    )
    assert errors == []
    assert [(g.kind, g.key, g.location, json.loads(g.payload())) for g in groups] == [
        ("sku", "SERUM-30", "BLR-DS-4", {"type": "settings", "location": "BLR-DS-4", "low_stock_threshold": 8}),
        ("sku", "SERUM-30", "", {"type": "settings", "low_stock_threshold": 2, "return_spike_ratio": 0.5}),
        ("sku", "SERUM-30", "BLR-WH-1", {"type": "settings", "location": "BLR-WH-1", "reset": ["low_stock_threshold"]}),
        ("shipment", "SHP-1", "", {"type": "settings", "stall_after": "90m"}),
        ("campaign", "CAMP-1", "", {"type": "settings", "budget": 5000.0, "reset": ["cpa_limit"]}),
    ]
    assert [g.lines for g in groups] == [[2], [3, 4], [5], [7], [8, 9]]


def test_every_bad_row_is_reported_with_its_line() -> None:
    _, errors = parse_rows(
        HEADER
        + "sku,OK-1,,low_stock_threshold,3\n"  # 2: fine
        + "skus,X,,low_stock_threshold,3\n"  # 3
        + "sku,bad key,,low_stock_threshold,3\n"  # 4
        + "shipment,S,HUB,stall_after,1h\n"  # 5
        + "sku,S,,stall_after,1h\n"  # 6
        + "sku,S,,low_stock_threshold,2.5\n"  # 7
        + "sku,S,A,return_spike_ratio,1\n"  # 8: SKU-wide only
        + "shipment,S,,stall_after,0s\n"  # 9: > 0
        + "shipment,S2,,stall_after,90\n"  # 10
        + "campaign,C,,cpa_min_spend,-1\n"  # 11
        + "sku,OK-1,,low_stock_threshold,4\n"  # 12: twice
        + "sku,S,,low_stock_threshold\n"  # 13: 4 columns
        + "campaign,C,,budget,nan\n"  # 14
    )
    lines = [int(e.split(":")[0].removeprefix("line ")) for e in errors]
    assert sorted(lines) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], errors
    text = "\n".join(errors)
    assert "SKU-wide only" in text
    assert "> 0" in text
    assert "already on line 2" in text


@pytest.mark.parametrize("text", ["", "kind,key,field,value\nsku,S,low_stock_threshold,1\n"])
def test_a_bad_header_is_line_1(text: str) -> None:
    groups, errors = parse_rows(text)
    assert groups == []
    assert errors[0].startswith("line 1: ")


def test_message_ids_follow_the_file_and_the_entity() -> None:
    (a, b), _ = parse_rows(HEADER + "sku,S,,low_stock_threshold,1\nsku,S,A,low_stock_threshold,1\n")
    assert msg_id("f1", a) == msg_id("f1", a)
    assert msg_id("f1", a) != msg_id("f1", b)
    assert msg_id("f1", a) != msg_id("f2", a)


# --- against a router -------------------------------------------------------------------


@pytest.mark.anyio
async def test_import_show_export_and_a_second_import_stores_nothing(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    cfg = make_config(url, tmp_path, rules={"shipment": {"carriers": {"SURFACE-CO": "24h"}}})
    rows = [
        ("sku", "SERUM-30", "BLR-DS-4", "low_stock_threshold", "8"),
        ("sku", "SERUM-30", "BLR-WH-1", "low_stock_threshold", "100"),
        ("sku", "SERUM-30", "", "return_spike_min_units", "3"),
        ("shipment", "SHP-1", "", "stall_after", "90m"),
        ("campaign", "CAMP-1", "", "cpa_min_spend", "25.5"),
        ("campaign", "CAMP-1", "", "budget", "5000"),
    ] + [("sku", f"SKU-{i}", "DS", "low_stock_threshold", str(i)) for i in range(200)]
    good = tmp_path / "thresholds.csv"
    with good.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "key", "location", "field", "value"])
        w.writerows(rows)
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "sku,A,,low_stock_threshold,1\nsku,B,X,return_spike_ratio,1\nshipment,C,,stall_after,soon\n")

    async def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return await anyio.to_thread.run_sync(lambda: run_process(*argv, "--server", url))

    async with running_router(cfg) as rt:
        first = await cli("settings", "import", str(good))
        assert first.returncode == 0, first.stderr
        assert "205 settings events" in first.stderr
        assert "205 events stored, 0 already stored" in first.stdout
        last = await stream_last_seq(url, "EVENTS")
        assert last == 205
        again = await cli("settings", "import", str(good))
        assert again.returncode == 0, again.stderr
        assert "0 events stored, 205 already stored" in again.stdout
        refused = await cli("settings", "import", str(bad))
        assert refused.returncode == 2
        assert "2 bad rows; nothing was published" in refused.stderr
        assert "line 3: " in refused.stderr
        assert "line 4: " in refused.stderr
        assert await stream_last_seq(url, "EVENTS") == last
        await settle(url, cfg, rt)

        reply = await query_state(url, "sku", "SERUM-30")
        assert reply["state"]["settings"] == {
            "return_spike_min_units": 3,
            "locations": {"BLR-DS-4": {"low_stock_threshold": 8}, "BLR-WH-1": {"low_stock_threshold": 100}},
        }
        shown = await cli("settings", "show", "sku", "SERUM-30")
        assert shown.returncode == 0, shown.stderr
        assert "return_spike_min_units   3" in shown.stdout
        assert "from entity" in shown.stdout
        assert "BLR-DS-4" in shown.stdout
        assert "set for locations not seen yet" in shown.stdout
        shown = await cli("settings", "show", "shipment", "SHP-1", "--json")
        assert json.loads(shown.stdout) == {
            "settings": {"stall_after": "90m"},
            "effective": {"stall_after": {"value": "90m", "from": "entity"}},
        }
        unseen = await cli("settings", "show", "campaign", "NOPE")
        assert "not seen by the router" in unseen.stdout

        # The pages behind `export`: small ones, each key once, in order.
        nc = await nats.connect(url)
        try:
            listed: list[tuple[str, str]] = []
            after = None
            pages = 0
            while True:
                request = json.dumps({"after": after, "limit": 50}).encode()
                page = json.loads((await nc.request("router.settings.list", request, timeout=5)).data)
                listed += [(item["kind"], item["key"]) for item in page["settings"]]
                pages += 1
                after = page["next"]
                if after is None:
                    break
            bad = json.loads((await nc.request("router.settings.list", b'{"limit": 0}', timeout=5)).data)
        finally:
            await nc.close()
        assert pages >= 4
        assert len(listed) == len(set(listed)) == 203  # SERUM-30, SHP-1, CAMP-1 and 200 SKUs
        assert "error" in bad

        exported = await cli("settings", "export")
        assert exported.returncode == 0, exported.stderr
        got = sorted(tuple(r) for r in csv.reader(io.StringIO(exported.stdout)))
    want = sorted([("kind", "key", "location", "field", "value"), *rows])
    # Numbers come back as the router holds them (a float as a float).
    assert got == sorted(
        (k, key, loc, f, "5000.0" if v == "5000" else v) for k, key, loc, f, v in want
    )


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_100k_row_import_shows_progress_and_is_idempotent(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    path = tmp_path / "big.csv"
    with path.open("w", newline="") as f:
        f.write(HEADER)
        for i in range(50_000):
            f.write(f"sku,SKU-{i},DS-{i % 7},low_stock_threshold,{i % 50}\n")
            f.write(f"sku,SKU-{i},,return_spike_min_units,{i % 20}\n")
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name="EVENTS", subjects=["events.>"])
    finally:
        await nc.close()

    first = await anyio.to_thread.run_sync(lambda: run_process("settings", "import", str(path), "--server", url))
    assert first.returncode == 0, first.stderr
    assert "100,000 rows, 100,000 settings events" in first.stderr
    assert "100,000/100,000 events (100%)" in first.stderr  # progress, a line every 10% off a terminal
    assert first.stderr.count("events (") >= 10
    assert "100,000 events stored, 0 already stored" in first.stdout
    second = await anyio.to_thread.run_sync(lambda: run_process("settings", "import", str(path), "--server", url))
    assert "0 events stored, 100,000 already stored" in second.stdout
    assert await stream_last_seq(url, "EVENTS") == 100_000
