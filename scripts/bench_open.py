"""Measure the open-exceptions index: answering router.exceptions.open and the grouped counts from a
store of a million actors, and what the index adds to a snapshot's row building.

Run: python scripts/bench_open.py [--actors 1000000] [--open 50000] [--runs 15]

The store holds `--actors` actor rows (200-byte states) and `--open` open exceptions over 4
partitions, a tenth of them of shipments; the partitions' in-memory side holds 1,000 changes
not stored yet. Prints medians in milliseconds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import actors
from router.engine import open_query
from router.engine.open_index import OpenIndex, View
from router.engine.snapshotter import record
from snapshots import ActorRecord, OpenRows, Store

PARTITIONS = 4
RULES = [("stockout", "critical"), ("low_stock", "warning"), ("oversold", "critical")]


class _Snap:
    def __init__(self, index: OpenIndex) -> None:
        self.open = index

    def open_view(self, stored: Any = ()) -> View:
        return self.open.view(stored)


class _Part:
    def __init__(self, i: int, snap: _Snap) -> None:
        self.index = i
        self.snapshots = snap


def payload(kind: str, key: str, rule: str, sev: str, loc: str | None) -> str:
    return (
        f'{{"id":"{kind}:{key}:{rule}:{loc or ""}:raised:123","kind":"{kind}","key":"{key}","rule":"{rule}",'
        f'"status":"raised","severity":"{sev}","location":{"null" if loc is None else chr(34) + loc + chr(34)},'
        f'"value":0,"threshold":0,"seq":123,"event_ts":"2026-12-01T10:00:00Z",'
        f'"detected_at":"2026-12-01T10:00:00.000001Z","message":"{key} out of stock at {loc} (available 0)"}}'
    )


async def build(store: Store, n_actors: int, n_open: int, rng: random.Random) -> None:
    open_keys = set(rng.sample(range(n_actors), n_open))
    for start in range(0, n_actors, 100_000):
        rows: list[ActorRecord] = []
        for i in range(start, min(start + 100_000, n_actors)):
            kind, key = ("shipment", f"SHP-{i:07d}") if i % 10 == 0 else ("sku", f"SKU-{i:07d}")
            o = None
            if i in open_keys:
                rule, sev, loc = ("sla_at_risk", "warning", None) if kind == "shipment" else (*RULES[i % 3], f"DS-{i % 40}")
                o = OpenRows(put=((rule, loc or "", sev, payload(kind, key, rule, sev, loc)),))
            rows.append(ActorRecord(kind, key, i + 1, rng.randbytes(200), None, o))
        by_part: dict[int, list[ActorRecord]] = {}
        for r in rows:
            by_part.setdefault(hash(r.key) % PARTITIONS, []).append(r)
        for p, part_rows in by_part.items():
            await store.write_snapshot(p, part_rows, applied_seq=n_actors)


async def median_ms(call: Callable[[], Awaitable[Any]], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=1_000_000)
    ap.add_argument("--open", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = await Store.open(Path(tmp) / "router.db")
        t0 = time.perf_counter()
        await build(store, args.actors, args.open, rng)
        print(f"store: {args.actors:,} actors, {args.open:,} open, built in {time.perf_counter() - t0:.1f} s")
        # The in-memory side: changes not stored yet.
        parts = []
        for p in range(PARTITIONS):
            index = OpenIndex(p, {})
            for _ in range(p, 1000, PARTITIONS):
                key = f"SKU-{rng.randrange(args.actors):07d}"
                index.note("sku", key, "low_stock", "DS-1", True, "warning", payload("sku", key, "low_stock", "warning", "DS-1").encode())
            parts.append(_Part(p, _Snap(index)))
        runs = args.runs
        cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("open, no filter, limit 200", lambda: open_query.answer(parts, store, PARTITIONS, open_query.Request())),  # type: ignore[arg-type]
            ("open, limit 1000", lambda: open_query.answer(parts, store, PARTITIONS, open_query.Request(limit=1000))),  # type: ignore[arg-type]
            ("open, rule=oversold", lambda: open_query.answer(parts, store, PARTITIONS, open_query.Request({"rule": "oversold"}))),  # type: ignore[arg-type]
            ("open, location=DS-7 severity=critical", lambda: open_query.answer(parts, store, PARTITIONS, open_query.Request({"location": "DS-7", "severity": "critical"}))),  # type: ignore[arg-type]
            ("open, key=SKU-0500000", lambda: open_query.answer(parts, store, PARTITIONS, open_query.Request({"key": "SKU-0500000"}))),  # type: ignore[arg-type]
            ("open, after the middle", lambda: open_query.answer(parts, store, PARTITIONS, open_query.Request(after=("sku", "SKU-0500000", "", "")))),  # type: ignore[arg-type]
            ("counts by severity, kind, rule, location", lambda: open_query.counts(parts, store)),  # type: ignore[arg-type]
            ("counts by kind, rule", lambda: open_query.counts(parts, store, open_query.BY_RULE)),  # type: ignore[arg-type]
        ]
        for name, call in cases:
            print(f"{name:45s} {await median_ms(call, runs):8.2f} ms")
        await store.close()
    # A snapshot's row building: record() with and without the open-set capture, 100k sku actors.
    states = [(("sku", f"S{i}"), actors.ACTORS["sku"].new(f"S{i}")) for i in range(100_000)]
    index = OpenIndex(0, dict(states))
    capture = index.capture
    for label, fn in (("record", lambda k, st: record(k, st)), ("record + capture", lambda k, st: record(k, st, capture(k, st)))):
        best = min(_time_rows(fn, states) for _ in range(5))
        print(f"{label + ', 100k actors':45s} {best * 1000:8.2f} ms")


def _time_rows(fn: Callable[[Any, Any], Any], states: list[tuple[Any, Any]]) -> float:
    t0 = time.perf_counter()
    for k, st in states:
        fn(k, st)
    return time.perf_counter() - t0


if __name__ == "__main__":
    anyio.run(main)
