"""CPU per event of the hot path alone: `Partition._drain` over a workload, in this process.

Run: python scripts/bench_drain.py [--count 100000] [--trials 5] [--save FILE | --messages FILE]

No NATS and no SQLite: the messages (a seeded workload with 1% bad input, given ack subjects
as JetStream would) are queued in batches of `[router] fetch_batch` and drained; publishes
go to a stub. The figure is thread CPU time per event (min and median of the trials), which
a busy machine disturbs far less than the wall-clock rates of scripts/bench. `--save` writes
the messages to a file and `--messages` reads them, so two checkouts can be compared on the
same input (an older checkout, whose partition takes the runtime instead of PartitionDeps,
works too).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import structlog

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

from contracts.config import config_from_dict  # noqa: E402
from router.engine.partition import Partition  # noqa: E402
from router.workload import workload  # noqa: E402

try:
    from actors import Thresholds
except ImportError:  # an older checkout
    from actors._base import Thresholds  # type: ignore[no-redef]


class _Publisher:
    max_payload = 1 << 20
    published = 0

    async def publish(self, subject: str, payload: bytes, headers: Any, done: Any, fence: Any = None) -> None:
        _Publisher.published += 1


class _Connection:
    max_payload = 1 << 20
    is_connected = True

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        return None


def _partition(cfg: Any) -> Any:
    fields: dict[str, Any] = {
        "cfg": cfg, "nc": _Connection(), "jsm": None, "store": None, "publisher": _Publisher(),
        "thresholds": Thresholds.from_rules(cfg.rules), "now_us": lambda: time.time_ns() // 1000,
        "raw_path": lambda *a: None, "horizon_us": 0, "snapshot_every_s": 1.0,
    }
    try:
        from router.engine.deps import PartitionDeps
    except ImportError:  # an older checkout: the partition takes the runtime
        p = Partition(SimpleNamespace(**fields), 0)  # type: ignore[arg-type]
    else:
        p = Partition(PartitionDeps(**fields), 0)
    p.stored.ready = True  # an empty store: no lookups
    p._received_through = 0
    return p


async def _trial(cfg: Any, items: list[Any]) -> float:
    p = _partition(cfg)
    batch = cfg.router.fetch_batch
    t0 = time.thread_time()
    for at in range(0, len(items), batch):
        p._inq.extend(items[at : at + batch])
        await p._drain()
    took = time.thread_time() - t0
    assert p.applied_seq == len(items), p.applied_seq
    return took * 1e9 / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--messages", type=Path)
    args = ap.parse_args()
    if args.messages:
        msgs = pickle.loads(args.messages.read_bytes())
    else:
        now = 1_800_000_000_000_000
        msgs = [(s.encode(), d) for s, d in workload(seed=7, count=args.count, now_us=now, bad_share=0.01)]
    if args.save:
        args.save.write_bytes(pickle.dumps(msgs))
    n = len(msgs)
    ts0 = 1_800_000_000_000_000_000
    items = [
        (s, b"$JS.ACK.EVENTS.router.1.%d.%d.%d.%d" % (i + 1, i + 1, ts0 + i * 1_000_003, n - i - 1), d, None)
        for i, (s, d) in enumerate(msgs)
    ]
    cfg = config_from_dict(
        {"nats": {"url": "nats://127.0.0.1:1"}, "snapshots": {"path": "unused/router.db", "resident_actors": 1_000_000}},
        base_dir=".",
    )

    async def run() -> list[float]:
        return [await _trial(cfg, items) for _ in range(args.trials)]

    out = anyio.run(run)
    print(
        f"{n:,} events: CPU per event min {min(out):.0f} ns, median {statistics.median(out):.0f} ns "
        f"(trials {[round(x) for x in out]}); publishes {_Publisher.published // args.trials:,} per trial"
    )


if __name__ == "__main__":
    main()
