"""The on-call sink against a real Alertmanager (Debian's prometheus-alertmanager 0.25).

The router and the sink run in this process against a real nats-server; Alertmanager runs as a
subprocess with docs/alertmanager.yml (short group waits), and its API says what is active.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import hypothesis  # noqa: F401  (imported before the router's gc.freeze(); see tests/support/alertmanager.py)
import pytest

from contracts.config import Config
from router.oncall.alerts import parse_time_us
from router.oncall.sink import run_sink
from router.oncall.status import read_status
from tests.support.alertmanager import Alertmanager, by_labels, running_alertmanager
from tests.support.harness import make_config, now_us, publish_all, running_router, wait_for
from tests.support.natsserver import NatsServer
from tests.support.oracle import read_stream

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def running_sink(cfg: Config) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(run_sink, cfg)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


def oncall_config(url: str, data: Path, am: Alertmanager, **oncall: Any) -> Config:
    return make_config(url, data, oncall={
        "alertmanager": am.url, "resend_every": "2s", "reconcile_every": "1s",
        "console_url": "https://router.example.com", **oncall,
    })


async def alerts(am: Alertmanager) -> dict[tuple[str, ...], dict[str, Any]]:
    return by_labels(await anyio.to_thread.run_sync(am.alerts))


def sku(key: str, **payload: Any) -> tuple[str, bytes]:
    return f"events.sku.{key}", json.dumps(payload).encode()


async def test_raise_is_active_clear_resolves_and_stockout_inhibits_low_stock(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with running_alertmanager(tmp_path / "am") as am:
        cfg = oncall_config(nats_server.url, tmp_path / "data", am,
                            runbooks={"stockout": "https://wiki.example.com/runbooks/stockout"})
        async with running_router(cfg), running_sink(cfg):
            await publish_all(nats_server.url, [sku("SKU-1", type="received", location="BLR-DS-4", qty=3)])
            low = ("low_stock", "sku", "SKU-1", "BLR-DS-4")

            async def low_active() -> bool:
                a = (await alerts(am)).get(low)
                return a is not None and a["status"]["state"] == "active"

            await wait_for(low_active, 20, "low_stock active")
            alert = (await alerts(am))[low]
            raised = [json.loads(m.data) for m in await read_stream(nats_server.url, cfg.streams.exceptions)]
            assert [e["rule"] for e in raised] == ["low_stock"]
            assert alert["labels"] == {"alertname": "low_stock", "kind": "sku", "key": "SKU-1",
                                       "location": "BLR-DS-4", "severity": "warning"}
            assert alert["annotations"]["summary"] == raised[0]["message"]
            assert alert["annotations"]["id"] == raised[0]["id"]
            assert "runbook_url" not in alert["annotations"]
            assert alert["generatorURL"] == "https://router.example.com/#sku/SKU-1"
            assert abs(parse_time_us(alert["startsAt"]) - parse_time_us(raised[0]["detected_at"])) < 1000

            # Sold out: stockout fires and inhibits the low_stock of the same SKU and location.
            await publish_all(nats_server.url, [sku("SKU-1", type="picked", location="BLR-DS-4", qty=3)])
            stock = ("stockout", "sku", "SKU-1", "BLR-DS-4")

            async def inhibited() -> bool:
                got = await alerts(am)
                return (
                    stock in got and got[stock]["status"]["state"] == "active"
                    and low in got and got[low]["status"]["state"] == "suppressed"
                    and bool(got[low]["status"]["inhibitedBy"])
                )

            await wait_for(inhibited, 20, "stockout active, low_stock inhibited")
            got = await alerts(am)
            assert got[stock]["annotations"]["runbook_url"] == "https://wiki.example.com/runbooks/stockout"
            assert got[stock]["labels"]["severity"] == "critical"

            # Restocked: both clear, both resolve.
            await publish_all(nats_server.url, [sku("SKU-1", type="received", location="BLR-DS-4", qty=50)])

            async def resolved() -> bool:
                return not (await alerts(am))

            await wait_for(resolved, 20, "both resolved")

            def status_says_sent() -> bool:  # (the file is rewritten every second)
                status = read_status(cfg)
                sent = status["targets"]["alertmanager"]["sent"] if status else {}
                return bool(sent) and sent["open"] == 2 and sent["close"] == 2

            await wait_for(status_says_sent, 10, "status file")
            status = read_status(cfg)
            assert status is not None
            assert status["targets"]["alertmanager"]["failed"] == 0
            assert status["targets"]["alertmanager"]["open"] == 0


async def test_min_open_holds_back_a_flicker(nats_server: NatsServer, tmp_path: Path) -> None:
    with running_alertmanager(tmp_path / "am") as am:
        cfg = oncall_config(nats_server.url, tmp_path / "data", am, min_open={"low_stock": "3s"})
        async with running_router(cfg), running_sink(cfg):
            # SKU-F flickers: low for a moment, then restocked. SKU-S stays low.
            await publish_all(nats_server.url, [
                sku("SKU-F", type="received", location="DEL-WH-1", qty=2),
                sku("SKU-S", type="received", location="DEL-WH-1", qty=2),
                sku("SKU-F", type="received", location="DEL-WH-1", qty=40),
            ])
            seen: set[tuple[str, ...]] = set()
            stay = ("low_stock", "sku", "SKU-S", "DEL-WH-1")
            first_seen_us = 0

            async def stays_active() -> bool:
                nonlocal first_seen_us
                got = await alerts(am)
                seen.update(got)
                if stay in got and not first_seen_us:
                    first_seen_us = now_us()
                return stay in got

            await wait_for(stays_active, 20, "the lasting low_stock posted")
            exc = {json.loads(m.data)["key"]: json.loads(m.data)
                   for m in await read_stream(nats_server.url, cfg.streams.exceptions)
                   if json.loads(m.data)["status"] == "raised"}
            # Posted only once open for min_open, counted from detected_at.
            assert first_seen_us >= parse_time_us(exc["SKU-S"]["detected_at"]) + 3_000_000
            # The flicker (raised and cleared within min_open) was never posted at all.
            assert ("low_stock", "sku", "SKU-F", "DEL-WH-1") not in seen

            def status_says_sent() -> bool:  # (the file is rewritten every second)
                status = read_status(cfg)
                sent = status["targets"]["alertmanager"]["sent"] if status else {}
                return bool(sent) and sent["open"] == 1

            await wait_for(status_says_sent, 10, "status file")
            status = read_status(cfg)
            assert status is not None
            assert status["targets"]["alertmanager"]["sent"]["close"] == 0


async def test_inside_router_run_a_delivered_shipment_resolves(nats_server: NatsServer, tmp_path: Path) -> None:
    """`router run` with [oncall] runs the sink too; a shipment's alerts carry its carrier, and once it
    is delivered the one exception no clear ends (temperature_excursion) resolves as well."""
    pytest.importorskip("router.engine.open_gather", reason="needs the router's open-exceptions query (5.1)")
    from contracts.times import rfc3339
    from tests.support.procs import router_process, wait_healthy, write_config

    with running_alertmanager(tmp_path / "am") as am:
        config = tmp_path / "router" / "config.toml"
        cfg = write_config(config, nats_server.url, oncall={
            "alertmanager": am.url, "resend_every": "2s", "reconcile_every": "1s",
        })
        with router_process(config) as rp:
            await wait_healthy(nats_server.url, rp)
            now = now_us()
            await publish_all(nats_server.url, [
                ("events.shipment.SHP-7", json.dumps({
                    "type": "booked", "promised_by": rfc3339(now + 86_400_000_000), "carrier": "SURFACE-CO",
                    "temp_min": 2.0, "temp_max": 8.0}).encode()),
                ("events.shipment.SHP-7", json.dumps({
                    "type": "in_transit", "eta": rfc3339(now + 2 * 86_400_000_000)}).encode()),
                ("events.shipment.SHP-7", json.dumps({"type": "temperature", "celsius": 12.5}).encode()),
            ])
            risk = ("sla_at_risk", "shipment", "SHP-7", "")
            temp = ("temperature_excursion", "shipment", "SHP-7", "")

            async def both_active() -> bool:
                got = await alerts(am)
                return risk in got and temp in got

            try:
                await wait_for(both_active, 30, "both shipment alerts active")
            except TimeoutError:
                raise AssertionError(rp.tail()) from None
            got = await alerts(am)
            assert got[risk]["labels"]["carrier"] == "SURFACE-CO"
            assert got[temp]["labels"] == {"alertname": "temperature_excursion", "kind": "shipment",
                                           "key": "SHP-7", "severity": "critical", "carrier": "SURFACE-CO"}
            await publish_all(nats_server.url, [("events.shipment.SHP-7", b'{"type":"delivered"}')])

            async def none_left() -> bool:
                return not await alerts(am)

            try:
                await wait_for(none_left, 30, "delivered: no alert left")
            except TimeoutError:
                raise AssertionError(f"{await alerts(am)}\n{rp.tail()}") from None
            stored = [json.loads(m.data) for m in await read_stream(nats_server.url, cfg.streams.exceptions)]
            # No clear was published for the excursion: the sink found the shipment finished.
            assert [(e["rule"], e["status"]) for e in stored] == [
                ("sla_at_risk", "raised"), ("temperature_excursion", "raised"), ("sla_at_risk", "cleared")]


async def test_backfill_does_not_page(nats_server: NatsServer, tmp_path: Path) -> None:
    """A raise caused by an event two days old when detected is skipped; a fresh one is posted."""
    from contracts.times import rfc3339

    with running_alertmanager(tmp_path / "am") as am:
        cfg = oncall_config(nats_server.url, tmp_path / "data", am, backfill_age="1h")
        async with running_router(cfg), running_sink(cfg):
            old = rfc3339(now_us() - 2 * 86_400_000_000)
            await publish_all(nats_server.url, [
                sku("SKU-OLD", type="received", location="BLR-DS-4", qty=2, ts=old),
                sku("SKU-NEW", type="received", location="BLR-DS-4", qty=2),
            ])
            new = ("low_stock", "sku", "SKU-NEW", "BLR-DS-4")

            async def new_active() -> bool:
                return new in await alerts(am)

            await wait_for(new_active, 20, "the fresh raise posted")

            def status_counts_the_skip() -> bool:
                status = read_status(cfg)
                return bool(status) and status["targets"]["alertmanager"]["skipped_backfill"] == 1  # type: ignore[index]

            await wait_for(status_counts_the_skip, 10, "status: one back-fill skipped")
            assert set(await alerts(am)) == {new}


async def test_alertmanager_away_then_back_catches_up(nats_server: NatsServer, tmp_path: Path) -> None:
    """Alertmanager stops; raises and clears go on; when it is back (empty: it keeps no alerts on
    disk) it ends up with exactly the open exceptions, without a restart of anything else."""
    with running_alertmanager(tmp_path / "am") as am:
        cfg = oncall_config(nats_server.url, tmp_path / "data", am)
        async with running_router(cfg), running_sink(cfg):
            await publish_all(nats_server.url, [sku("SKU-A", type="received", location="BLR-DS-4", qty=2)])
            a = ("low_stock", "sku", "SKU-A", "BLR-DS-4")

            async def a_active() -> bool:
                return a in await alerts(am)

            await wait_for(a_active, 20, "first alert")
            am.stop()
            await publish_all(nats_server.url, [
                sku("SKU-B", type="received", location="BLR-DS-4", qty=1),
                sku("SKU-C", type="received", location="DEL-WH-1", qty=1),
                sku("SKU-A", type="received", location="BLR-DS-4", qty=30),
            ])

            def retrying() -> bool:
                status = read_status(cfg)
                return bool(status) and bool(status["targets"]["alertmanager"]["retrying"])  # type: ignore[index]

            await wait_for(retrying, 20, "status: retrying while Alertmanager is away")
            am.start()
            want = {("low_stock", "sku", "SKU-B", "BLR-DS-4"), ("low_stock", "sku", "SKU-C", "DEL-WH-1")}

            async def caught_up() -> bool:
                return set(await alerts(am)) == want

            await wait_for(caught_up, 60, "Alertmanager back with exactly the open exceptions")


async def test_a_second_sink_stands_by_and_takes_over(nats_server: NatsServer, tmp_path: Path) -> None:
    """Two sinks (two routers with [oncall], or a spare `router oncall`): one runs, the other
    stands by and takes over once the first is gone, from its own data folder."""
    with running_alertmanager(tmp_path / "am") as am:
        # Re-posts a minute apart: an alert A left firing would stay so for 4 minutes on its own.
        cfg_a = oncall_config(nats_server.url, tmp_path / "a", am, resend_every="60s")
        cfg_b = oncall_config(nats_server.url, tmp_path / "b", am, resend_every="60s")
        async with running_router(cfg_a), anyio.create_task_group() as tg:
            sink_a = anyio.CancelScope()

            async def run_a(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                with sink_a:
                    await run_sink(cfg_a, task_status=task_status)

            await tg.start(run_a)
            await tg.start(run_sink, cfg_b)  # returns once it stands by
            await publish_all(nats_server.url, [sku("SKU-1", type="received", location="BLR-DS-4", qty=1)])
            first = ("low_stock", "sku", "SKU-1", "BLR-DS-4")

            async def posted(*keys: tuple[str, ...]) -> bool:
                return set(await alerts(am)) == set(keys)

            await wait_for(lambda: posted(first), 20, "posted by the first sink")
            a_status, b_status = read_status(cfg_a), read_status(cfg_b)
            assert a_status is not None
            assert b_status is None  # the second one stands by: no targets, no status
            sink_a.cancel()
            # While no sink runs, SKU-1 is restocked and SKU-2 runs low.
            await publish_all(nats_server.url, [
                sku("SKU-1", type="received", location="BLR-DS-4", qty=50),
                sku("SKU-2", type="received", location="DEL-WH-1", qty=1),
            ])
            second = ("low_stock", "sku", "SKU-2", "DEL-WH-1")
            # B folds the stream (a first start), resolves what cleared lately, posts what is open.
            await wait_for(lambda: posted(second), 30, "the second sink took over")
            await wait_for(lambda: read_status(cfg_b) is not None, 10, "its status")
            tg.cancel_scope.cancel()


async def test_first_start_after_exceptions_were_purged_posts_what_the_router_holds_open(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """EXCEPTIONS no longer holds the raise (retention, a purge): a first start finds nothing to fold
    and adds what router.exceptions.open lists."""
    import nats

    with running_alertmanager(tmp_path / "am") as am:
        cfg = oncall_config(nats_server.url, tmp_path / "data", am)
        async with running_router(cfg):
            await publish_all(nats_server.url, [sku("SKU-P", type="received", location="BLR-DS-4", qty=1)])
            nc = await nats.connect(nats_server.url)
            try:
                async def raised() -> bool:
                    info = await nc.jsm().stream_info(cfg.streams.exceptions)
                    return int(info.state.last_seq or 0) == 1

                await wait_for(raised, 20, "the raise stored")
                await nc.jsm().purge_stream(cfg.streams.exceptions)
            finally:
                await nc.close()
            async with running_sink(cfg):
                want = {("low_stock", "sku", "SKU-P", "BLR-DS-4")}

                async def posted() -> bool:
                    return set(await alerts(am)) == want

                await wait_for(posted, 30, "added from the router's open set")
