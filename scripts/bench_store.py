"""Measure the snapshot store: a 100k-actor snapshot write, due_timers with 10k vs 1M pending timers.

Run: python scripts/bench_store.py [--actors 100000] [--blob 200] [--stored 1000000] [--synchronous NORMAL]

Prints one table. "loop lag" is the longest the event loop went without running a 1 ms
ticker while the call was in progress: how long the store blocked other tasks.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapshots.store import DUE_TIMERS_SQL, ActorRecord, Store

NOW_US = 1_700_000_000_000_000
HOUR_US = 3_600_000_000


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """(seconds the call took, longest event-loop stall in seconds while it ran)."""
    lag = 0.0
    done = False

    async def ticker() -> None:
        nonlocal lag
        last = time.perf_counter()
        while not done:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            lag = max(lag, now - last - 0.001)
            last = now

    gc.collect()  # settle the setup's garbage first: a gen-2 pass would stall the loop, not the store
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.01)
        t0 = time.perf_counter()
        await call()
        took = time.perf_counter() - t0
        done = True
    return took, lag


def records(n: int, blob: int, seq: int, rng: random.Random) -> list[ActorRecord]:
    """n sku/shipment actors; a third of them (the shipments) with one timer a few hours out."""
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(
                ActorRecord(
                    "shipment",
                    f"SHP-{i:08d}",
                    seq,
                    rng.randbytes(blob),
                    {"sla": NOW_US + rng.randrange(HOUR_US)},
                )
            )
        else:
            out.append(ActorRecord("sku", f"SKU-{i:08d}", seq, rng.randbytes(blob)))
    return out


def add_far_timers(path: Path, start: int, stop: int, rng: random.Random) -> None:
    """Insert timers start..stop, due days ahead, straight into the file (setup only, not measured)."""
    con = sqlite3.connect(path)
    with con:
        con.executemany(
            "INSERT OR REPLACE INTO timers (kind, key, name, deadline_us, partition) VALUES (?, ?, ?, ?, 0)",
            (
                ("shipment", f"FAR-{i:08d}", "sla", NOW_US + 24 * HOUR_US + rng.randrange(30 * 24 * HOUR_US))
                for i in range(start, stop)
            ),
        )
    con.close()


def raw_due_ms(path: Path, repeat: int = 200) -> float:
    """The due query without aiosqlite's thread hop: what SQLite itself spends."""
    con = sqlite3.connect(path)
    try:
        t0 = time.perf_counter()
        for _ in range(repeat):
            con.execute(DUE_TIMERS_SQL, (0, NOW_US + HOUR_US, 1000)).fetchall()
        return (time.perf_counter() - t0) / repeat * 1000
    finally:
        con.close()


async def due_query_ms(store: Store, repeat: int = 50) -> tuple[float, int]:
    times = []
    rows = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        due = await store.due_timers(0, NOW_US + HOUR_US, 1000)
        times.append(time.perf_counter() - t0)
        rows = len(due)
    return statistics.median(times) * 1000, rows


async def measure(args: argparse.Namespace, folder: Path) -> list[tuple[str, str, str]]:
    rng = random.Random(7)
    path = folder / "bench.db"
    table: list[tuple[str, str, str]] = []

    async with await Store.open(path, synchronous=args.synchronous) as store:
        for i in range(0, args.stored, 100_000):  # setup: actors already in the store
            pre = [
                ActorRecord("sku", f"OLD-{j:08d}", 1, rng.randbytes(args.blob)) for j in range(i, i + 100_000)
            ]
            await store.write_snapshot(1, pre, applied_seq=1)
        if args.stored:
            table.append((f"(store already holds {args.stored:,} actors)", "", ""))
        recs = records(args.actors, args.blob, 100, rng)
        took, lag = await timed(lambda: store.write_snapshot(0, recs, applied_seq=100, effects_seq=100))
        table.append(
            (
                f"write_snapshot {args.actors:,} new actors ({args.blob} B)",
                f"{took * 1000:.0f} ms",
                f"{lag * 1000:.1f} ms",
            )
        )

        recs = records(args.actors, args.blob, 200, rng)
        took, lag = await timed(lambda: store.write_snapshot(0, recs, applied_seq=200, effects_seq=200))
        table.append(
            (
                f"write_snapshot {args.actors:,} existing actors",
                f"{took * 1000:.0f} ms",
                f"{lag * 1000:.1f} ms",
            )
        )

        keys = [(r.kind, r.key) for r in rng.sample(recs, 1000)]
        took, lag = await timed(lambda: store.load_actors(keys))
        table.append(("load_actors 1,000 keys", f"{took * 1000:.1f} ms", f"{lag * 1000:.1f} ms"))

        # Loads while a snapshot is being written: the read connection does not wait for it.
        recs = records(args.actors, args.blob, 300, rng)
        loads: list[float] = []
        writing = True

        async def write() -> None:
            nonlocal writing
            await store.write_snapshot(0, recs, applied_seq=300, effects_seq=300)
            writing = False

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            await anyio.sleep(0.01)
            while writing:
                t0 = time.perf_counter()
                await store.load_actors(keys[:100])
                loads.append(time.perf_counter() - t0)
        table.append(
            (
                f"load_actors 100 keys during a {args.actors:,} write",
                f"{statistics.median(loads) * 1000:.1f} ms",
                f"max {max(loads) * 1000:.1f} ms",
            )
        )

        n = 1000
        t0 = time.perf_counter()
        for i in range(n):
            await store.write_effects_mark(0, 300 + i)
        table.append(("write_effects_mark (each)", f"{(time.perf_counter() - t0) / n * 1e6:.0f} us", ""))

        t0 = time.perf_counter()
        for i in range(n):
            await store.write_actors(
                0, [ActorRecord("shipment", f"SHP-{i * 3:08d}", 400, b"y" * args.blob, {"sla": NOW_US})]
            )
        table.append(("write_actors, one actor (each)", f"{(time.perf_counter() - t0) / n * 1e6:.0f} us", ""))

    # Timers: 100 due within the hour, the rest days ahead; the query must not notice the rest.
    tpath = folder / "bench-timers.db"
    async with await Store.open(tpath, synchronous=args.synchronous) as store:
        due_recs = [ActorRecord("shipment", f"DUE-{i:04d}", 1, b"z", {"sla": NOW_US + i}) for i in range(100)]
        await store.write_snapshot(0, due_recs, applied_seq=1)
    have = 100
    for total in (10_000, 1_000_000):
        await anyio.to_thread.run_sync(add_far_timers, tpath, have, total, rng)
        have = total
        async with await Store.open(tpath, synchronous=args.synchronous) as store:
            ms, due = await due_query_ms(store)
            t0 = time.perf_counter()
            for _ in range(200):
                await store.due_timers(0, NOW_US + HOUR_US, 10)
            ms10 = (time.perf_counter() - t0) / 200 * 1000
        raw = await anyio.to_thread.run_sync(raw_due_ms, tpath)
        table.append((f"due_timers limit 1000, {total:,} pending", f"{ms:.3f} ms", f"{due} rows"))
        table.append((f"  the query alone (sqlite3, same thread), {total:,}", f"{raw:.3f} ms", f"{due} rows"))
        table.append((f"due_timers limit 10, {total:,} pending", f"{ms10:.3f} ms", "10 rows"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=100_000)
    parser.add_argument("--blob", type=int, default=200, help="bytes per actor state")
    parser.add_argument(
        "--stored", type=int, default=0, help="actors in the store before the measured writes"
    )
    parser.add_argument("--synchronous", choices=("OFF", "NORMAL", "FULL"), default="NORMAL")
    parser.add_argument("--dir", help="keep the file in this folder (default: a temporary one)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the router does")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_store_"))
    for p in folder.glob("bench*.db*"):
        p.unlink()
    table = anyio.run(measure, args, folder, backend_options={"use_uvloop": args.uvloop})
    loop = "uvloop" if args.uvloop else "asyncio"
    print(
        f"snapshot store bench: synchronous={args.synchronous}, {loop}, SQLite {sqlite3.sqlite_version},"
        f" {os.cpu_count()} cores; store {os.path.getsize(folder / 'bench.db') / 1e6:.0f} MB"
    )
    w = max(len(r[0]) for r in table)
    print(f"{'operation':<{w}}  {'time':>10}  {'loop lag / rows':>15}")
    for name, t, extra in table:
        print(f"{name:<{w}}  {t:>10}  {extra:>15}")
    if not args.dir:
        for p in folder.glob("bench*.db*"):
            p.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
