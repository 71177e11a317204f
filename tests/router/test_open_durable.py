"""Open exceptions stay exact (CONTRACT 5.1): across SIGKILLs and a nats-server restart, after a store
rebuilt from the stream, and once EXCEPTIONS no longer holds the raises (retention).

Every check compares `router.exceptions.open`, gathered over every partition, with the fold of
EVENTS (tests/support/oracle.py): the same ids and payloads, `detected_at` aside. After each
SIGKILL the store itself is read: its open set must be exactly the raises its actor states
hold (the index is written in the actors' own transaction, so a crash never splits them).
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

import actors
from contracts.times import rfc3339
from router.engine.open_gather import gather_open
from router.workload import workload
from tests.support.harness import make_config, publish_all, running_router, settle, wait_for
from tests.support.oracle import Expected, fold, open_entries, read_stream, without_detected_at
from tests.support.procs import health, router_process, settle_process, wait_healthy, write_config

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DAY_US = 86_400_000_000


def messages(seed: int, count: int) -> list[tuple[str, bytes]]:
    """A seeded day a day ahead (no timer fires: the fold predicts every raise), and a board of low
    stock at four dark stores."""
    day = list(workload(seed=seed, count=count, bad_share=0.02, now_us=time.time_ns() // 1000 + DAY_US))
    board = [
        (f"events.sku.OPEN-{i:03d}", json.dumps({"type": "counted", "location": f"DS-{i % 4}", "on_hand": i % 9}).encode())
        for i in range(120)
    ] + [  # some oversold
        (f"events.sku.OPEN-{i:03d}", json.dumps({"type": "ordered", "location": f"DS-{i % 4}", "qty": 3, "order_id": f"O{i}"}).encode())
        for i in range(0, 120, 5)
    ]
    raising, finishing = finished_entities(30)
    third = len(day) // 3
    return board[:80] + raising + day[:third] + finishing[:30] + day[third:] + board[80:] + finishing[30:]


def finished_entities(n: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Shipments too warm, then delivered late (sla_breached raised by the delivery itself), and
    campaigns over their CPA, then ended: raises that leave the open set when the entity finishes."""
    now = time.time_ns() // 1000
    hour = 3_600_000_000

    def ev(subject: str, ts_us: int, **payload: Any) -> tuple[str, bytes]:
        return subject, json.dumps(dict(payload, ts=rfc3339(ts_us))).encode()

    raising: list[tuple[str, bytes]] = []
    finishing: list[tuple[str, bytes]] = []
    for i in range(n):
        shp, cmp = f"events.shipment.FIN-{i:03d}", f"events.campaign.FIN-{i:03d}"
        raising += [
            ev(shp, now, type="booked", promised_by=rfc3339(now + 2 * hour), temp_min=2.0, temp_max=8.0),
            ev(shp, now, type="temperature", celsius=20.0),
            ev(cmp, now, type="started", cpa_limit=1.0),
            ev(cmp, now, type="spend", amount=150.0),
        ]
        finishing += [ev(shp, now + 3 * hour, type="delivered"), ev(cmp, now, type="ended")]
    return raising, finishing


async def expected(url: str, cfg: Any) -> Expected:
    from actors import Thresholds
    from contracts.config import duration_us

    return fold(await read_stream(url, cfg.streams.events), Thresholds.from_rules(cfg.rules),
                duration_us(cfg.rules.max_future_skew))


async def open_set(url: str) -> list[dict[str, Any]]:
    """Every open exception, gathered page by page (pages of 1000)."""
    nc = await nats.connect(url)
    try:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            reply = await gather_open(nc, {"limit": 1000, **({"after": after} if after else {})}, wait_s=10)
            out += reply["open"]
            after = reply["next"]
            if after is None:
                return out
    finally:
        await nc.close()


def stored_open_agrees(db: Path) -> int:
    """The store's open set is exactly the raises of its stored, unfinished actor states; returns its size."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        raised: set[tuple[str, str, str, str]] = set()
        for kind, key, blob in con.execute("SELECT kind, key, state FROM actors"):
            st = actors.decode_state(kind, blob)
            if (kind == "shipment" and st.status == "delivered") or (kind == "campaign" and st.ended):
                continue
            raised |= {(kind, key, r["rule"], r["location"] or "") for r in actors.raised(kind, st)}
        index = {}
        for kind, key, rule, loc, payload in con.execute(
            "SELECT kind, key, rule, location, payload FROM open_exceptions"
        ):
            p = json.loads(payload)
            assert (p["kind"], p["key"], p["rule"], p["location"] or "", p["status"]) == (kind, key, rule, loc, "raised")
            index[(kind, key, rule, loc)] = p
    finally:
        con.close()
    assert set(index) == raised, (
        f"stored open set and stored states differ: only in the index {sorted(set(index) - raised)[:5]}, "
        f"only in the states {sorted(raised - set(index))[:5]}"
    )
    return len(index)


async def test_exact_across_sigkills_and_a_nats_server_restart(nats_server: Any, tmp_path: Path) -> None:
    rng = random.Random(21)
    cfg = write_config(tmp_path / "config.toml", nats_server.url, router={"partitions": 2})
    db = tmp_path / "data" / "router.db"
    msgs = messages(seed=8, count=16_000)
    chunk = 400
    steps = sorted(rng.sample(range(2, len(msgs) // chunk - 2), 5))
    nats_step = steps[2]
    checked: list[int] = []
    with router_process(tmp_path / "config.toml") as rp:
        try:
            await wait_healthy(nats_server.url, rp)
            nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            try:
                for i in range(0, len(msgs), chunk):
                    for subject, data in msgs[i : i + chunk]:
                        await nc.publish(subject, data)
                    await nc.flush(timeout=10)
                    step = i // chunk
                    if step == nats_step:
                        await anyio.to_thread.run_sync(nats_server.stop)
                        await anyio.sleep(1.0)
                        await anyio.to_thread.run_sync(nats_server.start)
                        await wait_healthy(nats_server.url, rp, timeout=30)
                    elif step in steps:
                        await anyio.sleep(rng.uniform(0.0, 0.4))  # somewhere in its work on this chunk
                        rp.kill()
                        checked.append(await anyio.to_thread.run_sync(stored_open_agrees, db))
                        rp.start()
                        await wait_healthy(nats_server.url, rp)
                    await anyio.sleep(0.03)
            finally:
                await nc.close()
            await settle_process(nats_server.url, cfg, rp, timeout=90)
            exp = await expected(nats_server.url, cfg)
            want = open_entries(exp)
            got = await open_set(nats_server.url)
            assert without_detected_at(got) == want
            assert len(want) > 60

            # Killed with nothing to do: the store alone (and the replay after its last snapshot) answers.
            rp.kill()
            assert await anyio.to_thread.run_sync(stored_open_agrees, db) > 0
            rp.start()
            await wait_healthy(nats_server.url, rp)
            await settle_process(nats_server.url, cfg, rp, timeout=60)
            again = await open_set(nats_server.url)
            assert without_detected_at(again) == want
        except BaseException:
            print(rp.tail(60))
            raise
    assert rp.kills == len(steps)  # the nats-server restart's step kills nothing; the last kill is extra
    assert checked, "the store was read after every kill"
    print(f"open set {len(want)} entries; stored open set sizes at the kills {checked}")


async def test_exact_after_a_rebuild_and_beyond_the_exceptions_retention(nats_server: Any, tmp_path: Path) -> None:
    cfg = make_config(nats_server.url, tmp_path, rules={"max_future_skew": "2d"}, router={"partitions": 2})
    msgs = messages(seed=9, count=5_000)
    async with running_router(cfg) as rt:
        await publish_all(nats_server.url, msgs)
        await settle(nats_server.url, cfg, rt)
        before = await open_set(nats_server.url)
    want = open_entries(await expected(nats_server.url, cfg))
    assert without_detected_at(before) == want
    assert len(want) > 60

    # Rebuilt from the stream: the store moved aside, every event applied again (nothing republished).
    folder = tmp_path / "aside"
    folder.mkdir()
    for f in tmp_path.glob("router.db*"):
        shutil.move(f, folder / f.name)
    async with running_router(cfg) as rt:
        await settle(nats_server.url, cfg, rt)
        rebuilt = await open_set(nats_server.url)
    assert without_detected_at(rebuilt) == want

    # EXCEPTIONS loses every raise (retention, or a purge): the open set does not.
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jsm().purge_stream(cfg.streams.exceptions)
    finally:
        await nc.close()
    async with running_router(cfg) as rt:
        await wait_for(lambda: all(p.ready.is_set() for p in rt.partitions))
        after = await open_set(nats_server.url)
        assert after == rebuilt  # detected_at too: read from the store, nothing detected again
        # Answered without loading an actor.
        nc = await nats.connect(nats_server.url)
        try:
            h = await health(nc)
            assert h is not None
            assert sum(p["resident_actors"] for p in h["partitions"]) == 0
        finally:
            await nc.close()
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jsm().stream_info(cfg.streams.exceptions)
        assert info.state.messages == 0, "nothing was published again"
    finally:
        await nc.close()
