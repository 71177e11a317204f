"""Measure what pending timers cost: RSS, start-up, fire latency and overdue catch-up, 10k vs 1M stored.

Run: python scripts/bench_timers.py [--pending 10000,1000000] [--due 200] [--overdue 2000]

For each size, a snapshot store is filled with that many shipment actors, each with an SLA
timer hours ahead (so they wait in SQLite, not in memory), plus `--overdue` whose deadline
passed ten minutes ago (as after an outage) and `--due` due a few seconds after the router
starts (`--due-in`, after the start-up work is over). Then the router starts in a fresh child process (real wall clock) against a private
nats-server, and the child reports:

- rss_ready: RSS once the router serves (horizon loaded); rss_end: after every firing.
- heap: timers held in memory after start (the horizon), vs pending in SQLite.
- overdue_s: from start to the last overdue firing in EXCEPTIONS (each is checked against
  EXCEPTIONS first, so a restart never publishes one twice).
- fire latency: detected_at - deadline of the `--due` timers, p50 / p99 / max.
- due_timers_ms: one horizon query (60 s ahead) on the store, measured in the parent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_lib import Server, rss_mib  # noqa: E402

import actors  # noqa: E402
from actors.shipment import ShipmentState  # noqa: E402
from snapshots.store import ActorRecord, Store  # noqa: E402

S = 1_000_000
H = 3600 * S
CHUNK = 50_000


def now_us() -> int:
    return time.time_ns() // 1000


def record(key: str, deadline: int) -> ActorRecord:
    st = ShipmentState(key=key, status="booked", promised_by=deadline)
    return ActorRecord("shipment", key, 0, actors.encode_state(st), {"sla": deadline})


async def fill(db: Path, pending: int, overdue: int) -> dict[str, Any]:
    """`pending` timers 1-7 h ahead and `overdue` ten minutes past; returns fill time and file size."""
    t0 = time.perf_counter()
    base = now_us()
    store = await Store.open(db)
    try:
        batch: list[ActorRecord] = []
        for i in range(pending):
            batch.append(record(f"P{i:07d}", base + H + (i * 6 * H) // max(1, pending)))
            if len(batch) == CHUNK:
                await store.write_snapshot(0, batch, applied_seq=0)
                batch = []
        batch += [record(f"O{i:06d}", base - 600 * S + i) for i in range(overdue)]
        await store.write_snapshot(0, batch, applied_seq=0)
        q0 = time.perf_counter()
        rows = await store.due_timers(0, now_us() + 60 * S, 100_000)
        due_ms = (time.perf_counter() - q0) * 1000
    finally:
        await store.close()
    return {
        "fill_s": round(time.perf_counter() - t0, 1),
        "db_mib": round(sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20, 1),
        "due_timers_ms": round(due_ms, 2),
        "due_rows": len(rows),
    }


async def add_due(db: Path, due: int, at_us: int) -> None:
    store = await Store.open(db)
    try:
        await store.write_snapshot(
            0, [record(f"D{i:05d}", at_us + i * 5_000) for i in range(due)], applied_seq=0
        )
    finally:
        await store.close()


# ---------------------------------------------------------------------------- the child


async def measure(url: str, db: str, overdue: int, due: int) -> dict[str, Any]:
    import nats

    from contracts.config import config_from_dict
    from router.engine.daemon import Runtime
    from router.logs import configure_logging

    configure_logging("warning", "console")
    rss_base = rss_mib()
    cfg = config_from_dict({"nats": {"url": url}, "snapshots": {"path": db}, "log": {"level": "warning"}})
    got: dict[str, dict[str, Any]] = {}
    nc = await nats.connect(url)
    done = anyio.Event()

    async def on_exc(msg: Any) -> None:
        e = json.loads(msg.data)
        got[e["id"]] = e
        if len(got) >= overdue + due:
            done.set()

    await nc.subscribe("exceptions.>", cb=on_exc)
    t0 = time.monotonic()
    started_us = now_us()
    async with Runtime.open(cfg) as rt, anyio.create_task_group() as tg:
        await tg.start(rt.serve)
        ready_s = time.monotonic() - t0
        rss_ready = rss_mib()
        heap = len(rt.partitions[0].timers.heap)
        with anyio.fail_after(600):
            await done.wait()
        rss_end = rss_mib()
        rt.request_stop()
    await nc.close()
    by_key = {e["key"][0]: [] for e in got.values()}  # type: dict[str, list[dict[str, Any]]]
    for e in got.values():
        by_key[e["key"][0]].append(e)
    from contracts.times import to_us

    def us(text: str) -> int:
        import datetime as dt

        return to_us(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))

    late = sorted((us(e["detected_at"]) - us(e["event_ts"])) / 1000 for e in by_key.get("D", []))
    overdue_done = max((us(e["detected_at"]) for e in by_key.get("O", [])), default=started_us)
    return {
        "rss_base_mib": round(rss_base, 1),
        "rss_ready_mib": round(rss_ready, 1),
        "rss_end_mib": round(rss_end, 1),
        "ready_s": round(ready_s, 2),
        "heap": heap,
        "overdue_fired": len(by_key.get("O", [])),
        "overdue_s": round((overdue_done - started_us) / S, 2),
        "due_fired": len(late),
        "late_p50_ms": round(statistics.median(late), 1) if late else None,
        "late_p99_ms": round(late[min(len(late) - 1, int(len(late) * 0.99))], 1) if late else None,
        "late_max_ms": round(late[-1], 1) if late else None,
    }


# ---------------------------------------------------------------------------- the parent


def run_size(pending: int, due: int, overdue: int, due_in: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-timers-") as d, Server() as server:
        db = Path(d) / "router.db"
        out: dict[str, Any] = {"pending": pending}
        out.update(anyio.run(fill, db, pending, overdue))
        # Due once the child has started and fired the overdue ones: 5 ms apart.
        anyio.run(add_due, db, due, now_us() + int(due_in * S))
        child = subprocess.run(
            [sys.executable, __file__, "_child", server.url, str(db), str(overdue), str(due)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if child.returncode != 0:
            raise RuntimeError(f"child failed:\n{child.stderr[-4000:]}")
        out.update(json.loads(child.stdout.strip().splitlines()[-1]))
        return out


COLUMNS = [
    ("pending", "pending timers"),
    ("db_mib", "store MiB"),
    ("fill_s", "fill s"),
    ("due_timers_ms", "horizon query ms"),
    ("ready_s", "start s"),
    ("heap", "in heap"),
    ("rss_base_mib", "RSS idle MiB"),
    ("rss_ready_mib", "RSS serving MiB"),
    ("rss_end_mib", "RSS after fires MiB"),
    ("overdue_fired", "overdue fired"),
    ("overdue_s", "overdue all fired s"),
    ("due_fired", "due fired"),
    ("late_p50_ms", "late p50 ms"),
    ("late_p99_ms", "late p99 ms"),
    ("late_max_ms", "late max ms"),
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        url, db, overdue, due = argv[1], argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(anyio.run(measure, url, db, overdue, due, backend_options={"use_uvloop": True})))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pending", default="10000,1000000", help="comma-separated sizes")
    ap.add_argument("--due", type=int, default=200)
    ap.add_argument("--overdue", type=int, default=2000)
    ap.add_argument("--due-in", type=float, default=15.0, help="seconds from filling to the --due deadlines")
    args = ap.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.pending.split(",")):
        print(f"... {n} pending", file=sys.stderr, flush=True)
        rows.append(run_size(n, args.due, args.overdue, args.due_in))
    width = max(len(h) for _, h in COLUMNS)
    for key, head in COLUMNS:
        print(f"{head:<{width}}  " + "  ".join(f"{r.get(key)!s:>10}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
