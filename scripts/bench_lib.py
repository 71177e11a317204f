"""Benchmark building blocks: a private nats-server, workloads, the raw baselines, and the child processes.

`scripts/bench.py` drives the scenarios. The router and the raw consumers it is compared
with each run in a child process of their own, started as `python scripts/bench_lib.py
<host|raw-echo|raw-catchup> ...`; they speak one JSON object per line on stdin/stdout and
report times as `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contracts.times import rfc3339  # noqa: E402
from router.jetstream.embedded import find_nats_server  # noqa: E402

LOCS = ["BLR-DS-4", "DEL-WH-1", "MUM-DS-2", "HYD-DS-1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_version() -> str:
    try:
        out = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or out.stderr.strip()
    except Exception as exc:  # informational only
        return f"unknown ({exc!r})"


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
        self.stop()
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------- workloads


def brand_day(
    n: int, *, skus: int = 20_000, shipments: int = 10_000, campaigns: int = 200, seed: int = 1, t0_us: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """A realistic mix: stock sits in the tens to hundreds (a tail of SKUs nearly sold out),
    most shipments move on time (a few are delayed past their promise or leave their cold
    chain's range), campaigns spend around their CPA limit: exceptions are about 2% of
    events (measured with the actors: low_stock, stockout, oversold, sla_at_risk,
    temperature_excursion, cpa_exceeded, promoting_out_of_stock)."""
    rng = random.Random(seed)
    t0 = t0_us if t0_us is not None else (time.time_ns() // 1000 - 3_600_000_000)
    locs = LOCS
    enc = msgspec.json.encode

    def ts(i: int) -> str:
        us = t0 + i * 1000
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us / 1e6)) + f".{us % 1_000_000:06d}Z"

    day = 86_400_000  # in steps of ts(): 1 ms each
    for c in range(campaigns):
        linked = [f"SKU-{rng.randrange(skus)}" for _ in range(5)]
        yield f"events.campaign.CAMP-{c}", enc(
            {"type": "started", "skus": linked, "cpa_limit": 40.0, "budget": 5000.0, "ts": ts(0)}
        )
    for s in range(skus):
        qty = rng.randint(40, 400) if rng.random() < 0.85 else rng.randint(3, 15)
        yield f"events.sku.SKU-{s}", enc({"type": "received", "location": locs[s % 4], "qty": qty, "ts": ts(0)})
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
                body = {"type": "booked", "promised_by": ts(i + 2 * day), "carrier": "BlueDart", "ts": t}
                if sh % 5 == 0:  # cold chain
                    body["temp_min"], body["temp_max"] = 2.0, 8.0
            elif r2 < 0.75:
                body = {"type": "in_transit", "location": "HUB", "ts": t}
            elif r2 < 0.8:
                late = rng.random() < 0.4
                body = {"type": "delayed", "eta": ts(i + (3 if late else 1) * day), "ts": t}
            elif r2 < 0.9:
                body = {"type": "temperature", "celsius": round(rng.uniform(2, 8.6), 1), "ts": t}
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


def alert_heavy(n: int, *, seed: int = 1, alert_keys: int = 5_000, **mix: int) -> Iterator[tuple[str, bytes]]:
    """Every other event is a brand_day() event; the others are `counted` levels that flip
    between 0 and 100 at one location of `alert_keys` SKUs (`ALERT-<j>`), so each of them
    raises or clears stockout and low_stock: about one exception per event on average."""
    base = brand_day(n - n // 2, seed=seed, **mix)
    a = 0
    for i in range(n):
        if i % 2 == 0:
            yield next(base)
            continue
        j = a % alert_keys
        level = 0 if (a // alert_keys) % 2 == 0 else 100
        a += 1
        yield f"events.sku.ALERT-{j}", b'{"type":"counted","location":"BLR-DS-4","on_hand":%d}' % level


def received_qty(i: int) -> int:
    """The quantity distinct_keys() sends to SKU-<i>: what its on_hand is after that one event."""
    return 1 + i % 50


def distinct_keys(n: int, *, start: int = 0) -> Iterator[tuple[str, bytes]]:
    """One `received` event for each of SKU-<start>..SKU-<start+n-1> (on_hand = received_qty(i))."""
    for i in range(start, start + n):
        yield f"events.sku.SKU-{i}", b'{"type":"received","location":"DEL-WH-1","qty":%d}' % received_qty(i)


class LatencyMix:
    """The events of a latency window: a share of them flip a stockout, the rest raise nothing.

    An alert event is a `counted` level that alternates between 0 and 100 at one location of
    `<prefix>-A<j>`, so it raises (or clears) two exceptions: stockout and low_stock. The
    others are stock receipts, shipments in transit and campaign conversions that cross no
    threshold. Every event carries `ts` = the wall-clock time it is published (microseconds),
    which the router copies into each exception's `event_ts`.
    """

    EXCEPTIONS_PER_ALERT = 2

    def __init__(self, alert_share: float = 0.1, seed: int = 3, prefix: str = "LAT", *, alert_keys: int = 1_000,
                 skus: int = 20_000, shipments: int = 10_000, campaigns: int = 200) -> None:
        self.rng = random.Random(seed)
        self.alert_share = alert_share
        self.alert_keys = alert_keys
        self.skus, self.shipments, self.campaigns = skus, shipments, campaigns
        self.prefix = prefix
        self.alerts = 0
        self.sent = 0

    def prewarm(self) -> list[tuple[str, bytes]]:
        """One quiet event for every key next() uses (alert keys at level 100), so that a window
        measures the steady state, not the creation of its keys."""
        p = self.prefix
        out = [(f"events.sku.{p}-A{j}", b'{"type":"counted","location":"BLR-DS-4","on_hand":100}')
               for j in range(self.alert_keys)]
        out += [(f"events.sku.{p}-S{s}", b'{"type":"received","location":"%s","qty":50}' % LOCS[s % 4].encode())
                for s in range(self.skus)]
        out += [(f"events.shipment.{p}-SH{s}", b'{"type":"in_transit","location":"HUB"}') for s in range(self.shipments)]
        out += [(f"events.campaign.{p}-C{c}", b'{"type":"conversion","count":1}') for c in range(self.campaigns)]
        return out

    def next(self) -> tuple[str, bytes, bool]:
        """(subject, payload, is_alert) with ts = now."""
        rng = self.rng
        ts = rfc3339(time.time_ns() // 1000).encode()
        self.sent += 1
        if rng.random() < self.alert_share:
            a = self.alerts
            self.alerts += 1
            j = a % self.alert_keys
            level = 0 if (a // self.alert_keys) % 2 == 0 else 100
            return (
                f"events.sku.{self.prefix}-A{j}",
                b'{"type":"counted","location":"BLR-DS-4","on_hand":%d,"ts":"%s"}' % (level, ts),
                True,
            )
        r = rng.random()
        if r < 0.45:
            s = rng.randrange(self.skus)
            return (
                f"events.sku.{self.prefix}-S{s}",
                b'{"type":"received","location":"%s","qty":%d,"ts":"%s"}' % (LOCS[s % 4].encode(), rng.randint(10, 50), ts),
                False,
            )
        if r < 0.8:
            return f"events.shipment.{self.prefix}-SH{rng.randrange(self.shipments)}", b'{"type":"in_transit","location":"HUB","ts":"%s"}' % ts, False
        return (
            f"events.campaign.{self.prefix}-C{rng.randrange(self.campaigns)}",
            b'{"type":"conversion","count":1,"revenue":25.0,"ts":"%s"}' % ts,
            False,
        )


# ---------------------------------------------------------------------------- streams


async def publish_core(url: str, msgs: Iterable[tuple[str, bytes]], *, stream: str = "EVENTS",
                       chunk: int = 10_000) -> int:
    """Core-publish `msgs` (as `nats pub` would) into `stream`, a chunk at a time, each chunk
    stored before the next is sent: a server short of CPU drops core publishes that overrun
    its ingest queue. Returns the stream's last sequence. Only this client may publish to
    the stream meanwhile."""
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    try:
        jsm = nc.jsm()
        expected = int((await jsm.stream_info(stream)).state.last_seq or 0)
        sent = 0
        for subject, data in msgs:
            await nc.publish(subject, data)
            sent += 1
            if sent % chunk == 0:
                expected = await _stored(nc, stream, expected + chunk)
        if sent % chunk:
            expected = await _stored(nc, stream, expected + sent % chunk)
        return expected
    finally:
        await nc.close()


async def _stored(nc: Any, stream: str, want: int) -> int:
    await nc.flush(timeout=60)
    jsm = nc.jsm()
    last, progress_at = -1, time.monotonic()
    while True:
        seq = int((await jsm.stream_info(stream)).state.last_seq or 0)
        if seq >= want:
            return seq
        if seq != last:
            last, progress_at = seq, time.monotonic()
        elif time.monotonic() - progress_at > 5:
            raise RuntimeError(f"{stream} stopped at sequence {seq}, expected {want}: the server dropped core publishes")
        await anyio.sleep(0.005)


async def reset_streams(url: str, *, exceptions: bool = False) -> None:
    """Delete EVENTS, EXCEPTIONS and DEADLETTER (with their consumers); create EVENTS again
    (and EXCEPTIONS, for a raw consumer that publishes into it), empty."""
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        # (and the cluster copy of the state: a fresh store would be restored from it)
        for name in ("EVENTS", "EXCEPTIONS", "DEADLETTER", "KV_router_state"):
            with contextlib.suppress(Exception):
                await jsm.delete_stream(name)
        from nats.js import api

        await jsm.add_stream(api.StreamConfig(name="EVENTS", subjects=["events.>"], storage=api.StorageType.FILE,
                                              duplicate_window=600.0, allow_direct=True))
        if exceptions:
            await jsm.add_stream(api.StreamConfig(name="EXCEPTIONS", subjects=["exceptions.>"],
                                                  storage=api.StorageType.FILE, duplicate_window=600.0,
                                                  allow_direct=True))
    finally:
        await nc.close()


async def stream_last_seq(url: str, stream: str = "EVENTS") -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jsm().stream_info(stream)
        return int(info.state.last_seq or 0)
    finally:
        await nc.close()


async def wait_stored(url: str, stream: str, count: int, within: float = 120) -> None:
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(within):
            while True:
                info = await nc.jsm().stream_info(stream)
                if (info.state.last_seq or 0) >= count:
                    return
                await anyio.sleep(0.05)
    finally:
        await nc.close()


# ---------------------------------------------------------------------------- the baselines


async def raw_pull_consumer(url: str, stream: str, count: int, batch: int = 2000, start_seq: int = 1,
                            stats: dict[str, float] | None = None) -> float:
    """The baseline: a hand-driven pull consumer that decodes each message, updates a dict and acks
    cumulatively. Returns messages per second over `count` messages from `start_seq`; `stats`
    receives the process CPU seconds it took ("cpu")."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    jsm = nc.jsm()
    from nats.js import api

    name = f"baseline{random.randrange(1 << 30)}"
    if start_seq > 1:
        where: dict[str, Any] = {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq}
    else:
        where = {"deliver_policy": api.DeliverPolicy.ALL}
    await jsm.add_consumer(stream, api.ConsumerConfig(durable_name=name, ack_policy=api.AckPolicy.ALL,
                                                      max_ack_pending=100_000, **where))
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
    t0, cpu0 = time.perf_counter(), time.process_time()
    await pull()
    await pull()
    await done.wait()
    elapsed = time.perf_counter() - t0
    if stats is not None:
        stats["cpu"] = time.process_time() - cpu0
    await jsm.delete_consumer(stream, name)
    await nc.close()
    return count / elapsed


class _TsOnly(msgspec.Struct):
    ts: str | None = None


async def raw_echo(url: str, stream: str = "EVENTS", batch: int = 2000) -> None:
    """The latency baseline: the same hand-driven pull consumer, answering every event with one
    JetStream publish on `exceptions.raw.<kind>.<key>` (`{"event_ts": <the event's ts>}`) with a
    reply inbox for the PubAck, and acking cumulatively once the PubAcks are in. Runs until
    stdin closes or says "stop"."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    jsm = nc.jsm()
    from nats.js import api

    name = f"rawecho{random.randrange(1 << 30)}"
    await jsm.add_consumer(stream, api.ConsumerConfig(durable_name=name, ack_policy=api.AckPolicy.ALL,
                                                      max_ack_pending=100_000,
                                                      deliver_policy=api.DeliverPolicy.ALL))
    inbox = nc.new_inbox()
    pa_inbox = nc.new_inbox()
    state: dict[str, Any] = {}
    outstanding = 0
    answered = confirmed = 0
    waiting: deque[str] = deque()
    decode = msgspec.json.Decoder(_TsOnly).decode
    enc = msgspec.json.encode

    async def pull() -> None:
        nonlocal outstanding
        outstanding += batch
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                         b'{"batch":%d,"expires":2000000000}' % batch, reply=inbox)

    async def cb(msg: Any) -> None:
        nonlocal outstanding, answered
        if not msg.reply:
            outstanding = 0
            await pull()
            return
        outstanding -= 1
        obj = decode(msg.data)
        state[msg.subject] = obj
        answered += 1
        waiting.append(msg.reply)
        await nc.publish("exceptions.raw." + msg.subject[7:], enc({"event_ts": obj.ts}), reply=pa_inbox)
        if outstanding <= batch // 2:
            await pull()

    async def on_puback(msg: Any) -> None:
        nonlocal confirmed
        confirmed += 1
        reply = waiting.popleft()
        if not waiting or confirmed % 100 == 0:
            await nc.publish(reply, b"+ACK")

    await nc.subscribe(inbox, cb=cb, pending_msgs_limit=0, pending_bytes_limit=0)
    await nc.subscribe(pa_inbox, cb=on_puback, pending_msgs_limit=0, pending_bytes_limit=0)
    await pull()
    await pull()
    await nc.flush()
    emit(event="serving", t=time.monotonic())
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        cmd = json.loads(line) if line.strip() else {"cmd": "stop"}
        if cmd.get("cmd") == "stop":
            break
        if cmd.get("cmd") == "wait":  # until `count` events are answered and confirmed
            with anyio.move_on_after(float(cmd.get("timeout", 120))):
                while confirmed < int(cmd["count"]):  # noqa: ASYNC110 (callbacks count)
                    await anyio.sleep(0.01)
        emit(answered=answered, confirmed=confirmed)
    await jsm.delete_consumer(stream, name)
    await nc.close()
    emit(event="stopped", answered=answered, confirmed=confirmed)


# ---------------------------------------------------------------------------- the router host


def emit(**fields: Any) -> None:
    """One JSON line to the parent."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def proc_status_kib(pid: int | None = None, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pid: int | None = None) -> float:
    return proc_status_kib(pid) / 1024


class _Watch:
    """Runs inside the router process: when applied_seq crosses the marks, and (when asked)
    when snapshots run and how late the event loop wakes meanwhile."""

    def __init__(self, part: Any, marks: list[int]) -> None:
        self.p = part
        self.pending = sorted(set(marks))
        self.reached: dict[int, tuple[float, float, float]] = {}  # seq -> (monotonic, process CPU s, loop thread CPU s)
        self.monitor = False
        self.snapshots: list[dict[str, Any]] = []  # {"start", "end", "actors", "max_lag_ms"}
        self.max_lag = 0.0

    def _running(self) -> bool:
        return bool(self.p.snapshots.running)

    async def run(self) -> None:
        current: dict[str, Any] | None = None
        while True:
            now = time.monotonic()
            applied = self.p.applied_seq
            while self.pending and applied >= self.pending[0]:
                self.reached[self.pending.pop(0)] = (now, time.process_time(), time.thread_time())
            if self.monitor:
                running = self._running()
                if running and current is None:
                    # The partition notes when it started one (this ticker may be held up by it).
                    began = self.p.snapshots.last
                    current = {"start": began if now - 1.0 < began <= now else now, "end": None, "actors": len(self.p.snapshots.writing),
                               "max_lag_ms": 0.0}
                    self.snapshots.append(current)
                elif not running and current is not None:
                    current["end"] = now
                    current = None
            interval = 0.002 if self.monitor else (0.005 if self.pending else 0.05)
            await anyio.sleep(interval)
            lag = time.monotonic() - now - interval
            if self.monitor:
                self.max_lag = max(self.max_lag, lag)
                if current is not None:
                    current["max_lag_ms"] = max(current["max_lag_ms"], round(lag * 1000, 2))

    async def wait(self, seq: int, within: float) -> tuple[float, float, float] | None:
        if seq not in self.reached and seq not in self.pending:
            self.pending = sorted({*self.pending, seq})
        with anyio.move_on_after(within):
            while seq not in self.reached:  # noqa: ASYNC110 (run() records it)
                await anyio.sleep(0.005)
            return self.reached[seq]
        return None


def _stats(rt: Any, watch: _Watch) -> dict[str, Any]:
    p = rt.partitions[0]
    return {
        "t": time.monotonic(),
        "applied_seq": p.applied_seq,
        "processed": p.processed,
        "exceptions": p.outbox.exceptions_sent,
        "dead_lettered": getattr(p, "dead_lettered", None),
        "resident": len(p.resident),
        "dirty": len(p.snapshots.dirty),
        "snapshot_seq": p.snapshots.snapshot_seq,
        "rss_kib": proc_status_kib(),
        "hwm_kib": proc_status_kib(field="VmHWM"),
        "snapshots": watch.snapshots,
        "max_lag_ms": round(watch.max_lag * 1000, 2),
        # The cluster copy of the state ([snapshots] cluster_copy): what it wrote so far.
        "copy_bytes": rt.state_copy.bytes_written if getattr(rt, "state_copy", None) is not None else 0,
        "copy_actors": rt.state_copy.actors_written if getattr(rt, "state_copy", None) is not None else 0,
    }


class StallTracer:
    """Diagnostics (`host --trace-stalls MS`): a thread that prints the event loop's stack to
    stderr (the router's log) whenever the loop has not ticked for MS milliseconds."""

    def __init__(self, threshold_ms: float) -> None:
        import threading

        self.threshold = threshold_ms / 1000
        self.beat = time.monotonic()
        self.loop_thread = threading.get_ident()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        if took >= self.threshold / 4:
            sys.stderr.write(f"--- gc of generation {info['generation']} took {took * 1000:.0f} ms "
                             f"({info['collected']} collected)\n")

    async def ticker(self) -> None:
        import gc

        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self.thread.start()
        while True:
            self.beat = time.monotonic()
            await anyio.sleep(0.001)

    def _watch(self) -> None:
        import traceback

        reported = 0.0
        while True:
            time.sleep(self.threshold / 4)
            beat = self.beat
            stalled = time.monotonic() - beat
            if stalled >= self.threshold and beat != reported:
                reported = beat
                frame = sys._current_frames().get(self.loop_thread)
                stack = "".join(traceback.format_stack(frame)[-12:]) if frame else "?"
                sys.stderr.write(f"--- event loop stalled {stalled * 1000:.0f} ms so far, at:\n{stack}")
                sys.stderr.flush()


def host(cfg_path: str, marks: list[int], trace_stalls_ms: float = 0) -> int:
    """Run `router run --config cfg_path` in this process, instrumented: `Runtime.serve` is
    wrapped so that, next to the router, a watcher records when `applied_seq` crosses the
    marks and a command loop answers the parent on stdin/stdout. Everything else (argument
    parsing, logging, uvloop, signals, start-up and shutdown) is the CLI's own."""
    from contracts.config import load_config
    from router import cli
    from router.engine.daemon import Runtime

    if load_config(cfg_path).router.partitions != 1:
        raise SystemExit("the benchmark host measures one partition")
    emit(event="imported", t=time.monotonic())
    serve = Runtime.serve

    async def instrumented(rt: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        # The partition exists once the router holds its lease: serve's start says so.
        p: Any = None
        watch: Any = None
        served = anyio.Event()
        t_stop = 0.0

        async def run_serve(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve(rt, task_status=task_status)
            finally:
                served.set()

        async def commands() -> None:
            nonlocal t_stop
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                cmd: dict[str, Any] = json.loads(line) if line.strip() else {"cmd": "stop"}
                op = cmd.get("cmd")
                if op == "stop":
                    t_stop = time.monotonic()
                    rt.request_stop()
                    return
                if op == "wait":
                    got = await watch.wait(int(cmd["seq"]), float(cmd.get("timeout", 600)))
                    if got is None:
                        emit(error="timeout", stats=_stats(rt, watch))
                    else:
                        emit(t=got[0], cpu=got[1], loop_cpu=got[2])
                elif op == "stats":
                    emit(**_stats(rt, watch))
                elif op == "settle":
                    # Every change written back: no dirty actors, no snapshot running, marks current.
                    ok = False
                    with anyio.move_on_after(float(cmd.get("timeout", 120))):
                        while p.snapshots.dirty or watch._running() or p.snapshots.snapshot_seq < p.applied_seq:  # noqa: ASYNC110
                            await anyio.sleep(0.05)
                        ok = True
                    emit(settled=ok, **_stats(rt, watch))
                elif op == "count":
                    emit(actors=await rt.store.count_actors())
                elif op == "not_resident":
                    emit(keys=[k for k in cmd["keys"] if tuple(k) not in p.resident])
                elif op == "monitor":
                    watch.monitor = bool(cmd.get("on", True))
                    if watch.monitor:
                        watch.snapshots, watch.max_lag = [], 0.0
                    emit(ok=True)
                else:
                    emit(error=f"unknown command {op!r}")

        async with anyio.create_task_group() as tg:
            if trace_stalls_ms:
                tg.start_soon(StallTracer(trace_stalls_ms).ticker)
            t0 = time.monotonic()
            await tg.start(run_serve)
            p = rt.partitions[0]
            watch = _Watch(p, marks)
            tg.start_soon(watch.run)
            task_status.started()
            # CPU counted from here, as the rates are: start-up (store, key filter, consumer) is apart.
            emit(event="serving", t0=t0, t=time.monotonic(), cpu=time.process_time(),
                 loop_cpu=time.thread_time(), applied_seq=p.applied_seq,
                 rss_kib=proc_status_kib())
            tg.start_soon(commands)
            await served.wait()
            tg.cancel_scope.cancel()
        emit(event="stopped", t_stop=t_stop, t=time.monotonic(), applied_seq=p.applied_seq, processed=p.processed)

    Runtime.serve = instrumented  # type: ignore[method-assign]
    return cli.main(["run", "--config", cfg_path])


async def raw_catchup_main(url: str, count: int, start_seq: int) -> None:
    stats: dict[str, float] = {}
    rate = await raw_pull_consumer(url, "EVENTS", count, start_seq=start_seq, stats=stats)
    emit(rate=rate, cpu=stats["cpu"])


def _run(fn: Any, *args: Any) -> None:
    try:
        import uvloop  # noqa: F401

        opts = {"use_uvloop": True}
    except ImportError:
        opts = {}
    anyio.run(fn, *args, backend="asyncio", backend_options=opts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="child processes of scripts/bench.py")
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("host", help="the router, with a command channel on stdin/stdout")
    h.add_argument("--config", required=True)
    h.add_argument("--mark", type=int, action="append", default=[])
    h.add_argument("--trace-stalls", type=float, default=0, metavar="MS",
                   help="print the loop's stack to stderr when it stalls this long (diagnostics)")
    e = sub.add_parser("raw-echo", help="the latency baseline")
    e.add_argument("--url", required=True)
    c = sub.add_parser("raw-catchup", help="the catch-up baseline")
    c.add_argument("--url", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--start-seq", type=int, default=1)
    sub.add_parser("console-load", help="the console's users: feed streams and /metrics scrapes", add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["console-load"]:
        from bench_console import main as console_main

        console_main(argv[1:])
        return
    args = ap.parse_args(argv)
    if args.what == "host":
        sys.exit(host(args.config, args.mark, args.trace_stalls))
    elif args.what == "raw-echo":
        _run(raw_echo, args.url)
    else:
        _run(raw_catchup_main, args.url, args.count, args.start_seq)


if __name__ == "__main__":
    main()
