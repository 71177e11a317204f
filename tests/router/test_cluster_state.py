"""State that outlives a machine, on a 3-node cluster (issue 14): an instance's data folder is
deleted while it is down; the partitions it owned are restored from the cluster copy by the
instance that takes them, and again by the emptied instance when it rejoins and gets its share.

Real processes: three nats-server nodes, R3 streams and buckets, two router instances. Ends held
against the fold of EVENTS: every exception exactly once, every dead letter, every key's state,
each partition owned by exactly one live instance.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from router.jetstream.streams import partition_of
from router.workload import workload
from tests.router.test_cluster import ROUTER, STREAMS, check_outcome, events_of, routers, tails, wait_running
from tests.support.clusterload import AckedPublisher, connect, wait_one_owner_each
from tests.support.harness import wait_for
from tests.support.natscluster import NatsCluster
from tests.support.procs import write_config

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

DAY_US = 86_400_000_000


def this_run(rp: Any, name: str) -> list[dict[str, Any]]:
    """The `name` events of the process's current run (its log file holds every run's)."""
    text = rp.log_text()
    out = []
    for line in text[text.rfind("--- start ") :].splitlines():
        if f'"event": "{name}"' in line:
            out.append(json.loads(line))
    return out


async def every_partition_answers(url: str, messages: list[tuple[str, bytes]], within: float = 30.0) -> None:
    """Until a state query of one key of each partition is answered (its new owner serves it)."""
    probes: dict[int, str] = {}
    for subject, _data in messages:
        parts = subject.split(".")
        if len(parts) == 3 and parts[1] in ("sku", "shipment", "campaign"):
            probes.setdefault(partition_of(parts[2], ROUTER["partitions"]), f"router.state.{parts[1]}.{parts[2]}")
    nc = await connect(url)
    try:
        with anyio.fail_after(within):
            for subject in probes.values():
                while True:
                    try:
                        await nc.request(subject, b"", timeout=1.0)
                        break
                    except Exception:
                        await anyio.sleep(0.2)
    finally:
        await nc.close()


async def test_a_data_folder_lost_while_down_is_restored_from_the_cluster(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    c = nats_cluster
    url = c.urls[0]
    now_us = time.time_ns() // 1000 + DAY_US
    messages = list(workload(seed=51, count=10_000, bad_share=0.02, now_us=now_us))
    with routers(tmp_path, c.url, "ab") as procs:
        a, b = procs["a"], procs["b"]
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
                await pub.wait_sent(4_000)
                a.kill()
                shutil.rmtree(a.config_path.parent / "data")  # its disk is gone
            # b takes a's partitions once their leases lapse; its store never held them.
            await wait_one_owner_each(url, cfg, [b])
            await check_outcome(url, cfg, [b])
            restored_b = events_of(b, "state_restored_from_cluster")
            assert restored_b, b.tail(60)
            assert sum(e["actors"] for e in restored_b) > 0
            # a comes back with an empty data folder (a new instance): it gets a fair share,
            # restored from the cluster copy, and the load goes on.
            a.start()
            await wait_running(url, a)
            await wait_one_owner_each(url, cfg, [a, b])

            def a_ready() -> bool:
                # In this run of a (its log goes on from the first): its fair share (4 of 8)
                # taken, restored and running, and no hand-over under way.
                taken = len(this_run(a, "ownership_taken"))
                handing = len(events_of(b, "partition_handing_over")) - len(events_of(b, "partition_handed_over"))
                return taken >= 4 and len(this_run(a, "partition_ready")) >= taken and handing == 0

            await wait_for(a_ready, 60)
            await every_partition_answers(url, messages)
            restored_a = this_run(a, "state_restored_from_cluster")
            assert len(restored_a) >= 4, a.tail(60)
            exp = await check_outcome(url, cfg, [a, b])
            print(f"b restored {len(restored_b)} partitions ({sum(e['actors'] for e in restored_b)} actors), "
                  f"a restored {len(restored_a)} ({sum(e['actors'] for e in restored_a)} actors); {len(exp.states)} keys")
        except BaseException:
            print(tails(procs, 40))
            raise
