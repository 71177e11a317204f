"""A second `router run` against the same nats-server (its own data folder): it waits as a standby,
applies nothing while the first runs, takes over when the first is stopped, killed or frozen past
its lease, and a frozen owner that wakes up after losing its lease sends and writes nothing.

Real nats-server, real router processes; outcomes are held against the fold of EVENTS.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from router.workload import workload
from tests.support.procs import (
    RouterProcess,
    check_all_states,
    router_process,
    settle_process,
    settled_exactly_once,
    wait_healthy,
    write_config,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DAY_US = 86_400_000_000
LEASE_S = 3.0
ROUTER = {"lease": "3s", "lease_renew_every": "1s"}
# Past the lease: the standby's reading interval, its own start (consumer, marks) and a loaded machine.
TAKEOVER_MARGIN_S = 4.0


def future_messages(seed: int, count: int) -> list[tuple[str, bytes]]:
    """A seeded day whose timers lie a day ahead: every exception is implied by the stream."""
    now_us = time.time_ns() // 1000 + DAY_US
    return list(workload(seed=seed, count=count, bad_share=0.02, now_us=now_us))


async def publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url)
    try:
        for subject, data in messages:
            await nc.publish(subject, data)
        await nc.flush(timeout=10)
    finally:
        await nc.close()


def events_of(rp: RouterProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in rp.log_events() if e.get("event") == name]


def log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def wait_log(rp: RouterProcess, name: str, timeout: float, after: int = 0, **fields: Any) -> dict[str, Any]:
    """The first log event `name` (beyond the first `after` of them) with `fields`; fails when the router exits."""
    with anyio.fail_after(timeout):
        while True:
            found = [e for e in events_of(rp, name) if all(e.get(k) == v for k, v in fields.items())]
            if len(found) > after:
                return found[after]
            if not rp.running and rp.proc is not None and rp.proc.poll() is not None:
                raise AssertionError(f"router exited with {rp.proc.returncode}:\n{rp.tail()}")
            await anyio.sleep(0.05)


def store_marks(db: Path) -> dict[str, Any]:
    """What the store holds: partition marks, actors and their newest sequence (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        marks = conn.execute("SELECT partition, applied_seq, effects_seq FROM partitions ORDER BY 1").fetchall()
        actors = conn.execute("SELECT count(*), coalesce(max(last_seq), 0) FROM actors").fetchone()
    return {"marks": marks, "actors": actors}


def health_file(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "data" / "health.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def two_routers(tmp_path: Path, url: str, **router: Any) -> Iterator[tuple[RouterProcess, RouterProcess]]:
    settings = {**ROUTER, **router}
    write_config(tmp_path / "a" / "config.toml", url, router=settings)
    write_config(tmp_path / "b" / "config.toml", url, router=settings)
    with router_process(tmp_path / "a" / "config.toml") as a, router_process(
        tmp_path / "b" / "config.toml", start=False
    ) as b:
        yield a, b


async def start_standby(url: str, a: RouterProcess, b: RouterProcess, tmp_path: Path) -> str:
    """Start `a`, wait until it serves, start `b`, wait until it says it stands by for `a`; a's id."""
    await wait_healthy(url, a)
    a_id = (tmp_path / "a" / "data" / "instance.id").read_text().strip()
    b.start()
    standby = await wait_log(b, "ownership_standby", timeout=20)
    assert standby["owner"] == a_id, standby
    return a_id


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_second_router_stands_by_then_takes_over(nats_server: Any, tmp_path: Path, how: str) -> None:
    url = nats_server.url
    cfg = write_config(tmp_path / "a" / "config.toml", url, router=ROUTER)
    messages = future_messages(seed=5, count=12_000)
    first, second = messages[:6_000], messages[6_000:]
    with two_routers(tmp_path, url) as (a, b):
        try:
            await start_standby(url, a, b, tmp_path)
            await publish(url, first)
            await settle_process(url, cfg, a)
            # The standby applied nothing, answers no state query and holds no partition.
            assert not events_of(b, "partition_ready"), b.tail()
            assert store_marks(tmp_path / "b" / "data" / "router.db")["marks"] == []
            hb = health_file(tmp_path / "b")
            assert hb.get("role") == "standby", hb
            assert hb.get("partitions") == [], hb
            exp = await settled_exactly_once(url, cfg, a)  # every reply the fold's: none came from b
            assert exp.exception_ids

            # The owner goes away while events keep coming.
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish, url, second)
                await anyio.sleep(0.2)
                gone = time.time()
                if how == "SIGKILL":
                    a.kill()
                else:
                    rc, _took = await anyio.to_thread.run_sync(a.terminate, 15.0)
                    assert rc == 0, a.tail()
            taken = await wait_log(b, "ownership_taken", timeout=LEASE_S + TAKEOVER_MARGIN_S + 10)
            ready = await wait_log(b, "partition_ready", timeout=30)
            takeover_s = log_time(taken) - gone
            serving_s = log_time(ready) - gone
            print(f"{how}: taken over after {takeover_s:.2f}s, partition ready after {serving_s:.2f}s")
            if how == "SIGKILL":
                assert taken["reason"] == "lapsed", taken
                assert takeover_s <= LEASE_S + TAKEOVER_MARGIN_S, takeover_s
            else:
                assert taken["reason"] == "released", taken
                assert takeover_s <= 2.0, takeover_s  # handed over: no lease to wait out
            exp = await settled_exactly_once(url, cfg, b, timeout=90)
            assert exp.exception_ids
            assert len(exp.states) > 100
        except BaseException:
            print("--- a\n" + a.tail(40) + "\n--- b\n" + b.tail(40))
            raise


async def test_frozen_owner_sends_and_writes_nothing_after_losing_its_lease(nats_server: Any, tmp_path: Path) -> None:
    url = nats_server.url
    cfg = write_config(tmp_path / "a" / "config.toml", url, router=ROUTER)
    messages = future_messages(seed=8, count=10_000)
    first, second = messages[:5_000], messages[5_000:]
    a_db = tmp_path / "a" / "data" / "router.db"
    with two_routers(tmp_path, url) as (a, b):
        try:
            a_id = await start_standby(url, a, b, tmp_path)
            b_id = (tmp_path / "b" / "data" / "instance.id").read_text().strip()
            await publish(url, first)
            await settle_process(url, cfg, a)

            # Freeze the owner, and at once give it more to do: its open pull requests take some
            # of these into its socket, to be found when it wakes up.
            assert a.proc is not None
            a.proc.send_signal(signal.SIGSTOP)
            frozen = time.time()
            await publish(url, second)
            taken = await wait_log(b, "ownership_taken", timeout=LEASE_S + TAKEOVER_MARGIN_S + 10)
            assert taken["reason"] == "lapsed", taken
            print(f"SIGSTOP: taken over after {log_time(taken) - frozen:.2f}s")
            await settle_process(url, cfg, b, timeout=90)
            before = store_marks(a_db)

            # Everything the old owner could send, seen on the wire (not only what the streams keep).
            seen: list[tuple[str, str]] = []
            nc = await nats.connect(url)
            try:

                async def on_msg(msg: Any) -> None:
                    seen.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", "")))

                for subject in ("exceptions.>", "deadletter.>", "events.>"):
                    await nc.subscribe(subject, cb=on_msg)
                await nc.flush()
                a.proc.send_signal(signal.SIGCONT)
                lost = await wait_log(a, "ownership_lost", timeout=15)
                back = await wait_log(a, "ownership_standby", timeout=15)
                assert back["owner"] == b_id, back
                # It runs again: its health file is rewritten as a standby's.
                with anyio.fail_after(10):
                    while health_file(tmp_path / "a").get("role") != "standby":
                        await anyio.sleep(0.05)
                await nc.flush()
            finally:
                await nc.close()
            fenced = events_of(a, "partition_fenced")
            print(f"old owner after SIGCONT: {lost}, {fenced}")
            assert not seen, f"the old owner published {len(seen)} messages after losing its lease: {seen[:5]}"
            assert store_marks(a_db) == before, "the old owner wrote its store after losing its lease"
            # It had work in hand when it woke (else this test proves little).
            assert sum(int(e.get("queued", 0)) for e in fenced) > 0, fenced
            assert a.running
            assert b.running
            exp = await settled_exactly_once(url, cfg, b, timeout=60)
            assert exp.exception_ids
            await check_all_states(url, exp)  # b answers alone: a standby answers no state query
            assert a_id != b_id
        except BaseException:
            with contextlib.suppress(Exception):
                assert a.proc is not None
                a.proc.send_signal(signal.SIGCONT)
            print("--- a\n" + a.tail(60) + "\n--- b\n" + b.tail(40))
            raise


async def test_same_data_folder_is_refused(nats_server: Any, tmp_path: Path) -> None:
    write_config(tmp_path / "config.toml", nats_server.url, router=ROUTER)
    with router_process(tmp_path / "config.toml") as a:
        await wait_healthy(nats_server.url, a)
        second = RouterProcess(tmp_path / "config.toml", log_path=tmp_path / "second.log")
        try:
            second.start()
            rc = await anyio.to_thread.run_sync(second.wait, 20.0)
            assert rc == 1, second.tail()
            assert "another router" in second.log_text()
            assert "data folder" in second.log_text()
        finally:
            second.close()
        assert a.running


async def test_a_router_whose_record_is_taken_steps_down_and_stays_up(nats_server: Any, tmp_path: Path) -> None:
    """Another instance's compare-and-set on the record (written here by hand) while the router idles:
    it notices at its next renewal, abandons its partition, stands by for the new owner, and
    takes the partition back once that owner releases it."""
    from router.jetstream.ownership import OwnerRecord, OwnershipBucket

    url = nats_server.url
    write_config(tmp_path / "config.toml", url, router=ROUTER)
    with router_process(tmp_path / "config.toml") as rp:
        try:
            await wait_healthy(url, rp)
            nc = await nats.connect(url)
            try:
                bucket = await OwnershipBucket.open(nc, "router_owners", replicas=1, io_timeout=2.0)
                held = await bucket.read(0)
                assert held is not None
                assert held.record.owner == (tmp_path / "data" / "instance.id").read_text().strip()
                intruder = OwnerRecord(owner="intruder", epoch=held.record.epoch + 1, lease_s=LEASE_S)
                for _ in range(20):  # the router renews meanwhile: read again and retry
                    try:
                        rev = await bucket.replace(0, intruder, held.revision)
                        break
                    except Exception:
                        held = await bucket.read(0)
                        assert held is not None
                else:
                    raise AssertionError("could not write the record")
                lost = await wait_log(rp, "ownership_lost", timeout=10)
                assert lost["reason"] == "taken", lost
                fenced = await wait_log(rp, "partition_fenced", timeout=10)
                assert fenced["epoch"] == intruder.epoch - 1
                standby = await wait_log(rp, "ownership_standby", timeout=10)
                assert standby["owner"] == "intruder"
                with anyio.fail_after(10):
                    while health_file(tmp_path).get("role") != "standby":
                        await anyio.sleep(0.05)
                assert rp.running, rp.tail()
                await bucket.replace(
                    0, OwnerRecord(owner="intruder", epoch=intruder.epoch, state="released"), rev
                )
                taken = await wait_log(rp, "ownership_taken", timeout=10, after=1)
                assert (taken["reason"], taken["epoch"]) == ("released", intruder.epoch + 1)
                await wait_healthy(url, rp)
            finally:
                await nc.close()
        except BaseException:
            print(rp.tail(40))
            raise
