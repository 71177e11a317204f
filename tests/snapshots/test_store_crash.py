"""A writer SIGKILLed mid-transaction leaves a store whose marks and actors agree: all of a snapshot or none."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from snapshots import PartitionMarks, Store

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")]

REPO = Path(__file__).resolve().parents[2]
SHARED = 50  # actors rewritten by every snapshot
FRESH = 3000  # actors first written by each snapshot

# Snapshot n (seq = 10 n) writes SHARED actors at last_seq = seq with a timer due at seq, and
# FRESH new actors `b<n>-<j>` (every other one with a timer), applied_seq = seq and
# effects_seq = seq - 5; then a separate effects mark of seq. It resumes after what is stored.
WRITER = textwrap.dedent(
    """
    import sys
    import anyio
    from snapshots import ActorRecord, Store

    SHARED, FRESH = {shared}, {fresh}

    async def main(path):
        # A 1 MiB page cache spills each snapshot into the log before its commit, so a kill
        # also leaves uncommitted frames behind, which recovery must ignore.
        async with await Store.open(path, synchronous="NORMAL", cache_mib=1) as store:
            n = (await store.marks(0)).applied_seq // 10
            while True:
                n += 1
                seq = 10 * n
                batch = [ActorRecord("sku", f"s{{j}}", seq, b"s" * 400, {{"t": seq}}) for j in range(SHARED)]
                batch += [
                    ActorRecord("shipment", f"b{{n}}-{{j}}", seq, b"b" * 400, {{"t": seq}} if j % 2 else {{}})
                    for j in range(FRESH)
                ]
                await store.write_snapshot(0, batch, applied_seq=seq, effects_seq=seq - 5)
                await store.write_effects_mark(0, seq)
                print(n, flush=True)

    anyio.run(main, sys.argv[1])
    """
).format(shared=SHARED, fresh=FRESH)


def run_and_kill(path: Path, delay: float) -> int:
    """Start the writer, let it commit 3 snapshots, SIGKILL it `delay` s later; the last n it reported."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    try:
        reported = 0
        for _ in range(3):
            line = proc.stdout.readline()
            assert line, proc.stderr.read().decode() if proc.stderr else "writer exited"
            reported = int(line)
        # Most of the writer's time is inside write_snapshot, so the kill lands mid-transaction.
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return max([reported, *map(int, out.split())])


async def check_consistent(path: Path, reported: int) -> int:
    async with await Store.open(path) as store:
        assert not store.created
        marks = await store.marks(0)
        n, rest = divmod(marks.applied_seq, 10)
        assert rest == 0
        assert n >= reported  # what it reported committed is there (and maybe one more)
        seq = 10 * n
        assert marks in (PartitionMarks(seq, seq - 5), PartitionMarks(seq, seq))

        shared = await store.load_actors([("sku", f"s{j}") for j in range(SHARED)])
        assert {last_seq for last_seq, _ in shared.values()} == {seq}
        assert len(shared) == SHARED
        this = await store.load_actors([("shipment", f"b{n}-{j}") for j in range(FRESH)])
        assert len(this) == FRESH
        assert {last_seq for last_seq, _ in this.values()} == {seq}
        assert await store.load_actors([("shipment", f"b{n + 1}-{j}") for j in range(FRESH)]) == {}
        assert await store.count_actors() == SHARED + FRESH * n

        timers = await store.due_timers(0, 10**9, limit=10**6)
        assert len(timers) == SHARED + (FRESH // 2) * n
        assert sum(1 for t in timers if t.deadline_us == seq) == SHARED + FRESH // 2
        assert await store.integrity_check() == []
        return n


@pytest.mark.slow
async def test_sigkill_mid_write_leaves_consistent_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "crash" / "router.db"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    previous = 0
    with anyio.fail_after(60):
        for _ in range(3):  # crash, recover and continue, crash again
            delay = rng.uniform(0.0, 0.05)
            reported = await anyio.to_thread.run_sync(run_and_kill, path, delay)
            n = await check_consistent(path, reported)
            assert n >= previous + 3, f"seed {seed}"
            previous = n
