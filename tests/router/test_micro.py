"""The query API as the NATS micro service `ops-router`: what `nats micro ls/info/stats` ask
($SRV.PING / $SRV.INFO / $SRV.STATS), answered by real router processes on a real nats-server.
Every instance gets every request (a queue group of its own), so the owner of a key's
partition answers it, also with a standby beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from router import __version__
from tests.support.harness import publish_all, wait_for
from tests.support.procs import router_process, settle_process, wait_healthy, write_config

pytestmark = pytest.mark.anyio

ENDPOINTS = {
    "state": "router.state.>",
    "exceptions-open": "router.exceptions.open",
    "health": "router.health",
    "settings-list": "router.settings.list",
}


async def gather(nc: Any, subject: str, want: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every reply to one request on `subject`, until `want` came (more may follow: those are kept too
    when they come before the deadline's check)."""
    replies: list[dict[str, Any]] = []
    inbox = nc.new_inbox()

    async def on_reply(msg: Any) -> None:
        replies.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await wait_for(lambda: len(replies) >= want, timeout, f"{want} replies on {subject}")
        await nc.flush()
    finally:
        await sub.unsubscribe()
    return replies


def by_name(endpoints: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in endpoints}


async def test_the_router_is_found_as_a_micro_service_with_its_endpoints_and_stats(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    cfg = write_config(tmp_path / "config.toml", url)
    with router_process(tmp_path / "config.toml") as rp:
        await wait_healthy(url, rp)
        await publish_all(url, [("events.sku.A", b'{"type": "received", "location": "L1", "qty": 3}')])
        await settle_process(url, cfg, rp)
        instance = (cfg.data_dir / "instance.id").read_text().strip()
        nc = await nats.connect(url)
        try:
            (ping,) = await gather(nc, "$SRV.PING", 1)
            assert ping["type"] == "io.nats.micro.v1.ping_response"
            assert (ping["name"], ping["version"]) == ("ops-router", __version__)
            assert ping["metadata"] == {"instance": instance}

            info = json.loads((await nc.request("$SRV.INFO.ops-router", b"", timeout=5)).data)
            assert info["id"] == ping["id"]
            assert info["description"]
            endpoints = by_name(info["endpoints"])
            for name, subject in ENDPOINTS.items():
                assert endpoints[name]["subject"] == subject, endpoints
            assert endpoints["health-instance"]["subject"] == f"router.health.{instance}"
            groups = {e["queue_group"] for e in endpoints.values()}
            assert groups == {f"ops-router-{ping['id']}"}  # one of its own, not the shared default "q"

            before = by_name(json.loads((await nc.request(f"$SRV.STATS.ops-router.{ping['id']}", b"")).data)["endpoints"])
            for _ in range(5):
                reply = json.loads((await nc.request("router.state.sku.A", b"", timeout=5)).data)
                assert (reply["seq"], reply["state"]["available"]) == (1, 3), reply
            bad = json.loads((await nc.request("router.state.pallet.X", b"", timeout=5)).data)
            assert "expected router.state" in bad["error"]
            health = json.loads((await nc.request(f"router.health.{instance}", b"", timeout=5)).data)
            assert health["status"] == "ok"
            page = json.loads((await nc.request("router.settings.list", b"{}", timeout=5)).data)
            assert "error" not in page, page

            stats = json.loads((await nc.request("$SRV.STATS.ops-router", b"", timeout=5)).data)
            assert stats["type"] == "io.nats.micro.v1.stats_response"
            after = by_name(stats["endpoints"])
            assert after["state"]["num_requests"] - before["state"]["num_requests"] == 6
            assert after["state"]["num_errors"] == 0  # a bad subject is answered with an error body
            assert after["state"]["processing_time"] > before["state"]["processing_time"]
            assert after["health-instance"]["num_requests"] - before["health-instance"]["num_requests"] == 1
            assert after["settings-list"]["num_requests"] - before["settings-list"]["num_requests"] == 1
            assert after["state"]["data"] == {"instance": instance, "partitions": [0]}
        finally:
            await nc.close()


async def test_every_instance_receives_each_query_and_the_owner_answers(nats_server: Any, tmp_path: Path) -> None:
    """With a shared queue group a standby would receive about half the state requests and leave
    them unanswered; with one of its own per process each instance receives all of them."""
    url = nats_server.url
    router = {"lease": "3s", "lease_renew_every": "1s"}
    cfg = write_config(tmp_path / "a" / "config.toml", url, router=router)
    write_config(tmp_path / "b" / "config.toml", url, router=router)
    with router_process(tmp_path / "a" / "config.toml") as a, router_process(
        tmp_path / "b" / "config.toml", start=False
    ) as b:
        await wait_healthy(url, a)
        b.start()
        await publish_all(url, [("events.sku.A", b'{"type": "received", "location": "L1", "qty": 4}')])
        await settle_process(url, cfg, a)
        nc = await nats.connect(url)
        try:
            await wait_for(
                lambda: any(e.get("event") == "ownership_standby" for e in b.log_events()), 20, "b standing by"
            )
            pings = await gather(nc, "$SRV.PING.ops-router", 2)
            ids = {p["id"] for p in pings}
            assert len(ids) == 2, pings
            instances = {p["metadata"]["instance"] for p in pings}
            assert instances == {
                (tmp_path / x / "data" / "instance.id").read_text().strip() for x in ("a", "b")
            }
            before = {i: by_name(json.loads((await nc.request(f"$SRV.STATS.ops-router.{i}", b"")).data)["endpoints"])
                      for i in ids}
            for _ in range(20):
                reply = json.loads((await nc.request("router.state.sku.A", b"", timeout=5)).data)
                assert reply["state"]["available"] == 4, reply
            for _ in range(3):  # CONTRACT 5.1: every instance answers for the partitions it runs
                reply = json.loads((await nc.request("router.exceptions.open", b"{}", timeout=5)).data)
                assert reply["partitions"] == [0], reply
            with anyio.fail_after(10):
                after = {i: by_name(json.loads((await nc.request(f"$SRV.STATS.ops-router.{i}", b"")).data)["endpoints"])
                         for i in ids}
            for i in ids:
                assert after[i]["state"]["num_requests"] - before[i]["state"]["num_requests"] == 20, (i, after[i])
                opened = after[i]["exceptions-open"]["num_requests"] - before[i]["exceptions-open"]["num_requests"]
                assert opened == 3, (i, after[i])
            owned = sorted(tuple(after[i]["state"]["data"]["partitions"]) for i in ids)
            assert owned == [(), (0,)]  # the standby runs none
        finally:
            await nc.close()
