"""A full disk (SQLITE_FULL during a snapshot) fails the snapshot, not the router (issue 10, item 3).

The partition goes on applying and acknowledging, the snapshot is tried again with a growing
pause, health says `disk_full`, one log line says so, and nothing is lost once there is space.
SQLite's `PRAGMA max_page_count` makes the store full on demand; the end-to-end test fills a
small tmpfs where this machine lets the test mount one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

import actors
from router.engine.outbox import Outbox
from router.engine.snapshotter import FULL_RETRY_FIRST_S, Snapshotter
from router.engine.timers import Timers
from router.workload import workload
from snapshots import Store
from tests.support.harness import (
    check_against_fold,
    check_states,
    make_config,
    publish_all,
    running_router,
    settle,
    wait_for,
)
from tests.support.procs import health, router_process, settled_exactly_once, wait_healthy, write_config

pytestmark = pytest.mark.anyio

DAY_US = 86_400_000_000
NO_LIMIT = 1_073_741_823  # SQLite's largest max_page_count


async def _page_limit(store: Store, extra_pages: int | None) -> None:
    """Let the store's writer grow by `extra_pages` pages at most (None: no limit)."""
    db = store._db
    assert db is not None
    if extra_pages is None:
        await db.execute(f"PRAGMA max_page_count = {NO_LIMIT}")
        return
    ((pages,),) = await db.execute_fetchall("PRAGMA page_count")
    await db.execute(f"PRAGMA max_page_count = {int(pages) + extra_pages}")


async def test_a_snapshot_that_finds_no_room_keeps_its_actors_and_is_tried_again(tmp_path: Path) -> None:
    now = [0.0]
    store = await Store.open(tmp_path / "router.db")
    try:
        await _page_limit(store, 2)
        timers = Timers()
        outbox = Outbox(None, lambda: 0, timers.schedule, lambda: None)  # type: ignore[arg-type]
        resident: dict[tuple[str, str], Any] = {}
        for i in range(3000):
            st = actors.ACTORS["sku"].new(f"K{i}")
            st.seq = i + 1
            resident[("sku", f"K{i}")] = st
        snap = Snapshotter(store, 0, resident, 10, 3600.0, outbox, timers, lambda: None, clock=lambda: now[0])

        async def snapshot() -> None:
            snap.since = snap.every_events
            assert snap.due()
            job = snap.start(3000, 3000)
            assert job is not None
            await snap.write(*job)

        snap.dirty |= set(resident)
        await snapshot()  # does not raise
        assert snap.disk_full
        assert snap.dirty == set(resident)  # still to be written
        assert not snap.running
        assert tuple(await store.marks(0)) == (0, 0)
        assert await store.count_actors() == 0
        snap.since = snap.every_events
        assert not snap.due()  # pausing before the next try
        now[0] += FULL_RETRY_FIRST_S
        await snapshot()  # still full: the pause doubles
        assert snap.disk_full
        snap.since = snap.every_events
        now[0] += FULL_RETRY_FIRST_S
        assert not snap.due()
        now[0] += FULL_RETRY_FIRST_S
        await _page_limit(store, None)  # space again
        await snapshot()
        assert not snap.disk_full
        assert not snap.dirty
        assert tuple(await store.marks(0)) == (3000, 3000)
        assert await store.count_actors() == 3000
    finally:
        await store.close()


async def test_the_router_applies_on_while_the_store_is_full_and_loses_nothing(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    cfg = make_config(url, tmp_path)
    now_us = time.time_ns() // 1000
    async with running_router(cfg) as rt:
        await _page_limit(rt.store, 0)
        await publish_all(url, list(workload(seed=31, count=3000, bad_share=0.02, now_us=now_us)))
        p = rt.partitions[0]
        await wait_for(lambda: p.snapshots.disk_full, 20.0)
        nc = await nats.connect(url)
        try:
            h = await health(nc)
        finally:
            await nc.close()
        assert h is not None
        assert h["status"] == "disk_full"
        assert h["disk_full"] is True
        assert h["partitions"][0]["disk_full"] is True
        # Applying, publishing and acknowledging go on; only the store lags.
        await settle(url, cfg, rt)
        assert p.snapshots.disk_full
        exp = await check_against_fold(url, cfg, rt)
        await check_states(url, exp, sample=200)
        assert (await rt.store.marks(0)).applied_seq == 0
        await _page_limit(rt.store, None)
        await wait_for(lambda: not p.snapshots.disk_full and p.snapshots.snapshot_seq == p.applied_seq, 60.0)
        assert await rt.store.count_actors() > 0
    # Everything is in the store: a new router holds the same state without the stream's help.
    async with running_router(cfg) as rt:
        assert (await rt.store.marks(0)).applied_seq == rt.partitions[0].applied_seq
        await settle(url, cfg, rt)
        exp = await check_against_fold(url, cfg, rt)
        await check_states(url, exp, sample=200)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def test_a_full_file_system_end_to_end(nats_server: Any, tmp_path: Path) -> None:
    """The router process on a small tmpfs that a filler file fills up, then frees."""
    url = nats_server.url
    with _tmpfs(tmp_path / "disk", "32m") as disk:
        cfg_path = tmp_path / "config.toml"
        cfg = write_config(cfg_path, url, snapshots={"path": str(disk / "router.db"), "every": "200ms"})
        with router_process(cfg_path, start=False) as rp:
            rp.start()
            await wait_healthy(url, rp)
            filler = disk / "filler"
            with filler.open("wb") as f:  # everything but 16 KiB
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                f.write(b"\0" * max(0, free - 16 * 1024))
            now_us = time.time_ns() // 1000 + DAY_US
            await publish_all(url, list(workload(seed=32, count=3000, bad_share=0.02, now_us=now_us)))
            nc = await nats.connect(url)
            try:
                with anyio.fail_after(30):
                    while True:
                        assert rp.running, rp.tail()
                        h = await health(nc)
                        if h is not None and h.get("disk_full"):
                            break
                        await anyio.sleep(0.1)
            finally:
                await nc.close()
            full = [e for e in rp.log_events() if e.get("event") == "disk_full"]
            assert len(full) == 1, rp.tail()
            assert full[0]["level"] == "error"
            filler.unlink()  # space returns
            await settled_exactly_once(url, cfg, rp, timeout=90)
            assert [e for e in rp.log_events() if e.get("event") == "disk_full_over"], rp.tail()
            rc, _took = await anyio.to_thread.run_sync(rp.terminate, 15)
            assert rc == 0, rp.tail()
            assert not any(e.get("level") == "critical" for e in rp.log_events())
            rp.start()  # from the store alone: the same state
            await settled_exactly_once(url, cfg, rp)
