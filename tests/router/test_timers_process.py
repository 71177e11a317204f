"""Durable timers in the installed daemon, on the real wall clock: `router run` as a subprocess.

`stall_after = "2s"`: a shipment stalls, clears, stalls again and breaches while the router
runs; then the router is SIGKILLed while two more deadlines pass, and restarted: each firing
reaches EXCEPTIONS exactly once, the live ones within a second of their deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from contracts.times import rfc3339
from tests.support.harness import publish_all, wait_for
from tests.support.oracle import read_stream

pytestmark = pytest.mark.anyio

S = 1_000_000
ROUTER = Path(sys.executable).with_name("router")


def now_us() -> int:
    return time.time_ns() // 1000


def parse_us(text: str) -> int:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def ev(key: str, type_: str, ts_us: int, **fields: Any) -> tuple[str, bytes]:
    return f"events.shipment.{key}", json.dumps({"type": type_, "ts": rfc3339(ts_us), **fields}).encode()


def tid(deadline_us: int) -> str:
    return f"t{deadline_us // 1000}"


class Router:
    """One `router run` process; killed (never left behind) when the test ends, pass or fail."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(ROUTER), "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(20)
        finally:
            self.kill()
        return code


@contextmanager
def router_process(config: Path, log: Path) -> Iterator[Router]:
    r = Router(config, log)
    try:
        yield r
    except BaseException:
        sys.stderr.write(log.read_text(errors="replace")[-6000:] if log.exists() else "")
        raise
    finally:
        r.kill()


async def serving(url: str, router: Router, within: float = 20.0) -> None:
    """Until the router answers a state query (its partitions are running by then)."""
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(within):
            while True:
                assert router.proc is not None
                assert router.proc.poll() is None, "router exited"
                try:
                    await nc.request("router.state.shipment.PING", b"", timeout=0.5)
                    return
                except Exception:
                    await anyio.sleep(0.1)
    finally:
        await nc.close()


class Tail:
    """EXCEPTIONS as it grows, read with stream gets."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[dict[str, Any]] = []

    async def wait_for(self, exc_id: str, within: float = 8.0) -> dict[str, Any]:
        from nats.js.errors import NotFoundError

        nc = await nats.connect(self.url)
        jsm = nc.jsm()

        async def seen() -> bool:
            while True:
                try:
                    m = await jsm.get_msg("EXCEPTIONS", len(self.seen) + 1)
                except NotFoundError:
                    break
                self.seen.append(json.loads(m.data))
            return any(e["id"] == exc_id for e in self.seen)

        try:
            await wait_for(seen, within)
        except TimeoutError:
            raise AssertionError(f"{exc_id} not published; got {[e['id'] for e in self.seen]}") from None
        finally:
            await nc.close()
        return next(e for e in self.seen if e["id"] == exc_id)


async def state_seq(url: str, key: str) -> int:
    nc = await nats.connect(url)
    try:
        reply = await nc.request(f"router.state.shipment.{key}", b"", timeout=5)
        return int(json.loads(reply.data)["seq"])
    finally:
        await nc.close()


def log_events(log: Path, event: str) -> list[dict[str, Any]]:
    """The router's JSON log lines (all runs) of one event."""
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == event:
                out.append(e)
    return out


async def fired_what_was_due(url: str, router: Router, log: Path, starts: int, within: float = 20.0) -> None:
    """Until the router's `starts`-th run has loaded its timers, holds none in memory (each fired,
    or found already published or stale) and has every publish confirmed by the stream."""
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(within):
            while True:
                assert router.proc is not None
                assert router.proc.poll() is None, "router exited"
                if len(log_events(log, "router_started")) >= starts:  # its partitions loaded their timers
                    try:
                        h = json.loads((await nc.request("router.health", b"", timeout=1.0)).data)
                    except Exception:
                        h = None
                    if (
                        h is not None
                        and h["unconfirmed_publishes"] == 0
                        and all(p["timers_due_soon"] == 0 for p in h["partitions"])
                    ):
                        return
                await anyio.sleep(0.05)
    finally:
        await nc.close()


@pytest.mark.slow
async def test_stall_clear_stall_breach_then_sigkill_across_deadlines(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    config = tmp_path / "router.toml"
    config.write_text(
        f'[nats]\nurl = "{url}"\n'
        '[snapshots]\npath = "data/router.db"\n'
        '[log]\nlevel = "info"\nformat = "json"\n'
        '[rules.shipment]\nstall_after = "2s"\n'
        '[http]\nlisten = "127.0.0.1:0"\n'  # never the default 127.0.0.1:8080 (tests run in parallel)
    )
    tail = Tail(url)
    log = tmp_path / "router.log"
    live: dict[str, int] = {}  # id -> deadline, for the firings while the router runs
    with anyio.fail_after(55), router_process(config, log) as router:
        router.start()
        await serving(url, router)
        t0 = now_us()
        promised_a = t0 + 7 * S
        # Passes while the router is down: after the last stall (d3 below, 2 s after a movement
        # published after promised_a), so that d3 alone bounds the time left to kill the router.
        promised_b = t0 + 10 * S
        await publish_all(
            url,
            [
                ev("A", "booked", t0, promised_by=rfc3339(promised_a)),
                ev("A", "picked_up", t0),
                ev("B", "booked", t0, promised_by=rfc3339(promised_b)),
            ],
        )
        # Stall.
        d1 = t0 + 2 * S
        live[f"shipment:A:stalled::raised:{tid(d1)}"] = d1
        await tail.wait_for(f"shipment:A:stalled::raised:{tid(d1)}")
        # Clear, by a movement; the clear carries its sequence.
        before = await state_seq(url, "A")
        m2 = now_us()
        await publish_all(url, [ev("A", "in_transit", m2)])
        clear1 = await _wait_clear(tail, url, "A", before)
        # Stall again, from the new last_movement.
        d2 = m2 + 2 * S
        live[f"shipment:A:stalled::raised:{tid(d2)}"] = d2
        await tail.wait_for(f"shipment:A:stalled::raised:{tid(d2)}")
        # Breach by the clock.
        live[f"shipment:A:sla_breached::raised:{tid(promised_a)}"] = promised_a
        await tail.wait_for(f"shipment:A:sla_breached::raised:{tid(promised_a)}")
        # A movement clears the stall and sets a new deadline; then SIGKILL before it passes.
        m3 = now_us()
        await publish_all(url, [ev("A", "out_for_delivery", m3)])
        clear2 = await _wait_clear(tail, url, "A", clear1)
        d3 = m3 + 2 * S
        assert now_us() < min(d3, promised_b) - 300_000, "too slow to kill before the deadlines"
        router.kill()
        # Both pass while no router runs. They are wall-clock deadlines: only the clock passes them.
        await wait_for(lambda: now_us() > max(d3, promised_b), 10.0)

        router.start()
        started = now_us()
        await serving(url, router)
        stall3 = await tail.wait_for(f"shipment:A:stalled::raised:{tid(d3)}")
        breach_b = await tail.wait_for(f"shipment:B:sla_breached::raised:{tid(promised_b)}")
        for e in (stall3, breach_b):
            assert parse_us(e["detected_at"]) - started < 8 * S, "an overdue timer fires soon after start"
        # Killed again right after those firings, and started once more: nothing is repeated.
        router.kill()
        router.start()
        await serving(url, router)
        await fired_what_was_due(url, router, log, starts=3)
        assert router.terminate() == 0

    for e in tail.seen:
        if e["id"] in live:  # fired while running: within a second of the deadline
            late = parse_us(e["detected_at"]) - live[e["id"]]
            assert 0 <= late < S, f"{e['id']} fired {late / S:.3f}s after its deadline"
            assert e["seq"] is None
            assert e["event_ts"] == rfc3339(live[e["id"]])
    got = Counter(json.loads(m.data)["id"] for m in await read_stream(url, "EXCEPTIONS"))
    assert got == Counter(
        {
            **dict.fromkeys(live, 1),
            f"shipment:A:stalled::cleared:{clear1}": 1,
            f"shipment:A:stalled::cleared:{clear2}": 1,
            f"shipment:A:stalled::raised:{tid(d3)}": 1,
            f"shipment:B:sla_breached::raised:{tid(promised_b)}": 1,
        }
    )


async def _wait_clear(tail: Tail, url: str, key: str, after: int) -> int:
    """The sequence of the movement just published for `key` (the key's first event after
    sequence `after`), once its `stalled` clear is in EXCEPTIONS."""

    async def applied() -> bool:
        return await state_seq(url, key) > after

    await wait_for(applied, 8.0)
    seq = await state_seq(url, key)
    await tail.wait_for(f"shipment:{key}:stalled::cleared:{seq}")
    return seq
