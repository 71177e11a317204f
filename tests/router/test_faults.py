"""Crash safety of the installed router (issue 3): SIGKILL under load, nats-server restarts, long outages.

Every test here runs `router run` as a subprocess against the `nats_server` fixture and
checks the outcome against an independent fold of EVENTS (tests/support/oracle.py):
exceptions, dead letters and actor messages exactly once, and the state reply of every key.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

from contracts.exceptions import effect_cause
from router.jetstream.streams import consumer_marks
from router.workload import workload
from tests.support.harness import stream_last_seq, wait_for
from tests.support.oracle import read_stream
from tests.support.procs import (
    RouterProcess,
    assert_exactly_once,
    check_all_states,
    health,
    router_process,
    settle_process,
    settled_exactly_once,
    wait_healthy,
    write_config,
)
from tests.support.tcpproxy import tcp_proxy

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DAY_US = 86_400_000_000
KILLS = 9


def future_workload(seed: int, count: int, bad_share: float = 0.02) -> list[tuple[str, bytes]]:
    """A seeded day whose timers (SLA promises, stalls) lie a day ahead: no timer fires during a test,
    so every exception is implied by the stream and the fold predicts it."""
    now_us = time.time_ns() // 1000 + DAY_US
    return list(workload(seed=seed, count=count, bad_share=bad_share, now_us=now_us))


async def _call(fn: Any) -> None:
    """Run a (blocking) fixture method such as `nats_server.stop` without stalling the event loop."""
    result = await anyio.to_thread.run_sync(fn)
    if inspect.isawaitable(result):
        await result


def ready_this_run(rp: RouterProcess, partitions: int) -> bool:
    """Whether the router's current run has logged partition_ready for every partition."""
    text = rp.log_text()
    run = text[text.rfind("--- start ") :]
    return sum(1 for line in run.splitlines() if '"partition_ready"' in line) >= partitions


async def stream_grew(url: str, cfg: Any, than: int) -> bool:
    return await stream_last_seq(url, cfg.streams.events) > than


class Gate:
    """A point in the workload where the publisher waits for a step of a test (a kill, say)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.reached = anyio.Event()  # the publisher sent the first `at` messages and waits
        self.open = anyio.Event()  # the test took its step: publishing goes on


class Publisher:
    """Plain core publishes in chunks from one connection that rides out server restarts."""

    def __init__(self, url: str, messages: list[tuple[str, bytes]], gates: list[Gate] | None = None) -> None:
        self.url = url
        self.messages = messages
        self.sent = 0
        self.gates = sorted(gates or [], key=lambda g: g.at)

    async def run(self, chunk: int, gap: float) -> None:
        async def quiet(*_args: Any) -> None:
            pass  # the server going away is part of the test

        nc = await nats.connect(
            self.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            error_cb=quiet,
            disconnected_cb=quiet,
        )
        try:
            gates = list(self.gates)
            while self.sent < len(self.messages):
                if gates and gates[0].at <= self.sent:
                    gate = gates.pop(0)
                    gate.reached.set()
                    await gate.open.wait()
                end = min(self.sent + chunk, gates[0].at if gates else len(self.messages))
                for subject, data in self.messages[self.sent : end]:
                    await nc.publish(subject, data)
                    self.sent += 1
                with contextlib.suppress(Exception):  # the server is away: sent on reconnect
                    await nc.flush(timeout=5)
                await anyio.sleep(gap)
            with anyio.move_on_after(20):
                while not nc.is_connected:
                    await anyio.sleep(0.05)
                await nc.flush(timeout=10)
        finally:
            await nc.close()


@pytest.mark.parametrize("partitions", [1, 3])
async def test_sigkill_and_server_restart_under_load(nats_server: Any, tmp_path: Path, partitions: int) -> None:
    """SIGKILL the router at random moments, restart nats-server once, all under load: nothing lost or doubled."""
    seed = int(os.environ.get("ROUTER_FAULT_SEED", "3"))  # another seed, another schedule
    rng = random.Random(seed + partitions)
    cfg = write_config(tmp_path / "config.toml", nats_server.url, router={"partitions": partitions})
    messages = future_workload(seed=11 + seed, count=60_000)
    # Each step comes once the publisher has sent a random share of the workload (between 5% and
    # 85%), and the publisher waits for it there: every kill comes under load, and the events
    # sent after it make a backlog for the restart, on a fast machine as on a slow one.
    gates = [Gate(at) for at in sorted(rng.sample(range(len(messages) // 20, len(messages) * 17 // 20), KILLS + 1))]
    # Two kills may come while the router is still starting; before the others it is ready.
    early = set(rng.sample([s for s in range(KILLS + 1) if s != KILLS // 2], 2))
    pub = Publisher(nats_server.url, messages, gates)
    timeline: list[str] = []
    t0 = time.monotonic()

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - t0:6.2f}s sent={pub.sent:>6} {what}")


    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)

        async def chaos() -> None:
            for step, gate in enumerate(gates):
                if step == KILLS // 2:
                    # nats-server goes away under the running router, and comes back on the same store.
                    await wait_healthy(nats_server.url, rp)
                    await gate.reached.wait()
                    note("nats-server stop")
                    await _call(nats_server.stop)
                    gate.open.set()
                    await anyio.sleep(rng.uniform(1.0, 2.0))  # the outage
                    await _call(nats_server.start)
                    note("nats-server started")
                    await wait_healthy(nats_server.url, rp, timeout=30)  # reconnected by itself
                    note("router reconnected")
                    continue
                if step not in early:
                    await wait_for(functools.partial(ready_this_run, rp, partitions), 30.0)
                await gate.reached.wait()
                rp.kill()
                note(f"router SIGKILL #{rp.kills}")
                stored = await stream_last_seq(nats_server.url, cfg.streams.events)
                gate.open.set()
                # Down until more events are stored: the restart has a backlog to work through.
                await wait_for(functools.partial(stream_grew, nats_server.url, cfg, stored), 30.0)
                await anyio.sleep(rng.uniform(0.0, 0.5))
                rp.start()
                note("router started")

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pub.run, 400, 0.08)
                tg.start_soon(chaos)
            note("publishing and chaos done")
            assert rp.running, rp.tail()
            final = await settle_process(nats_server.url, cfg, rp, timeout=60)
            note(f"settled at applied_seq={[p['applied_seq'] for p in final['partitions']]}")
            exp = await assert_exactly_once(nats_server.url, cfg)
            keys = await check_all_states(nats_server.url, exp)
            note(
                f"checked {keys} keys, {len(exp.exception_ids)} exceptions, {len(exp.dead_letters)} dead letters"
            )
        except BaseException:
            print("\n".join(timeline))
            print(rp.tail(60))
            raise
    print("\n".join(timeline))
    assert rp.kills == KILLS
    assert exp.dead_letters
    assert exp.exception_ids
    assert exp.message_ids
    log = rp.log_text()
    assert "nats_disconnected" in log
    assert "nats_reconnected" in log
    # The kills came under load: most restarts found a backlog to work through.
    backlogs = [e["backlog"] for e in rp.log_events() if e.get("event") == "partition_ready"]
    assert sum(1 for b in backlogs if b > 0) >= 3, backlogs


async def test_down_longer_than_the_duplicate_window(nats_server: Any, tmp_path: Path) -> None:
    """Killed under load and kept down past a 1 s duplicate window, three times: still exactly once."""
    rng = random.Random(5)
    cfg = write_config(tmp_path / "config.toml", nats_server.url, streams={"duplicate_window": "1s"})
    messages = future_workload(seed=12, count=24_000)
    pub = Publisher(nats_server.url, messages)
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jsm().stream_info(cfg.streams.exceptions)
            assert info.config.duplicate_window == 1.0
        finally:
            await nc.close()

        async def chaos() -> None:
            for _ in range(3):
                await anyio.sleep(rng.uniform(0.4, 1.2))
                rp.kill()
                await anyio.sleep(2.5)  # longer than the duplicate window: the server forgets the ids
                rp.start()
                await wait_healthy(nats_server.url, rp)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pub.run, 300, 0.05)
                tg.start_soon(chaos)
            await settled_exactly_once(nats_server.url, cfg, rp)
        except BaseException:
            print(rp.tail(60))
            raise
    assert rp.kills == 3


async def stored_beyond_ack_floor(url: str, cfg: Any) -> int:
    """How many effects in EXCEPTIONS and DEADLETTER were caused by events above the consumer's ack floor:
    stored, but not acknowledged as such when the router died."""
    nc = await nats.connect(url)
    try:
        floor = await ack_floor(nc, cfg)
    finally:
        await nc.close()
    n = 0
    for stream in (cfg.streams.exceptions, cfg.streams.deadletter):
        for m in await read_stream(url, stream):
            cause = effect_cause(m.headers.get("Nats-Msg-Id", ""))
            n += cause is not None and cause > floor
    return n


async def ack_floor(nc: Any, cfg: Any) -> int:
    """The (single) partition consumer's ack floor; 0 while the router is (re)creating it at start."""
    floor, _delivered = await consumer_marks(nc.jsm(), cfg, 0)
    return floor


async def freeze_mid_backlog(url: str, cfg: Any, rp: Any, floor: int) -> None:
    """SIGSTOP the router the moment the consumer's ack floor first moves past `floor`: it has begun
    acknowledging the backlog, so effects of the events after that ack are in flight. Polling the
    floor rather than sleeping a guessed time keeps the freeze inside the backlog on a fast machine
    as on a slow one."""
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(20):
            while await ack_floor(nc, cfg) <= floor:
                assert rp.running, f"router exited:\n{rp.tail()}"
                await anyio.sleep(0.002)
        rp.stop_signal()
    finally:
        await nc.close()


async def test_stored_but_unacknowledged_effects_are_not_repeated_after_the_window(
    nats_server: Any, tmp_path: Path
) -> None:
    """The router dies after JetStream stored some effects but before it acknowledged their events, and
    stays down past the duplicate window: the restart must not publish those effects again.

    SIGSTOP freezes the router as soon as it starts acknowledging a backlog heavy with dead letters,
    so PubAcks and acks are left unprocessed; the test goes on until such a freeze left stored
    effects above the consumer's ack floor (checked), then SIGKILLs, waits out the window and
    restarts.
    """
    cfg = write_config(tmp_path / "config.toml", nats_server.url, streams={"duplicate_window": "1s"})
    exposed = 0
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        try:
            for attempt in range(8):
                rp.kill()
                nc = await nats.connect(nats_server.url)
                try:
                    floor = await ack_floor(nc, cfg)
                finally:
                    await nc.close()
                batch = future_workload(seed=100 + attempt, count=12000, bad_share=0.3)
                await Publisher(nats_server.url, batch).run(12000, 0)
                rp.start()
                await freeze_mid_backlog(nats_server.url, cfg, rp, floor)
                await anyio.sleep(0.3)  # what was sent before the freeze is stored meanwhile
                found = await stored_beyond_ack_floor(nats_server.url, cfg)
                rp.kill()
                exposed += found
                await anyio.sleep(1.5)  # past the duplicate window
                if exposed and attempt >= 2:
                    break
            rp.start()
            await settled_exactly_once(nats_server.url, cfg, rp)
        except BaseException:
            print(rp.tail(60))
            raise
    assert exposed, "no freeze left stored effects above the ack floor: the test did not test anything"


async def test_effects_unconfirmed_at_a_crash_are_published_after_restart(
    nats_server: Any, tmp_path: Path
) -> None:
    """Snapshots taken while exceptions cannot be stored must not let a crash lose them.

    EXCEPTIONS is deleted under the running router, so its exception publishes go
    unconfirmed (and are retried) while it goes on applying and snapshotting; then SIGKILL.
    The restarted router recreates the stream and must publish every exception the events
    imply, exactly once.
    """
    cfg = write_config(tmp_path / "config.toml", nats_server.url)
    messages = future_workload(seed=13, count=3000)
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jsm().delete_stream(cfg.streams.exceptions)
            for subject, data in messages:
                await nc.publish(subject, data)
            await nc.flush()
            # It applies everything it was sent while the exceptions wait; snapshots are due every 200ms.
            with anyio.fail_after(20):
                while True:
                    h = await health(nc)
                    if (
                        h
                        and h["unconfirmed_publishes"] > 0
                        and h["partitions"][0]["applied_seq"] >= len(messages)
                    ):
                        break
                    await anyio.sleep(0.1)
            await anyio.sleep(1.0)
        finally:
            await nc.close()
        rp.kill()
        rp.start()
        try:
            exp = await settled_exactly_once(nats_server.url, cfg, rp)
        except BaseException:
            print(rp.tail(60))
            raise
    assert exp.exception_ids


async def test_sigterm_under_load_stops_cleanly(nats_server: Any, tmp_path: Path) -> None:
    """SIGTERM while a backlog is being applied: exit 0 within shutdown_timeout, final snapshot, nothing twice."""
    cfg = write_config(tmp_path / "config.toml", nats_server.url, router={"shutdown_timeout": "5s"})
    messages = future_workload(seed=14, count=30_000)
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        pub = Publisher(nats_server.url, messages)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pub.run, 2000, 0.02)
            await anyio.sleep(0.4)
            rc, took = await anyio.to_thread.run_sync(rp.terminate, 10)
        assert rc == 0, rp.tail()
        assert took < 5.0, f"stopped after {took:.1f}s"
        stopped = [e for e in rp.log_events() if e.get("event") == "router_stopped"]
        assert stopped, rp.tail()
        applied_at_stop = stopped[-1]["applied_seq"][0]
        assert applied_at_stop > 0
        # The final snapshot holds what was applied: the next start replays nothing before it.
        rp.start()
        try:
            await settle_process(nats_server.url, cfg, rp, timeout=60)
        except BaseException:
            print(rp.tail(60))
            raise
        ready = [e for e in rp.log_events() if e.get("event") == "partition_ready"]
        assert ready[-1]["applied_seq"] == applied_at_stop
        exp = await assert_exactly_once(nats_server.url, cfg)
        await check_all_states(nats_server.url, exp)


async def test_connection_cut_mid_stream_loses_nothing(nats_server: Any, tmp_path: Path) -> None:
    """The network drops the router's connection (the server stays up) while it works through a
    backlog, three times: it reconnects by itself and nothing is lost or doubled."""
    rng = random.Random(9)
    async with tcp_proxy(nats_server.port) as proxy:
        cfg = write_config(tmp_path / "config.toml", proxy.url)
        with router_process(tmp_path / "config.toml") as rp:
            await wait_healthy(nats_server.url, rp)
            rp.kill()
            await Publisher(nats_server.url, future_workload(seed=16, count=60_000)).run(5000, 0)
            rp.start()
            try:
                await wait_healthy(nats_server.url, rp)
                for _ in range(3):
                    await wait_healthy(nats_server.url, rp)  # connected (again) and answering
                    await anyio.sleep(rng.uniform(0.05, 0.4))
                    await proxy.cut()
                await settled_exactly_once(nats_server.url, cfg, rp)
            except BaseException:
                print(rp.tail(40))
                raise
            assert rp.starts == 2
            log = rp.log_text()
            assert log.count("nats_reconnected") >= 3


async def test_sigterm_while_nats_is_away_exits_within_the_timeout(nats_server: Any, tmp_path: Path) -> None:
    """A stop cannot confirm effects while NATS is away: it still exits 0 within shutdown_timeout, and
    the next start publishes what was missing."""
    cfg = write_config(tmp_path / "config.toml", nats_server.url, router={"shutdown_timeout": "4s"})
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        await Publisher(nats_server.url, future_workload(seed=17, count=20_000, bad_share=0.05)).run(
            20_000, 0
        )
        await _call(nats_server.stop)
        try:
            await anyio.sleep(0.5)
            rc, took = await anyio.to_thread.run_sync(rp.terminate, 15)
        finally:
            await _call(nats_server.start)
        assert rc == 0, rp.tail()
        assert took < 4.0, f"stopped after {took:.1f}s"
        rp.start()
        try:
            await settled_exactly_once(nats_server.url, cfg, rp)
        except BaseException:
            print(rp.tail(40))
            raise


async def test_nats_away_is_reported_and_survived(nats_server: Any, tmp_path: Path) -> None:
    """nats-server stopped for a few seconds: the router stays up, says so in health.json and its log,
    reconnects by itself and carries on."""
    cfg = write_config(tmp_path / "config.toml", nats_server.url)
    messages = future_workload(seed=15, count=6000)
    health_file = cfg.data_dir / "health.json"
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        pub = Publisher(nats_server.url, messages[:3000])
        await pub.run(1000, 0.05)
        await _call(nats_server.stop)
        try:
            seen: dict[str, Any] = {}
            with anyio.fail_after(10):
                while seen.get("status") != "nats_unavailable":
                    await anyio.sleep(0.2)
                    try:
                        seen = json.loads(health_file.read_text())
                    except (OSError, ValueError):
                        seen = {}
            assert seen["nats"] in ("reconnecting", "disconnected")
            await anyio.sleep(2.0)
            assert rp.running, rp.tail()
        finally:
            await _call(nats_server.start)
        try:
            await wait_healthy(nats_server.url, rp, timeout=30)
            await Publisher(nats_server.url, messages[3000:]).run(1000, 0.05)
            await settle_process(nats_server.url, cfg, rp, timeout=60)
            with anyio.fail_after(5):
                while json.loads(health_file.read_text())["status"] != "ok":
                    await anyio.sleep(0.2)
            exp = await assert_exactly_once(nats_server.url, cfg)
            await check_all_states(nats_server.url, exp)
        except BaseException:
            print(rp.tail(60))
            raise
        assert len(exp.states) > 100
    log = rp.log_text()
    assert "nats_disconnected" in log
    assert "nats_reconnected" in log
    assert rp.starts == 1
