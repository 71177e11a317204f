"""Cluster tests' helpers: a producer that rides through leader elections, settling several router
instances, and the check that every partition has exactly one live owner.

The producer publishes through JetStream (each message waits for the stream's ack) with a
`Nats-Msg-Id` per message, and publishes a message again until it is acknowledged: while a
stream leader is being elected, a plain publish would be dropped, and the stream's duplicate
window keeps a retried message from being stored twice. What is stored is then exactly the
workload, whatever the cluster went through.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import nats

from contracts.config import Config
from router.jetstream.ownership import OwnerRecord, OwnershipBucket, bucket_name
from router.jetstream.streams import consumer_name
from tests.support.procs import RouterProcess

REQUEST_TIMEOUT = 2.0


async def _quiet(*_args: Any) -> None:
    """Connection callbacks of test clients: a server going away is part of the test."""


async def connect(url: str) -> Any:
    return await nats.connect(
        url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet,
        disconnected_cb=_quiet, reconnected_cb=_quiet, connect_timeout=2,
    )


class AckedPublisher:
    """JetStream publishes in concurrent windows, each retried until acknowledged (see the module)."""

    def __init__(self, url: str, messages: list[tuple[str, bytes]], *, prefix: str = "load") -> None:
        self.url = url
        self.messages = messages
        self.prefix = prefix
        self.sent = 0  # acknowledged, in order of the workload (a window at a time)
        self.retries = 0
        self.done = anyio.Event()

    async def wait_sent(self, n: int, timeout: float = 60.0) -> None:
        """Until at least `n` messages were acknowledged (a task of the same group runs `run`)."""
        with anyio.fail_after(timeout):
            while self.sent < n:
                await anyio.sleep(0.05)

    async def run(self, window: int = 200, gap: float = 0.05, *, until: int | None = None) -> None:
        """Publish messages `sent`..`until` (default all), `window` at a time with `gap` between."""
        end = len(self.messages) if until is None else until
        nc = await connect(self.url)
        js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        try:
            while self.sent < end:
                upto = min(self.sent + window, end)
                batch = list(range(self.sent, upto))
                while batch:
                    failed: list[int] = []

                    async def one(i: int, failed: list[int] = failed) -> None:
                        subject, data = self.messages[i]
                        try:
                            await js.publish(subject, data, headers={"Nats-Msg-Id": f"{self.prefix}-{i}"})
                        except Exception:
                            failed.append(i)

                    async with anyio.create_task_group() as tg:
                        for i in batch:
                            tg.start_soon(one, i)
                    if failed:
                        self.retries += len(failed)
                        await anyio.sleep(0.2)
                    batch = sorted(failed)
                self.sent = upto
                await anyio.sleep(gap)
        finally:
            await nc.close()
            if self.sent >= len(self.messages):
                self.done.set()


async def instance_health(nc: Any, instance: str) -> dict[str, Any] | None:
    """`router.health.<instance>`, or None when that instance does not answer."""
    try:
        reply = await nc.request(f"router.health.{instance}", b"", timeout=1.0)
        return json.loads(reply.data)  # type: ignore[no-any-return]
    except Exception:
        return None


def instance_id(rp: RouterProcess) -> str:
    return (rp.config_path.parent / "data" / "instance.id").read_text().strip()


async def owner_records(nc: Any, cfg: Config) -> dict[int, OwnerRecord | None]:
    bucket = await OwnershipBucket.open(nc, bucket_name(cfg.router.consumer), replicas=3, io_timeout=REQUEST_TIMEOUT)
    out: dict[int, OwnerRecord | None] = {}
    for p in range(cfg.router.partitions):
        held = await bucket.read(p)
        out[p] = held.record if held is not None else None
    return out


async def ownership_problems(nc: Any, cfg: Config, live: list[RouterProcess]) -> list[str]:
    """What keeps the partitions from having exactly one live owner each; [] when they do.

    Each partition's record is held by one of the live instances, each live instance's health
    says it owns exactly the partitions the records give it, and no two claim the same one."""
    ids = {instance_id(rp): rp for rp in live}
    problems: list[str] = []
    try:
        records = await owner_records(nc, cfg)
    except Exception as exc:
        return [f"records unreadable: {exc!r}"]
    claimed: dict[int, list[str]] = {p: [] for p in range(cfg.router.partitions)}
    for inst in ids:
        h = await instance_health(nc, inst)
        if h is None:
            problems.append(f"{inst} does not answer")
            continue
        for p in h.get("owned", []):
            claimed[p].append(inst)
    for p, rec in records.items():
        if rec is None or rec.state != "held":
            problems.append(f"partition {p}: record {rec}")
        elif rec.owner not in ids:
            problems.append(f"partition {p}: held by {rec.owner}, not a live instance")
        if claimed[p] != ([rec.owner] if rec is not None else []):
            problems.append(f"partition {p}: record names {rec.owner if rec else None}, owned by {claimed[p]}")
    return problems


async def wait_one_owner_each(url: str, cfg: Config, live: list[RouterProcess], timeout: float = 60.0) -> None:
    nc = await connect(url)
    problems: list[str] = []
    try:
        with anyio.move_on_after(timeout):
            while True:
                for rp in live:
                    assert rp.running, f"router exited:\n{rp.tail()}"
                problems = await ownership_problems(nc, cfg, live)
                if not problems:
                    return
                await anyio.sleep(0.2)
    finally:
        await nc.close()
    raise AssertionError(f"partitions without exactly one live owner after {timeout}s: {problems[:8]}")


async def settle_cluster(url: str, cfg: Config, live: list[RouterProcess], timeout: float = 90.0) -> None:
    """Until every partition's consumer delivered everything and had it acknowledged (the router
    acknowledges once an event's effects are confirmed), no live instance has a publish
    unconfirmed, and EVENTS stopped growing (actor messages the routers publish included)."""
    nc = await connect(url)
    try:
        jsm = nc.jetstream(timeout=REQUEST_TIMEOUT)
        quiet = 0
        last_seen = -1
        with anyio.fail_after(timeout):
            while True:
                for rp in live:
                    assert rp.running, f"router exited:\n{rp.tail()}"
                done = True
                try:
                    last = int((await jsm.stream_info(cfg.streams.events)).state.last_seq or 0)
                    for p in range(cfg.router.partitions):
                        info = await jsm.consumer_info(cfg.streams.events, consumer_name(cfg, p))
                        if info.num_pending or info.num_ack_pending:
                            done = False
                            break
                except Exception:
                    done, last = False, -2
                if done:
                    for rp in live:
                        h = await instance_health(nc, instance_id(rp))
                        if h is None or h.get("unconfirmed_publishes") != 0:
                            done = False
                            break
                quiet = quiet + 1 if done and last == last_seen else 0
                last_seen = last
                if quiet >= 3:
                    return
                await anyio.sleep(0.2)
    finally:
        await nc.close()
