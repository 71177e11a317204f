"""Several router instances on a 3-node nats-server cluster with R3 streams (real processes).

Each test ends held against the fold of EVENTS (tests/support/oracle.py): every exception
exactly once, every dead letter, every key's state as the fold says, answered by the key's
owner; and every partition owned by exactly one live instance.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from router.workload import workload
from tests.support.clusterload import (
    AckedPublisher,
    connect,
    instance_health,
    instance_id,
    settle_cluster,
    wait_one_owner_each,
)
from tests.support.natscluster import NatsCluster
from tests.support.oracle import read_stream
from tests.support.procs import RouterProcess, assert_exactly_once, check_all_states, write_config

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

DAY_US = 86_400_000_000
PARTITIONS = 8
ROUTER = {"partitions": PARTITIONS, "lease": "3s", "lease_renew_every": "1s"}
STREAMS = {"replicas": 3}


def future_messages(seed: int, count: int) -> list[tuple[str, bytes]]:
    """A seeded day whose timers lie a day ahead: every exception is implied by the stream."""
    now_us = time.time_ns() // 1000 + DAY_US
    return list(workload(seed=seed, count=count, bad_share=0.02, now_us=now_us))


@contextlib.contextmanager
def routers(tmp_path: Path, url: str, names: str) -> Iterator[dict[str, RouterProcess]]:
    """One config (its own data folder) per name; none started; every one killed at the end."""
    procs: dict[str, RouterProcess] = {}
    try:
        for name in names:
            path = tmp_path / name / "config.toml"
            write_config(path, url, router=ROUTER, streams=STREAMS)
            procs[name] = RouterProcess(path)
        yield procs
    finally:
        for rp in procs.values():
            with contextlib.suppress(Exception):
                if rp.proc is not None and rp.proc.poll() is None:
                    rp.proc.send_signal(signal.SIGCONT)
            rp.close()


def events_of(rp: RouterProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in rp.log_events() if e.get("event") == name]


async def wait_running(url: str, rp: RouterProcess, timeout: float = 40.0) -> str:
    """Until `rp` answers on router.health.<its id>; its id."""
    nc = await connect(url)
    try:
        with anyio.fail_after(timeout):
            while True:
                assert rp.running, f"router exited:\n{rp.tail()}"
                inst = instance_id(rp) if (rp.config_path.parent / "data" / "instance.id").exists() else ""
                if inst:
                    with contextlib.suppress(Exception):
                        reply = await nc.request(f"router.health.{inst}", b"", timeout=1.0)
                        if json.loads(reply.data).get("status") == "ok":
                            return inst
                await anyio.sleep(0.1)
    finally:
        await nc.close()


async def check_outcome(url: str, cfg: Any, live: list[RouterProcess]) -> Any:
    await settle_cluster(url, cfg, live)
    await wait_one_owner_each(url, cfg, live)
    exp = await assert_exactly_once(url, cfg)
    await check_all_states(url, exp)
    assert exp.exception_ids
    return exp


def tails(procs: dict[str, RouterProcess], lines: int = 30) -> str:
    return "\n".join(f"--- {n}\n{rp.tail(lines)}" for n, rp in procs.items())


async def test_one_instance_rides_through_the_stream_leader_killed(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    """The node leading EVENTS is SIGKILLed under load: the router neither exits nor stalls, and
    applies everything once the stream has a new leader; the node comes back and catches up."""
    c = nats_cluster
    messages = future_messages(seed=21, count=8_000)
    with routers(tmp_path, c.url, "a") as procs:
        a = procs["a"]
        try:
            a.start()
            await wait_running(c.urls[0], a)
            pub = AckedPublisher(c.url, messages)
            await pub.run(until=3_000)
            leader = await c.stream_leader("EVENTS")
            async with anyio.create_task_group() as tg:
                tg.start_soon(pub.run)
                await anyio.sleep(0.3)
                c.kill(leader)
            alive = c.urls[(leader + 1) % 3]
            await check_outcome(alive, write_config(a.config_path, c.url, router=ROUTER, streams=STREAMS), [a])
            assert a.running
            c.start_node(leader)
            print(f"EVENTS leader n{leader} killed; publisher retried {pub.retries}")
        except BaseException:
            print(tails(procs))
            raise


async def test_instances_share_partitions_one_dies_another_joins(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    """Two instances split the partitions; under steady load one is SIGKILLed (the other takes its
    partitions once their leases lapse) and a third joins (it gets a fair share handed over)."""
    c = nats_cluster
    url = c.urls[0]
    messages = future_messages(seed=22, count=12_000)
    with routers(tmp_path, c.url, "abc") as procs:
        a, b, third = procs["a"], procs["b"], procs["c"]
        cfg = write_config(a.config_path, c.url, router=ROUTER, streams=STREAMS)
        try:
            a.start()
            b.start()
            await wait_running(url, a)
            await wait_running(url, b)
            await wait_one_owner_each(url, cfg, [a, b])
            pub = AckedPublisher(c.url, messages)
            async with anyio.create_task_group() as tg:
                tg.start_soon(pub.run, 200, 0.1)
                await pub.wait_sent(3_000)
                a.kill()
                killed = time.time()
                await pub.wait_sent(6_000)
                third.start()
            await wait_one_owner_each(url, cfg, [b, third])
            exp = await check_outcome(url, cfg, [b, third])
            # The dead instance's partitions lapsed and were taken (by b, or by the one that joined
            # meanwhile: whichever was below its share when the leases ran out).
            taken = [e for rp in (b, third) for e in events_of(rp, "ownership_taken") if e.get("reason") == "lapsed"]
            assert taken, tails(procs)
            got = Counter(e["partition"] for e in events_of(third, "ownership_taken"))
            assert 3 <= len(got) <= 5, got  # a fair share of 8 over two
            print(f"lapsed partitions taken {min(_ts(e) for e in taken) - killed:.2f}s after the SIGKILL; "
                  f"{len(exp.states)} keys")
        except BaseException:
            print(tails(procs))
            raise


async def test_a_node_and_the_stream_leader_killed_under_two_instances(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Two instances under load; the EVENTS leader node is SIGKILLed, later another node too after
    the first came back: both instances ride through, nothing is lost or applied twice."""
    c = nats_cluster
    messages = future_messages(seed=23, count=10_000)
    with routers(tmp_path, c.url, "ab") as procs:
        a, b = procs["a"], procs["b"]
        cfg = write_config(a.config_path, c.url, router=ROUTER, streams=STREAMS)
        try:
            a.start()
            b.start()
            await wait_running(c.urls[0], a)
            await wait_running(c.urls[0], b)
            pub = AckedPublisher(c.url, messages)
            async with anyio.create_task_group() as tg:
                tg.start_soon(pub.run, 200, 0.05)
                await pub.wait_sent(3_000)
                leader = await c.stream_leader("EVENTS")
                c.kill(leader)
                await pub.wait_sent(6_000, timeout=90)
                await anyio.to_thread.run_sync(c.start_node, leader)
                other = (leader + 1) % 3
                c.kill(other)
                await pub.wait_sent(8_000, timeout=90)
                await anyio.to_thread.run_sync(c.start_node, other)
            alive = c.urls[(other + 1) % 3]
            await check_outcome(alive, cfg, [a, b])
            print(f"killed n{leader} (EVENTS leader) then n{other}; publisher retried {pub.retries}")
        except BaseException:
            print(tails(procs))
            raise


async def test_a_frozen_instance_publishes_nothing_for_the_partitions_it_lost(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Three instances; one is frozen (SIGSTOP) with deliveries in its socket for longer than its
    lease: the others take its partitions; resumed, it publishes and writes nothing for them
    (seen on the wire), logs them fenced, and is given a share again."""
    c = nats_cluster
    url = c.urls[0]
    messages = future_messages(seed=24, count=9_000)
    with routers(tmp_path, c.url, "abc") as procs:
        a, b, third = procs["a"], procs["b"], procs["c"]
        cfg = write_config(a.config_path, c.url, router=ROUTER, streams=STREAMS)
        try:
            for rp in procs.values():
                rp.start()
            for rp in procs.values():
                await wait_running(url, rp)
            await wait_one_owner_each(url, cfg, [a, b, third])
            pub = AckedPublisher(c.url, messages)
            await pub.run(until=4_000)
            await settle_cluster(url, cfg, [a, b, third])
            nc = await connect(url)
            try:
                ha = await instance_health(nc, instance_id(a))
            finally:
                await nc.close()
            assert ha is not None
            a_owned = ha["owned"]
            assert a_owned, ha
            assert a.proc is not None
            a.proc.send_signal(signal.SIGSTOP)
            frozen = time.time()
            await pub.run()  # its open pull requests take some of these into its socket
            await wait_one_owner_each(url, cfg, [b, third], timeout=60)
            await settle_cluster(url, cfg, [b, third])
            print(f"frozen owner's partitions taken over within {time.time() - frozen:.1f}s")

            seen: list[tuple[str, str]] = []
            nc = await connect(url)
            try:

                async def on_msg(msg: Any) -> None:
                    seen.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id", "")))

                for subject in ("exceptions.>", "deadletter.>", "events.>"):
                    await nc.subscribe(subject, cb=on_msg)
                await nc.flush()
                a.proc.send_signal(signal.SIGCONT)
                with anyio.fail_after(20):
                    while len(events_of(a, "partition_fenced")) < 1:
                        await anyio.sleep(0.05)
                # It comes back and is handed a share again; nothing new was published meanwhile,
                # so none of the three has anything to send.
                await wait_one_owner_each(url, cfg, [a, b, third], timeout=60)
                await nc.flush()
            finally:
                await nc.close()
            fenced = events_of(a, "partition_fenced")
            assert not seen, f"published after the old owner woke: {len(seen)}, e.g. {seen[:5]}"
            assert sum(int(e.get("queued", 0)) for e in fenced) > 0, fenced
            assert {e["partition"] for e in fenced} <= set(a_owned), (fenced, a_owned)
            exp = await check_outcome(url, cfg, [a, b, third])
            ids = Counter(json.loads(m.data)["id"] for m in await read_stream(url, cfg.streams.exceptions))
            assert max(ids.values()) == 1
            assert len(exp.states) > 100
        except BaseException:
            with contextlib.suppress(Exception):
                assert a.proc is not None
                a.proc.send_signal(signal.SIGCONT)
            print(tails(procs))
            raise


async def test_graceful_stop_hands_partitions_over(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    """SIGTERM of one of two instances: its partitions are released after their final snapshots
    and taken at once (no lease to wait out) by the other, which ends owning all."""
    c = nats_cluster
    url = c.urls[0]
    messages = future_messages(seed=25, count=6_000)
    with routers(tmp_path, c.url, "ab") as procs:
        a, b = procs["a"], procs["b"]
        cfg = write_config(a.config_path, c.url, router=ROUTER, streams=STREAMS)
        try:
            a.start()
            await wait_running(url, a)
            b.start()
            await wait_running(url, b)
            await wait_one_owner_each(url, cfg, [a, b])
            pub = AckedPublisher(c.url, messages)
            async with anyio.create_task_group() as tg:
                tg.start_soon(pub.run, 200, 0.05)
                await pub.wait_sent(3_000)
                rc, took = await anyio.to_thread.run_sync(a.terminate, 20.0)
                assert rc == 0, a.tail()
            released = {e["partition"] for e in events_of(a, "ownership_released")}
            assert released, a.tail()
            await wait_one_owner_each(url, cfg, [b], timeout=20)
            taken = {e["partition"]: e for e in events_of(b, "ownership_taken")}
            assert all(taken[p]["reason"] == "released" for p in released), taken
            await check_outcome(url, cfg, [b])
            print(f"SIGTERM took {took:.2f}s; {len(released)} partitions handed over")
        except BaseException:
            print(tails(procs))
            raise


def _ts(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()
