"""`GET /metrics` of a real router process on a real nats-server, read with prometheus-client's own
text parser: the values agree with what the streams hold (events applied per partition and kind,
exceptions per kind/rule/status, dead letters per reason, the latency histogram's count, the
open exceptions per rule), and every family keeps the naming conventions."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors import Thresholds
from contracts.decode import DecodeError, decode_event
from router import __version__
from router.http.server import read_url_file
from router.jetstream.streams import partition_of
from router.workload import workload
from tests.support.harness import publish_all, wait_for
from tests.support.metrics_names import naming_problems
from tests.support.oracle import fold, read_stream
from tests.support.procs import router_process, settle_process, wait_healthy, write_config

pytestmark = pytest.mark.anyio

DAY_US = 86_400_000_000
PARTITIONS = 2


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(fams: dict[str, Any], name: str, *labels: str, suffix: str = "") -> dict[tuple[str, ...], float]:
    """{label values: value} of family `name`'s samples named `name` + `suffix` (`_total` for a counter)."""
    fam = fams[name]
    sample = name + ("_total" if fam.type == "counter" else suffix)
    return {tuple(s.labels[n] for n in labels): s.value for s in fam.samples if s.name == sample}


def nonzero(d: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], int]:
    return {k: int(v) for k, v in d.items() if v}


async def test_metrics_agree_with_the_streams_and_keep_the_naming_conventions(
    nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    cfg = write_config(tmp_path / "config.toml", url, router={"partitions": PARTITIONS})
    # A day ahead: no timer comes due during the test, so every exception is caused by an event.
    messages = list(workload(seed=12, count=3000, bad_share=0.05, now_us=time.time_ns() // 1000 + DAY_US))
    messages += [("events.pallet.X", b"{}"), ("events.sku.Z", b"{nope")]  # bad_subject, malformed
    with router_process(tmp_path / "config.toml") as rp:
        await wait_for(lambda: read_url_file(cfg.data_dir) is not None, 20, "http.url")
        base = read_url_file(cfg.data_dir)
        assert base
        await wait_healthy(url, rp)  # its consumers made
        await publish_all(url, messages)
        await settle_process(url, cfg, rp)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            r = await client.get("/metrics")
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            text = r.text
            om = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.text.endswith("# EOF\n")
        nc = await nats.connect(url)
        try:
            open_reply = await nc.request("router.exceptions.open", b'{"limit": 1}', timeout=5)
        finally:
            await nc.close()

    events = await read_stream(url, cfg.streams.events)
    exp = fold(events, Thresholds.from_rules(cfg.rules), 2 * DAY_US)
    applied: Counter[tuple[str, str]] = Counter()
    keys: set[str] = set()
    for m in events:
        try:
            kind, key, _event = decode_event(m.subject, m.data)
        except DecodeError:
            continue
        keys.add(key)
        if m.seq not in exp.dead_letters:
            applied[(str(partition_of(key, PARTITIONS)), kind)] += 1
    exceptions = Counter(
        (e["kind"], e["rule"], e["status"])
        for e in (json.loads(m.data) for m in await read_stream(url, cfg.streams.exceptions))
    )
    dead = Counter((m.headers or {})["Router-Error"] for m in await read_stream(url, cfg.streams.deadletter))
    open_by_rule = Counter((k[0], k[2]) for k in exp.open)

    fams = families(text)
    assert nonzero(values(fams, "ops_router_events_applied", "partition", "kind")) == dict(applied)
    assert {p for p, _k in applied} == {"0", "1"}  # both partitions took part
    assert nonzero(values(fams, "ops_router_exceptions", "kind", "rule", "status")) == dict(exceptions)
    assert sum(exceptions.values()) == len(exp.exception_ids) > 0
    assert nonzero(values(fams, "ops_router_dead_letters", "reason")) == {(r,): n for r, n in dead.items()}
    assert {"bad_subject", "malformed"} <= set(dead)
    assert nonzero(values(fams, "ops_router_open_exceptions", "kind", "rule")) == dict(open_by_rule)
    assert sum(open_by_rule.values()) == json.loads(open_reply.data)["total"]

    # The latency histogram: one observation per exception (each caused by an event), cumulative buckets.
    hist = fams["ops_router_end_to_end_latency_seconds"].samples
    count = next(s.value for s in hist if s.name.endswith("_count"))
    total = next(s.value for s in hist if s.name.endswith("_sum"))
    buckets = [(float(s.labels["le"]), s.value) for s in hist if s.name.endswith("_bucket")]
    assert count == len(exp.exception_ids)
    assert buckets[-1] == (float("inf"), count)
    assert [v for _le, v in buckets] == sorted(v for _le, v in buckets)
    assert 0 < total / count < 60, total / count  # seconds, not microseconds

    batches = values(fams, "ops_router_apply_batch_duration_seconds", "partition", suffix="_count")
    assert set(batches) == {("0",), ("1",)}
    assert all(n > 0 for n in batches.values())
    assert values(fams, "ops_router_consumer_lag_messages", "partition") == {("0",): 0, ("1",): 0}
    resident = values(fams, "ops_router_resident_actors", "partition")
    assert sum(resident.values()) == len(exp.states)
    ages = values(fams, "ops_router_snapshot_age_seconds", "partition")
    assert set(ages) == {("0",), ("1",)}
    assert all(0 <= a < 60 for a in ages.values())
    assert sum(values(fams, "ops_router_snapshot_duration_seconds", "partition", suffix="_count").values()) > 0
    assert set(values(fams, "ops_router_timers_due_soon", "partition")) == {("0",), ("1",)}
    (build,) = fams["ops_router_build_info"].samples
    assert (build.labels["version"], build.value) == (__version__, 1.0)

    assert naming_problems(text, keys) == []
