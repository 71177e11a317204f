"""`router repartition --to N` (issue 14): a stopped deployment moved from 1 partition to 4.

The real router and the real command as subprocesses against a real nats-server; each phase
ends with every exception, dead letter and actor message exactly once and every key's state
as a fold of the stream says.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

from tests.router.test_faults import Publisher, future_workload, ready_this_run
from tests.support.harness import wait_for
from tests.support.procs import router_process, settled_exactly_once, wait_healthy, write_config

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def repartition(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", "repartition", "--config", str(config), "--to", "4", *extra],
        capture_output=True, text=True, timeout=120,
    )


async def stream_subjects(url: str, name: str) -> list[str] | None:
    nc = await nats.connect(url)
    try:
        try:
            info = await nc.jsm().stream_info(name)
        except nats.js.errors.NotFoundError:
            return None
        return list(info.config.subjects or [])
    finally:
        await nc.close()


async def run_phase(url: str, config: Path, cfg: Any, messages: list[tuple[str, bytes]], partitions: int) -> Any:
    """Start the router, publish, settle, check against the fold, stop (SIGTERM)."""
    with router_process(config) as rp:
        try:
            await wait_healthy(url, rp)
            await wait_for(lambda: ready_this_run(rp, partitions), 30)
            await Publisher(url, messages).run(2_000, 0.02)
            exp = await settled_exactly_once(url, cfg, rp)
            rc, _took = await anyio.to_thread.run_sync(rp.terminate, 15)
            assert rc == 0, rp.tail()
            return exp
        except BaseException:
            print(rp.tail(60))
            raise


async def test_one_partition_to_four_with_a_failure_half_way_first(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    config = tmp_path / "config.toml"
    cfg = write_config(config, url)
    messages = future_workload(seed=31, count=15_000)
    await run_phase(url, config, cfg, messages[:6_000], 1)
    store = tmp_path / "data" / "router.db"
    before = store.read_bytes()

    # A failure half way (after events.> moved to the new stream): everything is undone.
    failed = await anyio.to_thread.run_sync(lambda: repartition(config, "--fail-after", "subjects"))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "rolled back" in failed.stdout, failed.stdout
    assert await stream_subjects(url, "EVENTS") == ["events.>"]
    assert await stream_subjects(url, "EVENTS_P4") is None
    assert store.read_bytes() == before
    assert not (tmp_path / "data" / "router.db.p4").exists()
    # The old deployment works as before.
    await run_phase(url, config, cfg, messages[6_000:10_000], 1)

    done = await anyio.to_thread.run_sync(lambda: repartition(config))
    assert done.returncode == 0, done.stdout + done.stderr
    print(failed.stdout, done.stdout)
    out = done.stdout
    for step in ("step 1/5", "step 2/5", "step 3/5", "step 4/5", "step 5/5", "done."):
        assert step in out, out
    assert await stream_subjects(url, "EVENTS") == ["EVENTS.retired"]
    assert await stream_subjects(url, "EVENTS_P4") == ["events.>"]
    assert list((tmp_path / "data").glob("router.db.before-p4-*"))

    cfg4 = write_config(config, url, router={"partitions": 4}, streams={"events": "EVENTS_P4"})
    exp = await run_phase(url, config, cfg4, messages[10_000:], 4)
    assert exp.exception_ids
    # Every event of the three phases is in the new stream, at its old sequence number.
    nc = await nats.connect(url)
    try:
        old = await nc.jsm().stream_info("EVENTS")
        new = await nc.jsm().stream_info("EVENTS_P4")
        m = await nc.jsm().get_msg("EVENTS_P4", 1)
    finally:
        await nc.close()
    assert int(new.state.last_seq) > int(old.state.last_seq)
    assert m.subject.split(".")[1].isdigit()  # stored with its partition token
