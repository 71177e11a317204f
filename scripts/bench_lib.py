"""Benchmark building blocks: a private nats-server, workloads, and the raw baselines the router is held to."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.embedded import find_nats_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A JetStream nats-server of the benchmark's own, on a free loopback port and a temporary store."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ops-router-bench-"))
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.dir / "js")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def brand_day(
    n: int, *, skus: int = 20_000, shipments: int = 10_000, campaigns: int = 200, seed: int = 1, t0_us: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """A realistic mix: stock sits in the tens to hundreds, most shipments move on time, so
    exceptions are a few percent of events (with some firing)."""
    rng = random.Random(seed)
    t0 = t0_us if t0_us is not None else (time.time_ns() // 1000 - 3_600_000_000)
    locs = ["BLR-DS-4", "DEL-WH-1", "MUM-DS-2", "HYD-DS-1"]
    enc = msgspec.json.encode

    def ts(i: int) -> str:
        us = t0 + i * 1000
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us / 1e6)) + ".%06dZ" % (us % 1_000_000)

    for c in range(campaigns):
        linked = [f"SKU-{rng.randrange(skus)}" for _ in range(5)]
        yield f"events.campaign.CAMP-{c}", enc(
            {"type": "started", "skus": linked, "cpa_limit": 40.0, "budget": 5000.0, "ts": ts(0)}
        )
    for s in range(skus):
        yield f"events.sku.SKU-{s}", enc({"type": "received", "location": locs[s % 4], "qty": rng.randint(40, 400), "ts": ts(0)})
    for i in range(max(0, n - skus - campaigns)):
        r = rng.random()
        t = ts(i)
        if r < 0.55:
            s = rng.randrange(skus)
            loc = locs[s % 4]
            r2 = rng.random()
            if r2 < 0.5:
                body = {"type": "ordered", "location": loc, "qty": 1, "order_id": f"o{i}", "ts": t}
            elif r2 < 0.9:
                body = {"type": "picked", "location": loc, "qty": 1, "ts": t}
            elif r2 < 0.97:
                body = {"type": "received", "location": loc, "qty": rng.randint(5, 50), "ts": t}
            else:
                body = {"type": "returned", "location": loc, "qty": 1, "ts": t}
            yield f"events.sku.SKU-{s}", enc(body)
        elif r < 0.9:
            sh = rng.randrange(shipments)
            r2 = rng.random()
            if r2 < 0.2:
                body = {"type": "booked", "promised_by": ts(i + 172_800_000_000 // 1000), "carrier": "BlueDart", "ts": t}
            elif r2 < 0.75:
                body = {"type": "in_transit", "location": "HUB", "ts": t}
            elif r2 < 0.8:
                body = {"type": "delayed", "eta": ts(i + 86_400_000), "ts": t}
            elif r2 < 0.9:
                body = {"type": "temperature", "celsius": round(rng.uniform(2, 7.5), 1), "ts": t}
            else:
                body = {"type": "delivered", "ts": t}
            yield f"events.shipment.SH-{sh}", enc(body)
        else:
            c = rng.randrange(campaigns)
            if rng.random() < 0.8:
                body = {"type": "spend", "amount": round(rng.uniform(1, 20), 2), "ts": t}
            else:
                body = {"type": "conversion", "count": 1, "revenue": 25.0, "ts": t}
            yield f"events.campaign.CAMP-{c}", enc(body)


async def publish_core(url: str, msgs: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    try:
        for subject, data in msgs:
            await nc.publish(subject, data)
        await nc.flush(timeout=60)
    finally:
        await nc.close()


async def reset_streams(url: str) -> None:
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        for name in ("EVENTS", "EXCEPTIONS", "DEADLETTER"):
            try:
                await jsm.delete_stream(name)
            except Exception:
                pass
        from nats.js import api

        await jsm.add_stream(api.StreamConfig(name="EVENTS", subjects=["events.>"], storage=api.StorageType.FILE,
                                              duplicate_window=600.0, allow_direct=True))
    finally:
        await nc.close()


async def wait_stored(url: str, stream: str, count: int, timeout: float = 120) -> None:
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(timeout):
            while True:
                info = await nc.jsm().stream_info(stream)
                if (info.state.last_seq or 0) >= count:
                    return
                await anyio.sleep(0.05)
    finally:
        await nc.close()


async def raw_pull_consumer(url: str, stream: str, count: int, batch: int = 2000) -> float:
    """The baseline: a hand-driven pull consumer that decodes each message, updates a dict and acks
    cumulatively. Returns messages per second over `count` messages."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    jsm = nc.jsm()
    from nats.js import api

    name = f"baseline{random.randrange(1 << 30)}"
    await jsm.add_consumer(stream, api.ConsumerConfig(durable_name=name, ack_policy=api.AckPolicy.ALL,
                                                      max_ack_pending=100_000, deliver_policy=api.DeliverPolicy.ALL))
    inbox = nc.new_inbox()
    state: dict[str, Any] = {}
    seen = 0
    done = anyio.Event()
    outstanding = 0
    decode = msgspec.json.decode
    last_reply = ""

    async def pull() -> None:
        nonlocal outstanding
        outstanding += batch
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                         json.dumps({"batch": batch, "expires": 2_000_000_000}).encode(), reply=inbox)

    async def cb(msg: Any) -> None:
        nonlocal seen, outstanding, last_reply
        if not msg.reply:
            outstanding = 0
            await pull()
            return
        outstanding -= 1
        seen += 1
        obj = decode(msg.data)
        state[msg.subject] = obj
        last_reply = msg.reply
        if seen % 1000 == 0:
            await nc.publish(last_reply, b"+ACK")
        if outstanding <= batch // 2:
            await pull()
        if seen >= count:
            await nc.publish(last_reply, b"+ACK")
            done.set()

    await nc.subscribe(inbox, cb=cb, pending_msgs_limit=0, pending_bytes_limit=0)
    t0 = time.perf_counter()
    await pull()
    await pull()
    await done.wait()
    elapsed = time.perf_counter() - t0
    await jsm.delete_consumer(stream, name)
    await nc.close()
    return count / elapsed


def rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
