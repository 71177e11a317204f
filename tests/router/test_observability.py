"""What the router says about itself: health.json and router.health (one model), the metrics
registry, and the periodic summary line. Real nats-server, real router."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router import health as model
from tests.support.harness import make_config, publish_all, running_router, settle, wait_for
from tests.support.oracle import read_stream
from tests.support.procs import router_process, wait_healthy, write_config

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def sku(key: str, body: dict[str, Any]) -> tuple[str, bytes]:
    return f"events.sku.{key}", json.dumps(body).encode()


EVENTS = [
    sku("A", {"type": "received", "location": "L1", "qty": 3}),
    sku("A", {"type": "ordered", "location": "L1", "qty": 3, "order_id": "o1"}),  # stockout, low_stock
    sku("A", {"type": "received", "location": "L1", "qty": 10}),  # both cleared
    sku("B", {"type": "ordered", "location": "L1", "qty": "2", "order_id": "o2"}),  # invalid
    ("events.sku.C", b"{nope"),  # malformed
    ("events.pallet.X", b"{}"),  # bad_subject
    ("events.shipment.S1", json.dumps({"type": "booked", "promised_by": "2030-01-01T00:00:00Z"}).encode()),
    ("events.campaign.C1", json.dumps({"type": "started"}).encode()),
]


def router_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`router ARGS...` in its own process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("NATS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, env=env,
    )


async def router_health(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(router_cli, ["health", *args], cwd)


async def test_metrics_count_events_exceptions_and_dead_letters_as_the_streams_hold_them(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    cfg = make_config(url, tmp_path)
    async with running_router(cfg) as rt:
        await publish_all(url, EVENTS)
        await settle(url, cfg, rt)
        body, _ = rt.metrics.exposition()
        h = rt.health()
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}

    def values(name: str, *labels: str) -> dict[tuple[str, ...], int]:
        return {
            tuple(s.labels[n] for n in labels): int(s.value) for s in fams[name].samples if s.value
        }

    applied = values("ops_router_events_applied", "partition", "kind")
    exceptions = Counter(values("ops_router_exceptions", "kind", "rule", "status"))
    dead = values("ops_router_dead_letters", "reason")
    resident = values("ops_router_resident_actors", "partition")[("0",)]
    lag = values("ops_router_consumer_lag_messages", "partition").get(("0",), 0)
    # Three valid SKU events, one shipment, one campaign.
    assert applied == {("0", "sku"): 3, ("0", "shipment"): 1, ("0", "campaign"): 1}
    stored = Counter(
        (e["kind"], e["rule"], e["status"])
        for e in (json.loads(m.data) for m in await read_stream(url, cfg.streams.exceptions))
    )
    assert exceptions == stored
    assert exceptions[("sku", "stockout", "raised")] == 1
    assert exceptions[("sku", "stockout", "cleared")] == 1
    reasons = Counter((m.headers or {})["Router-Error"] for m in await read_stream(url, cfg.streams.deadletter))
    assert dead == {(r,): n for r, n in reasons.items()}
    assert dead == {("invalid",): 1, ("malformed",): 1, ("bad_subject",): 1}
    assert resident == 3  # A, S1 and C1: a bad event creates no actor
    assert lag == 0
    assert isinstance(h, model.Health)
    assert h.partitions[0].lag == 0
    assert h.partitions[0].dead_lettered == 3


async def test_health_file_is_fresh_while_running_and_says_stopped_after_a_graceful_stop(
    nats_server: Any, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "config.toml", nats_server.url)
    with router_process(tmp_path / "config.toml") as rp:
        reply = await wait_healthy(nats_server.url, rp)
        live = msgspec.convert(reply, model.Health)
        assert (live.status, live.connected, live.pid) == ("ok", True, rp.pid)

        first: list[model.Health] = []

        def refreshed() -> bool:
            h = model.read_file(cfg.data_dir)
            if h is None or h.status != "ok" or not h.ready:
                return False
            first.append(h)
            return len({x.updated_at for x in first}) >= 2  # written again since

        await wait_for(refreshed, 10.0)
        h = first[-1]
        assert h.pid == rp.pid
        assert h.refresh_s == model.REFRESH_S
        assert h.disk.status in ("ok", "low")
        assert model.verdict(h).healthy
        done = await router_health(["--file"], tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith(f"router: running, ok (from {cfg.data_dir / 'health.json'})")
        done = await router_health([], tmp_path)
        assert done.returncode == 0
        assert f"(from router.health on {nats_server.url})" in done.stdout

        rc, _ = rp.terminate(30)
        assert rc == 0
    stopped = model.read_file(cfg.data_dir)
    assert stopped is not None
    assert (stopped.status, stopped.connected, stopped.ready) == ("stopped", False, False)
    assert model.verdict(stopped).running is False
    done = await router_health([], tmp_path)
    assert done.returncode == 1
    assert done.stdout.startswith("router: stopped (pid ")


async def test_a_killed_router_is_not_running_although_its_file_said_ok(nats_server: Any, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.toml", nats_server.url)
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        await wait_for(lambda: (h := model.read_file(cfg.data_dir)) is not None and h.status == "ok", 10.0)
        pid = rp.pid
        rp.kill()
    left = model.read_file(cfg.data_dir)
    assert left is not None
    assert left.status == "ok"  # what it wrote last: a reader must not believe it
    done = await router_health([], tmp_path)
    assert done.returncode == 1
    assert done.stdout.startswith(f"router: not running: pid {pid} is gone (it last reported ok at ")
    state = await anyio.to_thread.run_sync(router_cli, ["state", "sku", "A", "--server", nats_server.url], tmp_path)
    assert state.returncode == 1
    assert f"the router is not running: pid {pid} is gone" in state.stderr


async def test_the_summary_line_at_info_and_dead_letters_only_at_debug(nats_server: Any, tmp_path: Path) -> None:
    write_config(tmp_path / "config.toml", nats_server.url, log={"summary_every": "300ms"})
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(nats_server.url, rp)
        await publish_all(nats_server.url, EVENTS)

        def summed() -> dict[str, int]:
            totals: Counter[str] = Counter()
            for e in rp.log_events():
                if e.get("event") == "router_summary":
                    for k in ("events", "exceptions_raised", "exceptions_cleared", "dead_letters"):
                        totals[k] += int(e[k])
            return dict(totals)

        await wait_for(lambda: summed().get("dead_letters") == 3 and summed().get("events") == 5, 20.0)
        totals = summed()
        assert totals["exceptions_raised"] >= 2
        assert totals["exceptions_cleared"] >= 2
        line = next(e for e in rp.log_events() if e.get("event") == "router_summary")
        assert line["level"] == "info"
        assert {"events_per_s", "lag", "resident_actors"} <= line.keys()
        assert not [e for e in rp.log_events() if e.get("event") == "dead_lettered"]
