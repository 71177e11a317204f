"""Durable timers end to end, in process, with a virtual wall clock: `stalled` and `sla_breached` by deadline.

The router gets a clock the test moves by hand, so hours pass at once and no test sleeps
through a deadline. Everything else is real: nats-server, SQLite, pull requests expiring
(a timer due at D fires only once the partition has seen the stream up to D, which takes a
pull request sent after the clock moved: under a second of real time).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.js.errors import NotFoundError

import actors
from actors import Thresholds
from contracts.config import Config
from contracts.times import rfc3339
from router.engine import timers as timers_mod
from router.engine.daemon import Runtime
from router.engine.deps import PartitionDeps
from router.engine.partition import PULL_EXPIRES_NS, Partition
from router.jetstream.publisher import Publisher
from tests.support.harness import make_config, publish_all, query_state, running_router, settle, wait_for
from tests.support.oracle import read_stream
from tests.support.stored import load_actor

pytestmark = pytest.mark.anyio

MS = 1_000
MIN = 60_000_000
H = 3_600_000_000


class VirtualClock:
    """Wall-clock epoch microseconds that move only when the test moves them."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us

    def advance_to(self, us: int) -> None:
        assert us >= self.now_us, "the wall clock only moves forward here"
        self.now_us = us


def start_us() -> int:
    """Now, in whole milliseconds: JetStream timestamps and the virtual clock start together."""
    return time.time_ns() // 1_000_000 * MS


def ship(key: str, type_: str, ts_us: int, **fields: Any) -> tuple[str, bytes]:
    return f"events.shipment.{key}", json.dumps({"type": type_, "ts": rfc3339(ts_us), **fields}).encode()


def booked(key: str, ts_us: int, promised_us: int) -> tuple[str, bytes]:
    return ship(key, "booked", ts_us, promised_by=rfc3339(promised_us))


def stalled_id(key: str, cause: int | str) -> str:
    status = "cleared" if isinstance(cause, int) else "raised"
    return f"shipment:{key}:stalled::{status}:{cause}"


def timer(deadline_us: int) -> str:
    return f"t{deadline_us // MS}"


def config(url: str, data: Path, **sections: Any) -> Config:
    rules = sections.setdefault("rules", {"shipment": {"stall_after": "1h"}})
    # The virtual clock runs hours ahead of the stream's, and events carry its times.
    rules.setdefault("max_future_skew", "30d")
    return make_config(url, data, **sections)


class ExceptionsTail:
    """Reads EXCEPTIONS from sequence 1 on, as it grows (stream gets: exact, no subscription)."""

    def __init__(self, url: str, stream: str = "EXCEPTIONS") -> None:
        self.url = url
        self.stream = stream
        self.seen: list[dict[str, Any]] = []

    async def __aenter__(self) -> ExceptionsTail:
        self.nc = await nats.connect(self.url)
        self.jsm = self.nc.jsm()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def poll(self) -> list[dict[str, Any]]:
        while True:
            try:
                m = await self.jsm.get_msg(self.stream, len(self.seen) + 1)
            except NotFoundError:
                return self.seen
            self.seen.append(json.loads(m.data))

    async def wait_for(self, exc_id: str, within: float = 10.0) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        async def seen() -> bool:
            found[:] = [e for e in await self.poll() if e["id"] == exc_id]
            return bool(found)

        try:
            await wait_for(seen, within)
        except TimeoutError:
            raise AssertionError(f"{exc_id} not published; got {[e['id'] for e in self.seen]}") from None
        return found[0]

    def ids(self) -> Counter[str]:
        return Counter(e["id"] for e in self.seen)


async def saw_clock(rt: Runtime, clock: VirtualClock) -> None:
    """Until every partition has seen the stream up to the clock's now and fired every timer due
    by then, and the stream has confirmed what those firings published."""
    now = clock()
    await wait_for(
        lambda: all(p.timers.fired_through_us >= now for p in rt.partitions) and rt.publisher.outstanding == 0,
        10.0,
    )


async def stream_ids(url: str) -> Counter[str]:
    return Counter(json.loads(m.data)["id"] for m in await read_stream(url, "EXCEPTIONS"))


async def test_stall_raises_clears_with_the_event_seq_stalls_again_then_breaches(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(url, tmp_path)
    promised = v0 + 5 * H + 123_456  # microseconds: the id floors them to milliseconds
    moved = v0 + MIN
    d1 = moved + H
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        await publish_all(url, [booked("S1", v0, promised), ship("S1", "picked_up", moved)])
        await settle(url, cfg, rt)

        clock.advance_to(d1 - MS)  # a millisecond early: nothing yet
        await saw_clock(rt, clock)
        assert [e["rule"] for e in await tail.poll()] == []

        clock.advance_to(d1)
        raised = await tail.wait_for(stalled_id("S1", timer(d1)))
        assert raised["seq"] is None
        assert raised["event_ts"] == rfc3339(d1)
        assert (raised["kind"], raised["key"], raised["rule"]) == ("shipment", "S1", "stalled")
        assert (raised["status"], raised["severity"], raised["location"]) == ("raised", "warning", None)
        assert raised["value"] is None
        assert raised["threshold"] is None
        assert raised["detected_at"] == rfc3339(d1)
        state = await query_state(url, "shipment", "S1")
        assert state["exceptions"] == [{"rule": "stalled", "location": None}]

        # A movement clears it; the clear is caused by that event and carries its sequence.
        moved2 = d1 + 10 * MIN
        await publish_all(url, [ship("S1", "in_transit", moved2)])
        await settle(url, cfg, rt)
        seq = (await query_state(url, "shipment", "S1"))["seq"]
        cleared = await tail.wait_for(stalled_id("S1", seq))
        assert cleared["seq"] == seq
        assert cleared["event_ts"] == rfc3339(moved2)
        assert (await query_state(url, "shipment", "S1"))["exceptions"] == []

        # The new last_movement stalls again, under a new id.
        d2 = moved2 + H
        clock.advance_to(d2)
        await tail.wait_for(stalled_id("S1", timer(d2)))

        clock.advance_to(promised)
        breach = await tail.wait_for(f"shipment:S1:sla_breached::raised:{timer(promised)}")
        assert breach["seq"] is None
        assert breach["severity"] == "critical"
        assert breach["event_ts"] == rfc3339(promised)
        state = await query_state(url, "shipment", "S1")
        assert state["exceptions"] == [
            {"rule": "sla_breached", "location": None},
            {"rule": "stalled", "location": None},
        ]

        # However far the clock goes now, nothing more is due.
        clock.advance_to(promised + 48 * H)
        await saw_clock(rt, clock)
    assert await stream_ids(url) == Counter(
        {
            stalled_id("S1", timer(d1)): 1,
            stalled_id("S1", seq): 1,
            stalled_id("S1", timer(d2)): 1,
            f"shipment:S1:sla_breached::raised:{timer(promised)}": 1,
        }
    )


async def test_delivered_in_time_cancels_the_breach_and_clears_a_stall(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(url, tmp_path)
    promised = v0 + 3 * H
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        await publish_all(
            url,
            [
                booked("ON-TIME", v0, promised),
                ship("ON-TIME", "picked_up", v0),
                booked("LATE", v0, promised),  # same deadline: the control
                booked("ONLY-BOOKED", v0, promised + H),
            ],
        )
        await settle(url, cfg, rt)
        clock.advance_to(v0 + H)
        await tail.wait_for(stalled_id("ON-TIME", timer(v0 + H)))

        await publish_all(url, [ship("ON-TIME", "delivered", v0 + 2 * H)])
        await settle(url, cfg, rt)
        seq = (await query_state(url, "shipment", "ON-TIME"))["seq"]
        await tail.wait_for(stalled_id("ON-TIME", seq))  # delivered leaves the moving statuses

        clock.advance_to(promised)
        await tail.wait_for(f"shipment:LATE:sla_breached::raised:{timer(promised)}")
        # `booked` alone never stalls: nothing moved.
        clock.advance_to(promised + H)
        await tail.wait_for(f"shipment:ONLY-BOOKED:sla_breached::raised:{timer(promised + H)}")
        on_time = await query_state(url, "shipment", "ON-TIME")
        assert on_time["state"]["status"] == "delivered"
        assert on_time["exceptions"] == []
    assert await stream_ids(url) == Counter(
        {
            stalled_id("ON-TIME", timer(v0 + H)): 1,
            stalled_id("ON-TIME", seq): 1,
            f"shipment:LATE:sla_breached::raised:{timer(promised)}": 1,
            f"shipment:ONLY-BOOKED:sla_breached::raised:{timer(promised + H)}": 1,
        }
    )


async def test_a_backlog_delivered_before_the_deadline_cancels_the_breach_though_applied_after(
    nats_server: Any, tmp_path: Path
) -> None:
    """The router is down across D; `delivered` reached the stream before D, behind a backlog
    of several pull batches. The breach timer must wait for all of it, then find nothing to do."""
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(url, tmp_path, router={"fetch_batch": 500})
    promised = v0 + H
    async with running_router(cfg, clock) as rt:
        await publish_all(url, [booked("S", v0, promised), booked("CONTROL", v0, promised)])
        await settle(url, cfg, rt)
    filler = [
        (f"events.sku.F{i % 50}", json.dumps({"type": "received", "location": "W", "qty": 100}).encode())
        for i in range(3000)
    ]
    await publish_all(url, [*filler, ship("S", "delivered", v0 + 10 * MIN)])
    clock.advance_to(promised + MIN)  # the router comes back after D
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        await tail.wait_for(f"shipment:CONTROL:sla_breached::raised:{timer(promised)}")
        await settle(url, cfg, rt)
        state = await query_state(url, "shipment", "S")
        assert state["state"]["status"] == "delivered"
        assert state["exceptions"] == []
    assert [i for i in await stream_ids(url) if ":S:" in i] == []


async def test_timers_of_actors_not_in_memory_fire_once_each(
    nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 deadlines, a resident cap of 100, and a heap that takes 40 rows per load: each
    timer waits in SQLite, its actor is loaded to fire it, and all fire at once when due."""
    monkeypatch.setattr(timers_mod, "HORIZON_ROWS", 40)
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(url, tmp_path, snapshots={"resident_actors": 100})
    keys = [f"N{i:03d}" for i in range(300)]
    # Half the deadlines fall inside the 60 s horizon (set into the heap on apply), half beyond it.
    deadline = {k: v0 + (30_000_000 if i % 2 else 2 * H) + i * MS for i, k in enumerate(keys)}
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        await publish_all(url, [booked(k, v0, deadline[k]) for k in keys])
        await publish_all(
            url, [(f"events.sku.E{i}", b'{"type":"received","location":"W","qty":100}') for i in range(300)]
        )
        await settle(url, cfg, rt)
        await wait_for(lambda: len(rt.partitions[0].resident) <= 150, 10.0)
        assert sum(1 for k in rt.partitions[0].resident if k[0] == "shipment") < 150
        clock.advance_to(v0 + 3 * H)
        want = {f"shipment:{k}:sla_breached::raised:{timer(d)}" for k, d in deadline.items()}

        async def check() -> bool:
            await tail.poll()
            return want <= set(tail.ids())

        await wait_for(check, 15.0)
        await saw_clock(rt, clock)
    assert await stream_ids(url) == Counter(dict.fromkeys(want, 1))


async def test_deadlines_that_pass_while_stopped_fire_once_after_start(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(url, tmp_path)
    promised = v0 + 2 * H
    async with running_router(cfg, clock) as rt:
        await publish_all(url, [booked("R", v0, promised), ship("R", "in_transit", v0)])
        await settle(url, cfg, rt)
    clock.advance_to(promised + 30 * MIN)  # both deadlines pass while no router runs
    want = Counter(
        {stalled_id("R", timer(v0 + H)): 1, f"shipment:R:sla_breached::raised:{timer(promised)}": 1}
    )
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        for i in want:
            await tail.wait_for(i)
        stall = next(e for e in tail.seen if e["rule"] == "stalled")
        assert stall["event_ts"] == rfc3339(v0 + H)
        assert stall["detected_at"] == rfc3339(clock())
        await saw_clock(rt, clock)
    # Started again (and again later): nothing fires twice.
    for later in (promised + H, promised + 30 * H):
        clock.advance_to(later)
        async with running_router(cfg, clock) as rt:
            await saw_clock(rt, clock)
    assert await stream_ids(url) == want
    async with running_router(cfg, clock) as rt:
        await publish_all(url, [ship("R", "out_for_delivery", promised + 31 * H)])
        await settle(url, cfg, rt)
        state = await query_state(url, "shipment", "R")
        assert state["exceptions"] == [{"rule": "sla_breached", "location": None}]  # the stall cleared
    ids = await stream_ids(url)
    assert sum(1 for i in ids if ":stalled::cleared:" in i) == 1


@asynccontextmanager
async def crashing_router(cfg: Config, clock: Callable[[], int]) -> AsyncIterator[Runtime]:
    """The router in process, stopped by cancellation: no drain, no final snapshot (like SIGKILL)."""
    async with Runtime.open(cfg, clock) as rt, anyio.create_task_group() as tg:
        await tg.start(rt.serve)
        yield rt
        tg.cancel_scope.cancel()


async def test_a_firing_published_before_a_crash_is_not_published_again(
    nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer fired and its exception reached the stream, but the fired state never reached
    SQLite. After the restart the timer is due again: the router finds the exception already
    in EXCEPTIONS and does not send it again (so the stream's duplicate window, short here, is
    not what keeps it from being published twice)."""
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(
        url,
        tmp_path,
        snapshots={"every": "1h", "every_events": 1_000_000},
        streams={"duplicate_window": "100ms"},
    )
    d = v0 + H
    sent: list[str] = []  # Nats-Msg-Id of every publish the routers send
    publish = Publisher.publish

    async def recorded(
        self: Publisher, subject: str, payload: bytes, headers: dict[str, str], done: Any, **kw: Any
    ) -> None:
        sent.append(headers["Nats-Msg-Id"])
        await publish(self, subject, payload, headers, done, **kw)

    monkeypatch.setattr(Publisher, "publish", recorded)
    skip_store = monkeypatch.context()
    with skip_store as m:

        async def nothing(self: Partition) -> None:
            return None

        m.setattr(Partition, "_write_fired", nothing)
        async with ExceptionsTail(url) as tail, crashing_router(cfg, clock) as rt:
            await publish_all(url, [booked("K", v0, v0 + 9 * H), ship("K", "picked_up", v0)])
            await settle(url, cfg, rt)
            await rt.partitions[0]._maybe_snapshot(force=True)  # stored before the firing
            clock.advance_to(d)
            await tail.wait_for(stalled_id("K", timer(d)))
            # Confirmed: from here an unpatched router would store the fired state.
            await wait_for(lambda: rt.publisher.outstanding == 0, 5.0)
    stored = await _stored_state(cfg, "shipment", "K")
    assert stored is not None
    assert not stored.stalled, "the test needs the fired state unstored"
    assert sent.count(stalled_id("K", timer(d))) == 1
    clock.advance_to(d + MIN)
    async with running_router(cfg, clock) as rt:
        await saw_clock(rt, clock)
        state = await query_state(url, "shipment", "K")
        assert state["exceptions"] == [{"rule": "stalled", "location": None}]
        await publish_all(url, [ship("K", "in_transit", d + MIN)])
        await settle(url, cfg, rt)
        seq = (await query_state(url, "shipment", "K"))["seq"]
    assert sent.count(stalled_id("K", timer(d))) == 1, "sent again after the restart"
    assert await stream_ids(url) == Counter({stalled_id("K", timer(d)): 1, stalled_id("K", seq): 1})


async def _stored_state(cfg: Config, kind: str, key: str) -> Any:
    from snapshots import Store

    store = await Store.open(cfg.snapshot_path)
    try:
        row = await load_actor(store, kind, key)
    finally:
        await store.close()
    return None if row is None else actors.decode_state(kind, row[1])


async def test_the_stored_firing_is_the_state_right_after_it(
    nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event applied between a firing and its PubAck is not in what is stored for the firing:
    the partition's marks do not cover it yet, and a restart must apply it again (here: the clear)."""
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(url, tmp_path, snapshots={"every": "1h", "every_events": 1_000_000})
    d = v0 + H
    held: list[Callable[[], None]] = []
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        publish = rt.publisher.publish

        async def late_pubacks(
            subject: str, payload: bytes, headers: dict[str, str], done: Any, **kw: Any
        ) -> None:
            if done is not None and ":raised:t" in headers.get("Nats-Msg-Id", ""):
                held.append(done)
                done = None
            await publish(subject, payload, headers, done, **kw)

        monkeypatch.setattr(rt.publisher, "publish", late_pubacks)
        await publish_all(url, [booked("Y", v0, v0 + 9 * H), ship("Y", "picked_up", v0)])
        await settle(url, cfg, rt)
        before = (await query_state(url, "shipment", "Y"))["seq"]
        clock.advance_to(d)
        await tail.wait_for(stalled_id("Y", timer(d)))
        await publish_all(url, [ship("Y", "in_transit", d + MIN)])
        await settle(url, cfg, rt)
        after = (await query_state(url, "shipment", "Y"))["seq"]
        await tail.wait_for(stalled_id("Y", after))
        assert len(held) == 1
        held[0]()  # the firing's PubAck arrives now
        p = rt.partitions[0]
        await wait_for(lambda: not p.timers.unconfirmed, 5.0)
        row = await load_actor(rt.store, "shipment", "Y")
        assert row is not None
        stored = actors.decode_state("shipment", row[1])
        assert row[0] == stored.seq == before
        assert stored.stalled
        assert stored.stall_at is None


async def test_caught_up_counts_from_when_the_pull_request_was_sent(tmp_path: Path) -> None:
    """A 408 read at time P says the server had nothing more when the request expired, which is
    PULL_EXPIRES after it was sent at the earliest: events stored between then and P may still be
    on their way, so they must not count as seen."""
    cfg = make_config("nats://127.0.0.1:4222", tmp_path)
    clock = VirtualClock(1_800_000_000_000_000)
    deps = PartitionDeps(
        cfg=cfg,
        nc=None,  # type: ignore[arg-type]
        jsm=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        publisher=None,  # type: ignore[arg-type]
        thresholds=Thresholds.from_rules(cfg.rules),
        now_us=clock,
        raw_path=lambda sub, handler: None,
        horizon_us=0,
        snapshot_every_s=1.0,
    )
    p = Partition(deps, 0)
    p.pulls.requests["in.1"] = 10
    p.pulls.sent["in.1"] = clock()
    clock.advance_to(clock() + 5_000_000)  # read five seconds later
    p._on_status({"Status": "408", "Description": "Request Timeout"}, b"", "in.1")
    assert p.caught_up_us == clock() - 5_000_000 + PULL_EXPIRES_NS // 1000
    assert "in.1" not in p.pulls.requests
    assert not p.pulls.sent
    p._on_status({"Status": "408"}, b"", "in.unknown")  # not ours (any more): says nothing
    assert p.caught_up_us == clock() - 5_000_000 + PULL_EXPIRES_NS // 1000


async def test_a_far_timer_set_since_the_last_snapshot_still_fires(nats_server: Any, tmp_path: Path) -> None:
    """A deadline beyond the in-memory horizon, set after the last snapshot, lives only in memory
    until the next one: looking further ahead must find it there (no snapshot is forced)."""
    url = nats_server.url
    v0 = start_us()
    clock = VirtualClock(v0)
    cfg = config(url, tmp_path, snapshots={"every": "1h", "every_events": 1_000_000})
    d = v0 + H
    async with ExceptionsTail(url) as tail, running_router(cfg, clock) as rt:
        await publish_all(url, [booked("F", v0, v0 + 9 * H), ship("F", "picked_up", v0)])
        await settle(url, cfg, rt)
        assert not await _stored_state(cfg, "shipment", "F"), "the test needs the timer only in memory"
        clock.advance_to(d)
        await tail.wait_for(stalled_id("F", timer(d)))
