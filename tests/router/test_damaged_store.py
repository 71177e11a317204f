"""A damaged or missing snapshot store, with the installed router (issue 3).

When EVENTS still holds the whole history the router says what happened and rebuilds the
state from it, without publishing again what it had published (the consumer's ack floor
says how far); when the history is gone it refuses to start and says what to do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

from router.workload import workload
from tests.support.harness import publish_all
from tests.support.procs import (
    RouterProcess,
    router_process,
    settle_process,
    settled_exactly_once,
    wait_healthy,
    write_config,
)

pytestmark = pytest.mark.anyio

DAY_US = 86_400_000_000


async def _first_run(nats_server: Any, tmp_path: Path, rp: RouterProcess, count: int = 4000) -> Any:
    """Start the router, feed it a day with bad input, let it settle, stop it (SIGTERM); the config."""
    # The local store alone: with the cluster copy on, a lost or damaged store is restored from
    # it instead (tests/router/test_cluster_copy.py).
    cfg = write_config(tmp_path / "config.toml", nats_server.url, snapshots={"cluster_copy": False})
    rp.start()
    await wait_healthy(nats_server.url, rp)
    now_us = time.time_ns() // 1000 + DAY_US
    await publish_all(nats_server.url, list(workload(seed=21, count=count, bad_share=0.03, now_us=now_us)))
    await settle_process(nats_server.url, cfg, rp)
    rc, _took = await anyio.to_thread.run_sync(rp.terminate, 15)
    assert rc == 0, rp.tail()
    return cfg


async def _more_events(url: str, seed: int, count: int) -> None:
    now_us = time.time_ns() // 1000 + DAY_US
    await publish_all(url, list(workload(seed=seed, count=count, bad_share=0.03, now_us=now_us)))


def _events(rp: RouterProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in rp.log_events() if e.get("event") == name]


async def _rebuilt_and_exactly_once(nats_server: Any, cfg: Any, rp: RouterProcess) -> None:
    rp.start()
    try:
        await settled_exactly_once(nats_server.url, cfg, rp)
    except BaseException:
        print(rp.tail(40))
        raise
    ready = _events(rp, "partition_ready")[-1]
    assert ready["applied_seq"] == 0  # rebuilt from the first event
    assert ready["effects_confirmed_seq"] > 0  # ... without publishing again up to the ack floor


async def test_deleted_store_is_rebuilt_from_the_stream(nats_server: Any, tmp_path: Path) -> None:
    with router_process(tmp_path / "config.toml", start=False) as rp:
        cfg = await _first_run(nats_server, tmp_path, rp)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{cfg.snapshot_path}{suffix}").unlink(missing_ok=True)
        await _more_events(nats_server.url, 22, 1000)  # and events arrive while it is away
        await _rebuilt_and_exactly_once(nats_server, cfg, rp)
        new = _events(rp, "snapshot_store_new")
        assert new
        assert "rebuilding" in new[-1]["action"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
async def test_damaged_store_is_quarantined_and_rebuilt(
    nats_server: Any, tmp_path: Path, damage: str
) -> None:
    with router_process(tmp_path / "config.toml", start=False) as rp:
        cfg = await _first_run(nats_server, tmp_path, rp)
        path = cfg.snapshot_path
        size = path.stat().st_size
        assert size > 8192
        if damage == "truncated":
            os.truncate(path, size // 2)
        elif damage == "garbage":
            path.write_bytes(os.urandom(size))
        else:
            path.write_bytes(b"")
        await _rebuilt_and_exactly_once(nats_server, cfg, rp)
        said = _events(rp, "snapshot_store_damaged")
        assert said, rp.tail()
        assert said[-1]["level"] == "error"
        assert said[-1]["reason"]
        assert "rebuilding" in said[-1]["action"]
        moved = Path(said[-1]["moved_to"])
        assert moved.name.startswith(f"{path.name}.damaged-")
        assert moved.exists()


async def _purge_first(url: str, stream: str, upto: int) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jsm().purge_stream(stream, seq=upto + 1)  # removes every message below upto + 1
        info = await nc.jsm().stream_info(stream)
        assert int(info.state.first_seq) == upto + 1
    finally:
        await nc.close()


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
async def test_refuses_to_start_when_the_history_is_gone(
    nats_server: Any, tmp_path: Path, damage: str
) -> None:
    with router_process(tmp_path / "config.toml", start=False) as rp:
        cfg = await _first_run(nats_server, tmp_path, rp, count=1500)
        await _purge_first(nats_server.url, cfg.streams.events, 500)
        path = cfg.snapshot_path
        if damage == "deleted":
            path.unlink()
        else:
            path.write_bytes(b"this is not a database" * 100)
        before = path.read_bytes() if path.exists() else None
        rp.start()
        rc = await anyio.to_thread.run_sync(rp.wait, 20)
        assert rc == 1, rp.tail()
        failed = _events(rp, "router_failed")
        assert failed, rp.tail()
        message = failed[-1]["error"]
        assert str(path) in message
        assert "501" in message
        assert "backup" in message  # says what to do
        # Nothing was changed on the way out: the operator decides.
        assert (path.read_bytes() if path.exists() else None) == before
        assert not list(path.parent.glob("*.damaged-*"))


async def test_refuses_when_events_were_removed_before_being_applied(
    nats_server: Any, tmp_path: Path
) -> None:
    """The store is fine but the stream lost events it had not applied yet."""
    with router_process(tmp_path / "config.toml", start=False) as rp:
        cfg = await _first_run(nats_server, tmp_path, rp, count=1000)
        nc = await nats.connect(nats_server.url)
        try:
            last = int((await nc.jsm().stream_info(cfg.streams.events)).state.last_seq)
        finally:
            await nc.close()
        await _more_events(nats_server.url, 23, 1000)
        await _purge_first(nats_server.url, cfg.streams.events, last + 500)
        rp.start()
        rc = await anyio.to_thread.run_sync(rp.wait, 20)
        assert rc == 1, rp.tail()
        message = _events(rp, "router_failed")[-1]["error"]
        assert f"{last + 1}..{last + 500}" in message
        assert "backup" in message


def _damage_a_page_of_actors(path: Path) -> int:
    """Overwrite one 4 KiB page in the middle of the actors table (the file header and the schema
    stay intact, so opening the store finds nothing wrong). The key filter a clean stop saved is
    dropped first, so the next start reads every stored key and so reaches the page. Returns the
    page number."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        db.execute("DELETE FROM meta WHERE name LIKE 'key_filter:%'")
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = [n for (n,) in db.execute("SELECT pageno FROM dbstat WHERE name = 'actors' AND pagetype = 'leaf' ORDER BY pageno")]
    finally:
        db.close()
    assert len(pages) >= 3, pages
    page = pages[len(pages) // 2]
    with path.open("r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(os.urandom(page_size))
    return page


async def test_damage_found_by_a_read_while_running_is_quarantined_and_rebuilt(
    nats_server: Any, tmp_path: Path
) -> None:
    """4 KiB overwritten mid-file: not seen when the store opens, found by the first read that
    reaches it. The router moves the file aside, says so in one line and rebuilds from the
    stream, exactly once, without a restart from outside."""
    with router_process(tmp_path / "config.toml", start=False) as rp:
        cfg = await _first_run(nats_server, tmp_path, rp)
        path = cfg.snapshot_path
        _damage_a_page_of_actors(path)
        rp.start()
        try:
            await settled_exactly_once(nats_server.url, cfg, rp)
            await _more_events(nats_server.url, 24, 500)
            await settled_exactly_once(nats_server.url, cfg, rp)
        except BaseException:
            print(rp.tail(60))
            raise
        assert rp.running, "the router stopped"
        said = _events(rp, "snapshot_store_damaged")
        assert len(said) == 1, rp.tail()
        assert said[0]["level"] == "error"
        assert "malformed" in said[0]["reason"] or "SQLite" in said[0]["reason"]
        assert "rebuilding" in said[0]["action"]
        moved = Path(said[0]["moved_to"])
        assert moved.name.startswith(f"{path.name}.damaged-")
        assert moved.exists()
        assert not _events(rp, "snapshot_store_new")  # one line says it all
        assert _events(rp, "partition_ready")[-1]["applied_seq"] == 0  # rebuilt from the first event


async def test_damage_found_while_running_without_the_history_stops_with_a_message(
    nats_server: Any, tmp_path: Path
) -> None:
    with router_process(tmp_path / "config.toml", start=False) as rp:
        cfg = await _first_run(nats_server, tmp_path, rp, count=1500)
        await _purge_first(nats_server.url, cfg.streams.events, 500)
        path = cfg.snapshot_path
        _damage_a_page_of_actors(path)
        before = path.read_bytes()
        rp.start()
        rc = await anyio.to_thread.run_sync(rp.wait, 30)
        assert rc == 1, rp.tail()
        message = _events(rp, "router_failed")[-1]["error"]
        assert str(path) in message
        assert "damaged" in message
        assert "501" in message
        assert "backup" in message
        assert path.read_bytes() == before  # left in place: the operator decides
        assert not list(path.parent.glob("*.damaged-*"))
