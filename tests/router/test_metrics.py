"""The metrics: a registry per runtime, the names, the scrape-time gauges, the per-kind batch tally,
the summary, the exposition (parsed with prometheus-client's own parser)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.engine.meter import PartitionMeter
from router.metrics import (
    PartitionGauges,
    RouterMetrics,
    Summary,
    applied_weights,
    exposition,
    split_tally,
    total,
)
from tests.support.metrics_names import naming_problems

KINDS = ("sku", "shipment", "campaign")


def families(m: RouterMetrics, accept: str = "") -> dict[str, object]:
    body, _ = m.exposition(accept)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_each_runtime_has_a_registry_of_its_own() -> None:
    a, b = RouterMetrics(), RouterMetrics()  # a second one would raise "Duplicated timeseries" if shared
    a.events_applied.labels("0", "sku").inc(3)
    assert a.registry.get_sample_value("ops_router_events_applied_total", {"partition": "0", "kind": "sku"}) == 3
    assert b.registry.get_sample_value("ops_router_events_applied_total", {"partition": "0", "kind": "sku"}) is None
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("ops_router_events_applied_total", {"partition": "0", "kind": "sku"}) is None


@pytest.mark.anyio
async def test_scrape_time_gauges_read_the_runtime_at_every_scrape() -> None:
    m = RouterMetrics()
    lag = [7]
    m.watch_partitions(lambda: [PartitionGauges(0, lag[0], 3, 1.23456, 2, 0.5), PartitionGauges(1, 0, 1, 0, 0, 0)])
    open_now = {("sku", "stockout"): 2, ("shipment", "sla_at_risk"): 1}

    async def count_open() -> dict[tuple[str, str], int]:
        return dict(open_now)

    m.watch_open(count_open)
    r = m.registry
    assert r.get_sample_value("ops_router_open_exceptions", {"kind": "sku", "rule": "stockout"}) is None
    await m.scrape()
    assert r.get_sample_value("ops_router_consumer_lag_messages", {"partition": "0"}) == 7
    lag[0] = 9
    assert r.get_sample_value("ops_router_consumer_lag_messages", {"partition": "0"}) == 9
    assert r.get_sample_value("ops_router_resident_actors", {"partition": "1"}) == 1
    assert r.get_sample_value("ops_router_snapshot_age_seconds", {"partition": "0"}) == 1.235
    assert r.get_sample_value("ops_router_timers_due_soon", {"partition": "0"}) == 2
    assert r.get_sample_value("ops_router_timer_backlog_seconds", {"partition": "0"}) == 0.5
    assert r.get_sample_value("ops_router_open_exceptions", {"kind": "sku", "rule": "stockout"}) == 2
    assert r.get_sample_value("ops_router_open_exceptions", {"kind": "shipment", "rule": "sla_at_risk"}) == 1
    # Every rule the contract names is there, at 0 when none is open.
    assert r.get_sample_value("ops_router_open_exceptions", {"kind": "campaign", "rule": "cpa_exceeded"}) == 0
    open_now.pop(("sku", "stockout"))
    assert r.get_sample_value("ops_router_open_exceptions", {"kind": "sku", "rule": "stockout"}) == 2  # as of the last
    body, content_type = await m.scrape()
    assert content_type.startswith("text/plain")
    assert r.get_sample_value("ops_router_open_exceptions", {"kind": "sku", "rule": "stockout"}) == 0
    assert b'ops_router_open_exceptions{kind="sku",rule="stockout"} 0.0' in body


def test_build_info_names_the_versions() -> None:
    import platform

    from router import __version__

    (sample,) = [s for f in RouterMetrics().registry.collect() for s in f.samples if s.name == "ops_router_build_info"]
    assert sample.value == 1
    assert sample.labels["version"] == __version__
    assert sample.labels["python"] == platform.python_version()
    assert sample.labels["nats_py"].count(".") == 2


def test_a_batch_reports_once_per_kind_and_its_time() -> None:
    m = RouterMetrics()
    meter = PartitionMeter(m, 3)
    weights = applied_weights(KINDS)
    reply = b"$JS.ACK.EVENTS.c.1.10.10.1700000000000000000.4"  # 4 pending
    meter.batch(weights["sku"] * 5 + weights["campaign"] * 2, reply, 6, started=0.0)
    meter.batch(0, b"", 0, started=0.0)  # a drain of pull statuses only: nothing observed
    r = m.registry
    assert r.get_sample_value("ops_router_events_applied_total", {"partition": "3", "kind": "sku"}) == 5
    assert r.get_sample_value("ops_router_events_applied_total", {"partition": "3", "kind": "campaign"}) == 2
    assert r.get_sample_value("ops_router_events_applied_total", {"partition": "3", "kind": "shipment"}) == 0
    assert r.get_sample_value("ops_router_apply_batch_duration_seconds_count", {"partition": "3"}) == 1
    assert meter.lag == 10
    meter.snapshot_written(0.02)
    assert r.get_sample_value("ops_router_snapshot_duration_seconds_count", {"partition": "3"}) == 1
    assert r.get_sample_value("ops_router_snapshot_duration_seconds_sum", {"partition": "3"}) == 0.02


@pytest.mark.parametrize("counts", [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5, 0, 3), (2_000_000, 600_000, 1)])
def test_one_integer_per_batch_counts_each_kind(counts: tuple[int, int, int]) -> None:
    weights = applied_weights(KINDS)
    tally = 0
    for kind, n in zip(KINDS, counts, strict=True):
        for _ in range(min(n, 1000)):
            tally += weights[kind]
        tally += weights[kind] * max(0, n - 1000)  # the rest in one step: same sum
    assert split_tally(tally, KINDS) == [(k, n) for k, n in zip(KINDS, counts, strict=True) if n]


def test_summary_reports_what_happened_since_the_last_line() -> None:
    now = [100.0]
    m = RouterMetrics()
    summary = Summary(m, clock=lambda: now[0])
    m.events_applied.labels("0", "sku").inc(900)
    m.events_applied.labels("1", "shipment").inc(100)
    m.exceptions.labels("sku", "stockout", "raised").inc(3)
    m.exceptions.labels("sku", "stockout", "cleared").inc(1)
    m.dead_letters.labels("malformed").inc(2)
    m.watch_partitions(lambda: [PartitionGauges(0, 40, 12, 0, 0, 0), PartitionGauges(1, 2, 0, 0, 0, 0)])
    now[0] = 110.0
    assert summary.fields() == {
        "events_per_s": 100.0,
        "events": 1000,
        "exceptions_raised": 3,
        "exceptions_cleared": 1,
        "dead_letters": 2,
        "lag": 42,
        "resident_actors": 12,
        "interval_s": 10.0,
    }
    m.events_applied.labels("0", "sku").inc(50)
    now[0] = 115.0
    fields = summary.fields()
    assert (fields["events"], fields["events_per_s"], fields["exceptions_raised"], fields["dead_letters"]) == (
        50,
        10.0,
        0,
        0,
    )
    assert total(m.events_applied, "ops_router_events_applied_total", kind="sku") == 950


def test_exposition_is_prometheus_text_that_its_parser_reads() -> None:
    m = RouterMetrics()
    m.events_applied.labels("0", "sku").inc(3)
    m.dead_letters.labels('say "hi"\\').inc()
    m.end_to_end.observe(0.003)
    m.end_to_end.observe(0.2)
    body, content_type = exposition(m.registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "# TYPE ops_router_events_applied_total counter\n" in text
    assert "_created" not in text  # one series per label set, not two
    fams = families(m)
    applied = fams["ops_router_events_applied"]
    assert [(s.name, s.labels, s.value) for s in applied.samples] == [  # type: ignore[attr-defined]
        ("ops_router_events_applied_total", {"partition": "0", "kind": "sku"}, 3.0)
    ]
    (dead,) = fams["ops_router_dead_letters"].samples  # type: ignore[attr-defined]
    assert dead.labels == {"reason": 'say "hi"\\'}
    hist = {s.name + s.labels.get("le", ""): s.value for s in fams["ops_router_end_to_end_latency_seconds"].samples}  # type: ignore[attr-defined]
    assert hist["ops_router_end_to_end_latency_seconds_count"] == 2
    assert hist["ops_router_end_to_end_latency_seconds_bucket0.005"] == 1
    assert hist["ops_router_end_to_end_latency_seconds_bucket+Inf"] == 2
    assert naming_problems(text) == []
    body, content_type = m.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_the_naming_check_finds_what_breaks_the_conventions() -> None:
    bad = (
        "# TYPE ops_router_events_total counter\nops_router_events_total 1\n"  # as it should be
        "# TYPE ops_router_things_seen counter\nops_router_things_seen 1\n"  # a counter without _total
        "# TYPE router_lag gauge\nrouter_lag 1\n"  # no prefix
        "# TYPE ops_router_latency_ms gauge\nops_router_latency_ms 3\n"  # not a base unit
        "# TYPE ops_router_things gauge\nops_router_things{key=\"SKU-1\"} 1\n"  # an entity key as a label
        '# TYPE ops_router_total_seconds gauge\nops_router_total_seconds{sku="x"} 1\n'  # entity label name
    )
    problems = naming_problems(bad)
    assert any("router_lag" in p and "prefix" in p for p in problems)
    assert any("ops_router_latency_ms" in p and "unit" in p for p in problems)
    assert any("key" in p for p in problems)
    assert any("sku" in p for p in problems)
    assert any("ops_router_things_seen" in p and "_total" in p for p in problems)
    assert not any("ops_router_events" in p for p in problems)


@pytest.mark.anyio
async def test_the_dashboard_and_scrape_config_in_docs_use_these_metrics() -> None:
    import json
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    m = RouterMetrics()

    async def none_open() -> dict[tuple[str, str], int]:
        return {}

    m.watch_open(none_open)
    body, _ = await m.scrape()
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    dash = json.loads((docs / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {n for e in exprs for n in re.findall(r"\bops_router_\w+", e)}
    unknown = {n for n in used if re.sub(r"_(total|bucket|sum|count)$", "", n) not in names}
    assert unknown == set()
    # Rates, lag, latency quantiles from the histogram, open exceptions, dead letters.
    for wanted in ("ops_router_events_applied_total", "ops_router_consumer_lag_messages",
                   "ops_router_end_to_end_latency_seconds_bucket", "ops_router_open_exceptions",
                   "ops_router_dead_letters_total"):
        assert wanted in used, wanted
    assert any("histogram_quantile(0.99" in e for e in exprs)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"] if p["type"] != "row")
    scrape = (docs / "prometheus.yml").read_text()
    assert scrape.count("metrics_path: /metrics") >= 2
    assert 'targets: ["127.0.0.1:8080"]' in scrape
