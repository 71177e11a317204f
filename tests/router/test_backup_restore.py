"""`router backup` while the router runs, and `router restore`: a real nats-server, real SQLite.

Backed up mid-stream, more events after, the router stopped, the backup restored and the
router started again: it resumes from the backup's marks, replays EVENTS from there, and ends
with exactly the state, exceptions and dead letters a fold of the stream implies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from contracts.config import Config, load_config
from router.cli.main import main
from snapshots.backup import verify
from tests.support.harness import (
    check_against_fold,
    check_states,
    publish_all,
    running_router,
    settle,
    stream_last_seq,
    wait_for,
)

pytestmark = pytest.mark.anyio

NOW_US = 1_790_000_000_000_000  # the workload's start; a router clock frozen here fires no wall-clock timer


def frozen_clock() -> int:
    return NOW_US


def write_config(url: str, folder: Path) -> Path:
    path = folder / "config.toml"
    path.write_text(
        f'[nats]\nurl = "{url}"\n\n[snapshots]\npath = "{folder / "data" / "router.db"}"\nevery = "200ms"\n'
        # (with the cluster copy on, a restored backup is brought up to the copy at start)
        "cluster_copy = false\n\n"
        '[log]\nlevel = "warning"\n'
    )
    return path


async def cli(*argv: str) -> int:
    """The command in a worker thread, as another process would run it: the router's loop goes on."""
    return await anyio.to_thread.run_sync(main, list(argv))


async def test_backup_mid_stream_then_restore_replays_to_the_fold(
    nats_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from router.workload import workload

    config = write_config(nats_server.url, tmp_path)
    cfg: Config = load_config(str(config))
    msgs = list(workload(seed=5, count=6000, bad_share=0.02, now_us=NOW_US))
    a, b = 2000, 4000
    copy = tmp_path / "backups" / "router-1.db"
    copy.parent.mkdir()
    async with running_router(cfg, frozen_clock) as rt:
        await publish_all(nats_server.url, msgs[:a])
        await settle(nats_server.url, cfg, rt)
        await wait_for(lambda: rt.partitions[0].snapshot_seq >= a, timeout=20)
        async with anyio.create_task_group() as tg:  # the backup while events keep coming
            tg.start_soon(publish_all, nats_server.url, msgs[a:b])
            assert await cli("backup", str(copy), "--config", str(config)) == 0
        backed = verify(copy)
        await settle(nats_server.url, cfg, rt)
        # A running router: restore refuses and leaves its store alone.
        assert await cli("restore", str(copy), "--config", str(config)) == 1
        assert "open in another process (a running router?): stop it first" in capsys.readouterr().err
    applied_at_backup = backed.marks[0][0]
    assert a <= applied_at_backup < b + 100  # mid-stream (the workload's messages add to the stream)
    assert backed.actors > 0

    await publish_all(nats_server.url, msgs[b:])  # more events after the backup, router down
    assert await cli("check-store", str(copy)) == 0
    assert await cli("restore", str(copy), "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert f"applied through {applied_at_backup:,}" in out
    replaced = [p for p in (tmp_path / "data").iterdir() if ".replaced-" in p.name]
    assert len([p for p in replaced if p.name.endswith(tuple("0123456789Z"))]) == 1, replaced
    assert not (tmp_path / "data" / "router.db-wal").exists()

    async with running_router(cfg, frozen_clock) as rt:
        await settle(nats_server.url, cfg, rt)
        last = await stream_last_seq(nats_server.url, cfg.streams.events)
        # Resumed from the backup's marks: delivered exactly the events after them.
        assert rt.partitions[0].processed == last - applied_at_backup
        exp = await check_against_fold(nats_server.url, cfg)
        await check_states(nats_server.url, exp)
    assert exp.exception_ids, "the workload raises exceptions"
    assert exp.dead_letters, "the workload has bad input"
