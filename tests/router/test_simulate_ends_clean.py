"""A simulation ends clean: what it opened it closes, so no timer of the demo fires afterwards."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from contracts.decode import DecodeError, decode_event
from router.workload import operations_day
from tests.router.test_timers import ExceptionsTail, VirtualClock, saw_clock, start_us
from tests.support.harness import make_config, running_router, settle

ROOT = Path(__file__).resolve().parents[2]
T0_US = 1_790_000_000_000_000
H = 3_600_000_000


def _open_at_end(items: list[tuple[str, bytes]]) -> tuple[set[str], set[str]]:
    """Shipments booked and not delivered, campaigns started and not ended, in stream order."""
    shipments: set[str] = set()
    campaigns: set[str] = set()
    for subject, data in items:
        try:
            kind, key, event = decode_event(subject, data)
        except DecodeError:
            continue
        etype = type(event).__struct_config__.tag
        if kind == "shipment":
            if etype == "booked":
                shipments.add(key)
            elif etype == "delivered":
                shipments.discard(key)
        elif kind == "campaign":
            if etype == "started":
                campaigns.add(key)
            elif etype == "ended":
                campaigns.discard(key)
    return shipments, campaigns


def test_finish_delivers_every_open_shipment_and_ends_every_campaign() -> None:
    day = operations_day(5, now_us=T0_US, rate=500, bad_share=0.02)
    items = list(day.run(6000))
    shipments, campaigns = _open_at_end(items)
    assert len(shipments) > 100  # a 12 s day: most shipments are still under way
    assert {"SHP-DEMO-STUCK", "SHP-DEMO-DELAY"} <= shipments
    assert len(campaigns) >= 3
    closing = day.finish()
    assert _open_at_end(items + closing) == (set(), set())
    assert len(closing) == len(shipments) + len(campaigns)
    times = [dt.datetime.fromisoformat(msgspec.json.decode(d)["ts"]) for _, d in closing]
    assert times == sorted(times)
    last = dt.datetime.fromtimestamp((T0_US + 6000 * 2000) / 1e6, dt.UTC)  # 6000 at 500/s
    assert times[0] >= last  # after everything the day sent
    assert list(day.run(10)) == []  # a finished day sends nothing more
    # Deterministic like the rest of the day.
    again = operations_day(5, now_us=T0_US, rate=500, bad_share=0.02)
    assert list(again.run(6000)) == items
    assert again.finish() == closing


def test_forgotten_shipments_are_delivered_too() -> None:
    """Stuck shipments leave the day's count after their promise, but the router still holds their timers."""
    day = operations_day(1, now_us=T0_US, rate=20, shipments=50)
    items = list(day.run(20 * 400))  # 400 s: the stuck demo shipment is forgotten at 75 s
    assert "SHP-DEMO-STUCK" not in day.shipments
    shipments, _ = _open_at_end(items)
    assert "SHP-DEMO-STUCK" in shipments
    assert _open_at_end(items + day.finish())[0] == set()


@pytest.mark.anyio
async def test_after_router_simulate_no_timer_fires_hours_later(nats_server: Any, tmp_path: Path) -> None:
    """`router simulate --duration 2` against a router on a virtual clock; then seven hours pass.

    Before, its shipments were never delivered: each breached its promise a few minutes
    later and stalled six hours later. Now nothing more is published once it ended.
    """
    url = nats_server.url
    clock = VirtualClock(start_us())
    cfg = make_config(url, tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("NATS_URL", None)
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        started = time.time_ns() // 1000
        done = await anyio.run_process(
            [sys.executable, "-m", "router.cli", "simulate", "--server", url, "--rate", "2000",
             "--duration", "2", "--seed", "3", "--progress", "0", "--linger", "0"],
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert "shipments under way delivered" in done.stderr.decode()
        await settle(url, cfg, rt)
        # Whatever the scripted incidents raised so far stays; the clock catches up with the
        # wall clock (the router's clock stood still while the simulation ran), then 7 hours pass.
        clock.advance_to(max(clock(), time.time_ns() // 1000))
        await saw_clock(rt, clock)
        before = [e["id"] for e in await tail.poll()]
        clock.advance_to(started + 7 * H)
        await saw_clock(rt, clock)
        later = (await tail.poll())[len(before) :]
        assert later == [], json.dumps(later[:5], indent=1)
