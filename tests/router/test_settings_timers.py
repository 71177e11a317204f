"""`stall_after` per carrier and per shipment, with a virtual wall clock (CONTRACT 2.4, 3 Timers)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from contracts.times import rfc3339
from tests.router.test_timers import ExceptionsTail, VirtualClock, saw_clock, start_us
from tests.support.harness import make_config, publish_all, query_state, running_router, settle

pytestmark = pytest.mark.anyio

MS = 1_000
MIN = 60_000_000
H = 60 * MIN


def ship(key: str, type_: str, ts_us: int, **fields: Any) -> tuple[str, bytes]:
    return f"events.shipment.{key}", json.dumps({"type": type_, "ts": rfc3339(ts_us), **fields}).encode()


def stalled(key: str, deadline_us: int) -> str:
    return f"shipment:{key}:stalled::raised:t{deadline_us // MS}"


async def test_carrier_and_shipment_stall_after_fire_on_time(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = make_config(
        url, tmp_path, rules={"shipment": {"stall_after": "6h", "carriers": {"SURFACE-CO": "24h", "EXPRESS": "2h"}}}
    )
    far = rfc3339(v0 + 100 * H)
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        msgs = []
        for key, carrier in (("S-SURF", "SURFACE-CO"), ("S-EXP", "EXPRESS"), ("S-OWN", "SURFACE-CO"),
                             ("S-MOVE", "SURFACE-CO"), ("S-NONE", "surface-co")):
            msgs += [ship(key, "booked", v0, promised_by=far, carrier=carrier), ship(key, "picked_up", v0)]
        msgs.append(ship("S-OWN", "settings", v0, stall_after="30m"))
        await publish_all(url, msgs)
        await settle(url, cfg, rt)
        surf = await query_state(url, "shipment", "S-SURF")
        assert surf["state"]["effective"] == {"stall_after": {"value": "24h", "from": "carrier"}}

        clock.advance_to(v0 + 30 * MIN - MS)
        await saw_clock(rt, clock)
        assert await tail.poll() == []
        clock.advance_to(v0 + 30 * MIN)
        await tail.wait_for(stalled("S-OWN", v0 + 30 * MIN))

        # An hour in, S-MOVE's stall_after becomes 45m: the new deadline is already past and
        # fires through the timer path, with its own id.
        clock.advance_to(v0 + H)
        await publish_all(url, [ship("S-MOVE", "settings", v0 + H, stall_after="45m")])
        await settle(url, cfg, rt)
        await tail.wait_for(stalled("S-MOVE", v0 + 45 * MIN))

        clock.advance_to(v0 + 2 * H)
        await tail.wait_for(stalled("S-EXP", v0 + 2 * H))
        # The config's 6h holds for a carrier no key matches (case-sensitive), and for no other.
        clock.advance_to(v0 + 6 * H)
        await tail.wait_for(stalled("S-NONE", v0 + 6 * H))
        clock.advance_to(v0 + 24 * H - MS)
        await saw_clock(rt, clock)
        assert stalled("S-SURF", v0 + 24 * H) not in tail.ids()
        clock.advance_to(v0 + 24 * H)
        await tail.wait_for(stalled("S-SURF", v0 + 24 * H))
        clock.advance_to(v0 + 30 * H)
        await saw_clock(rt, clock)
    assert tail.ids() == Counter(
        {
            stalled("S-OWN", v0 + 30 * MIN): 1,
            stalled("S-MOVE", v0 + 45 * MIN): 1,
            stalled("S-EXP", v0 + 2 * H): 1,
            stalled("S-NONE", v0 + 6 * H): 1,
            stalled("S-SURF", v0 + 24 * H): 1,
        }
    )
