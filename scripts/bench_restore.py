"""Measure the cluster copy of the state: writing N actors to it, and restoring a partition from it.

Run: .venv/bin/python scripts/bench_restore.py [--actors 100000 1000000] [--blob 200]

For each size: a fresh nats-server (JetStream, file storage), N actors written to the copy
(the snapshot path's `StateCopy.write_actors`, in pages of 20,000), then a fresh snapshot
store brought up from it (`PartitionCopy.reconcile`: what a start with its data folder lost
does before its consumer resumes). One line per size: seconds and actors per second of each.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import anyio
from nats.aio.client import Client as NATS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import Server

from router.engine.clustercopy import PartitionCopy
from router.jetstream.parser import FastParser
from router.jetstream.statecopy import CopyMarks, StateCopy
from snapshots.store import ActorRecord, Store

NOW_US = 1_700_000_000_000_000
HOUR_US = 3_600_000_000


def records(start: int, n: int, blob: int, rng: random.Random) -> list[ActorRecord]:
    """n sku/shipment actors; a third of them (the shipments) with one timer a few hours out."""
    out = []
    for i in range(start, start + n):
        if i % 3 == 0:
            out.append(ActorRecord("shipment", f"SH-{i:08d}", i + 1, rng.randbytes(blob),
                                   {"stalled": NOW_US + rng.randrange(HOUR_US, 6 * HOUR_US)}))
        else:
            out.append(ActorRecord("sku", f"SKU-{i:08d}", i + 1, rng.randbytes(blob), None))
    return out


async def one(n: int, blob: int) -> None:
    srv = Server()
    srv.start()
    work = Path(tempfile.mkdtemp(prefix="ops-router-bench-restore-"))
    try:
        nc = NATS()
        nc._ps = FastParser(nc)  # as the router connects (router.engine.daemon._connect)
        await nc.connect(srv.url, pending_size=64 * 1024 * 1024)
        try:
            copy = await StateCopy.open(nc, "router_state", replicas=1)
            await copy.start()
            rng = random.Random(n)
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            for start in range(0, n, 20_000):
                await copy.write_actors(0, records(start, min(20_000, n - start), blob, rng), within=120)
            rev = await copy.write_marks(0, CopyMarks(applied=n, effects=n, delivered=n), 0)
            wrote = time.perf_counter() - t0
            wrote_cpu = time.process_time() - cpu0
            stored = await copy.stream_bytes()
            store = await Store.open(work / "router.db")
            try:
                pc = PartitionCopy(copy, store, 0)
                t1 = time.perf_counter()
                cpu1 = time.process_time()
                await pc.reconcile()
                took = time.perf_counter() - t1
                took_cpu = time.process_time() - cpu1
                marks = await store.marks(0)
                assert pc.restored == n, (pc.restored, n)
                assert marks.applied_seq == n
                assert rev > 0
            finally:
                await store.close()
            await copy.close()
            print(
                f"{n:>9,} actors of {blob} B: written to the copy in {wrote:6.2f} s ({n / wrote:9,.0f}/s, "
                f"{wrote_cpu / n * 1e6:5.1f} us CPU each; {stored / n:5.0f} B stored each); restored in "
                f"{took:6.2f} s ({n / took:9,.0f}/s, {took_cpu / n * 1e6:5.1f} us CPU each)",
                flush=True,
            )
        finally:
            await nc.close()
    finally:
        srv.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


async def main(sizes: list[int], blob: int) -> None:
    for n in sizes:
        await one(n, blob)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--blob", type=int, default=200, help="bytes of each actor's state (default 200)")
    args = ap.parse_args()
    anyio.run(main, args.actors, args.blob, backend="asyncio", backend_options={"use_uvloop": True})
