"""The metrics registry: counters, gauges, collectors, the per-kind batch tally, the summary, the text form."""

from __future__ import annotations

import pytest

from router.metrics import Registry, RouterMetrics, Summary, applied_weights, exposition, split_tally

KINDS = ("sku", "shipment", "campaign")


def test_counters_and_gauges_by_label_tuple() -> None:
    r = Registry()
    c = r.counter("things_total", "Things", ("kind", "status"))
    g = r.gauge("depth", "Depth", ("partition",))
    c.inc(("sku", "raised"))
    c.inc(("sku", "raised"), 2)
    c.inc(("campaign", "cleared"))
    g.set(("0",), 5)
    g.set(("0",), 3)
    assert c.get(("sku", "raised")) == 3
    assert c.get(("shipment", "raised")) == 0
    assert c.total() == 4
    assert c.by("status") == {"raised": 3, "cleared": 1}
    assert c.by("kind") == {"sku": 3, "campaign": 1}
    assert g.get(("0",)) == 3
    assert r.check() == []
    c.inc(("sku",))
    assert r.check() == ["things_total('sku',): expected labels ('kind', 'status')"]
    with pytest.raises(ValueError, match="registered already"):
        r.gauge("depth", "again")


def test_collectors_run_before_every_read() -> None:
    r = Registry()
    g = r.gauge("resident", "Resident", ("partition",))
    sizes = {"0": 1}

    def collect() -> None:
        for p, n in sizes.items():
            g.set((p,), n)

    r.add_collector(collect)
    assert [m.name for m in r.collect()] == ["resident"]
    assert g.get(("0",)) == 1
    sizes["0"] = 7
    r.collect()
    assert g.get(("0",)) == 7
    r.remove_collector(collect)
    sizes["0"] = 9
    r.collect()
    assert g.get(("0",)) == 7


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
    m.events_applied.inc(("0", "sku"), 900)
    m.events_applied.inc(("1", "shipment"), 100)
    m.exceptions.inc(("sku", "stockout", "raised"), 3)
    m.exceptions.inc(("sku", "stockout", "cleared"), 1)
    m.dead_letters.inc(("malformed",), 2)
    m.consumer_lag.set(("0",), 40)
    m.consumer_lag.set(("1",), 2)
    m.registry.add_collector(lambda: m.resident_actors.set(("0",), 12))
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
    m.events_applied.inc(("0", "sku"), 50)
    now[0] = 115.0
    fields = summary.fields()
    assert (fields["events"], fields["events_per_s"], fields["exceptions_raised"], fields["dead_letters"]) == (
        50,
        10.0,
        0,
        0,
    )


def test_exposition_is_prometheus_text() -> None:
    m = RouterMetrics()
    m.events_applied.inc(("0", "sku"), 3)
    m.dead_letters.inc(('say "hi"\\',))
    m.last_snapshot_age.set(("0",), 1.5)
    text = exposition(m.registry.collect())
    assert "# TYPE router_events_applied_total counter\n" in text
    assert 'router_events_applied_total{partition="0",kind="sku"} 3\n' in text
    assert 'router_dead_letters_total{reason="say \\"hi\\"\\\\"} 1\n' in text
    assert "# TYPE router_last_snapshot_age_seconds gauge\n" in text
    assert 'router_last_snapshot_age_seconds{partition="0"} 1.5\n' in text
    assert m.registry.check() == []
