"""The router's Prometheus metrics (prometheus-client), one registry per runtime.

Every `RouterMetrics` owns its own `CollectorRegistry`: nothing is registered in
prometheus-client's global default registry, so several routers in one process (tests)
never collide. What reads it: `/metrics` (`exposition`), the periodic `router_summary`
log line (`Summary`) and the tests.

Names follow the Prometheus conventions: the `ops_router_` prefix, base units (`_seconds`,
`_bytes`) in the name, `_total` on counters, `_info` on the build pseudo-metric. Labels are
small, closed sets (partition, kind, rule, status, reason): never a SKU, shipment or
campaign id, a subject or anything else that grows without end.

- Tracked (the code that does the work reports it): events applied per partition and kind,
  exceptions per kind, rule and status, dead letters per reason, the end-to-end latency
  histogram, the apply time per batch, the snapshot duration.
- Read at scrape time (cheap to read, costly to track): consumer lag, resident actors,
  snapshot age, timer backlog, open exceptions. The runtime hands `watch_partitions` and
  `watch_open` functions that `collect()` calls on every scrape.

Hot paths count in local variables and report once per batch (see router.engine.meter):
never a metric call per event.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Final

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from contracts.rules import RULES
from router import __version__

log = structlog.get_logger()

# The `<name>_created` series prometheus-client adds to every counter and histogram are one
# more series per label set that Prometheus stores as a gauge of its own, and nothing here
# uses them: off, for this process (the router's own; a setting of prometheus-client's module).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX: Final = "ops_router_"
_RULE_PAIRS: Final = tuple((r.kind, r.name) for r in RULES)  # (kind, rule) of every rule the contract names

# Seconds. End to end: from the event's JetStream timestamp to the exception's publish
# acknowledged; a catch-up after a stop records how long the events waited.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)
# Seconds: one drain of a partition's received messages.
APPLY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Seconds: one snapshot, from its start to its commit.
SNAPSHOT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class PartitionGauges:
    """What one partition reports at scrape time (see `RouterMetrics.watch_partitions`)."""

    partition: int
    lag: int  # events of the partition stored and not yet applied, as of its last delivery
    resident_actors: int
    snapshot_age_s: float  # since the stored state last held everything applied then
    timers_due_soon: int  # timers in memory (due within the timer horizon), not fired yet
    timers_overdue_s: float  # how late the earliest of them is (0 when none is due yet)


PartitionSource = Callable[[], Iterable[PartitionGauges]]
# (kind, rule) -> exceptions open now; read from the store, so awaited (see `RouterMetrics.scrape`).
OpenSource = Callable[[], Awaitable[Mapping[tuple[str, str], int]]]


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


class _Gauges(Collector):
    """The gauges read at scrape time from the runtime's live state."""

    def __init__(self) -> None:
        self.partitions: PartitionSource = tuple
        self.open: OpenSource | None = None
        self.open_counts: Mapping[tuple[str, str], int] | None = None  # as of the last refresh

    async def refresh(self) -> None:
        """Read what needs an await; on failure the last values stay (and the failure is logged)."""
        if self.open is not None:
            try:
                self.open_counts = await self.open()
            except Exception as exc:
                log.warning("metrics_open_count_failed", error=repr(exc))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        parts = list(self.partitions())
        families: tuple[tuple[str, str, Callable[[PartitionGauges], float]], ...] = (
            ("consumer_lag_messages",
             "Events stored in the partition's share of EVENTS and not yet applied (as of its last delivery)",
             lambda p: p.lag),
            ("resident_actors", "Actors held in memory", lambda p: p.resident_actors),
            ("snapshot_age_seconds",
             "Seconds since the partition's stored state last held everything it had applied",
             lambda p: round(p.snapshot_age_s, 3)),
            ("timers_due_soon", "Timers in memory (due within [router] timer_horizon) not fired yet",
             lambda p: p.timers_due_soon),
            ("timer_backlog_seconds",
             "How late the partition's earliest unfired timer is (0 while none is due): the age of the timer backlog",
             lambda p: round(p.timers_overdue_s, 3)),
        )
        for name, help_text, read in families:
            g = GaugeMetricFamily(PREFIX + name, help_text, labels=("partition",))
            for p in parts:
                g.add_metric((str(p.partition),), float(read(p)))
            yield g
        counts = self.open_counts
        if counts is not None:
            g = GaugeMetricFamily(
                PREFIX + "open_exceptions",
                "Exceptions in force now (CONTRACT 5.1) in the partitions this instance runs, by kind and rule",
                labels=("kind", "rule"),
            )
            # Every rule the contract names, 0 when none is open: a series does not vanish at zero.
            for pair in (*_RULE_PAIRS, *sorted(set(counts) - set(_RULE_PAIRS))):
                g.add_metric(pair, float(counts.get(pair, 0)))
            yield g


class RouterMetrics:
    """The router's metrics: one home for their names, labels and meaning, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.events_applied = Counter(
            PREFIX + "events_applied", "Events applied to an actor, by partition and kind",
            ("partition", "kind"), registry=r,
        )
        self.exceptions = Counter(
            PREFIX + "exceptions", "Exception events published, by kind, rule and status (raised or cleared)",
            ("kind", "rule", "status"), registry=r,
        )
        self.dead_letters = Counter(
            PREFIX + "dead_letters", "Events dead-lettered, by Router-Error reason", ("reason",), registry=r,
        )
        self.end_to_end = Histogram(
            PREFIX + "end_to_end_latency_seconds",
            "From an event's JetStream timestamp to the publish acknowledged of an exception it caused",
            registry=r, buckets=LATENCY_BUCKETS,
        )
        self.apply_batch = Histogram(
            PREFIX + "apply_batch_duration_seconds",
            "Time to apply one batch of received messages (one drain of the partition's queue)",
            ("partition",), registry=r, buckets=APPLY_BUCKETS,
        )
        self.snapshot_duration = Histogram(
            PREFIX + "snapshot_duration_seconds", "Time to write one snapshot, from its start to its commit",
            ("partition",), registry=r, buckets=SNAPSHOT_BUCKETS,
        )
        self.http_ingested = Counter(
            PREFIX + "http_ingest_events",
            "Events received over HTTP (POST /events, its batch form, /sources), by outcome: stored, "
            "duplicate (an Idempotency-Key seen before), rejected (400), too_large (413), unavailable (503)",
            ("outcome",), registry=r,
        )
        self.http_source_payloads = Counter(
            PREFIX + "http_source_payloads",
            "Partner webhook payloads (POST /sources/<name>), by source and outcome: mapped, unmapped "
            "(kept in DEADLETTER), bad_signature (401), unavailable (503)",
            ("source", "outcome"), registry=r,
        )
        self.build = Info(PREFIX + "build", "The router's version and what it runs on", registry=r)
        self.build.info({
            "version": __version__,
            "python": platform.python_version(),
            "nats_py": _package_version("nats-py"),
        })
        self._gauges = _Gauges()
        r.register(self._gauges)

    def watch_partitions(self, source: PartitionSource) -> None:
        """`source()` is called at every scrape for the partitions this instance runs now."""
        self._gauges.partitions = source

    def watch_open(self, source: OpenSource) -> None:
        """`await source()` at every `scrape`: open exceptions per (kind, rule)."""
        self._gauges.open = source

    def partitions(self) -> list[PartitionGauges]:
        return list(self._gauges.partitions())

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """What `GET /metrics` serves: (body, Content-Type) for the request's Accept header.

        Reads what needs an await first (the open exceptions, counted in the snapshot store),
        then renders every metric (see `exposition`). Call it from the router's event loop.
        """
        await self._gauges.refresh()
        return exposition(self.registry, accept)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The text now, without the await of `scrape`: the open exceptions as of the last scrape."""
        return exposition(self.registry, accept)


def exposition(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The body and Content-Type of a `/metrics` reply: every metric of `registry`, as text.

    `accept` is the request's Accept header ("" or absent: the Prometheus text format 0.0.4;
    `application/openmetrics-text`: OpenMetrics). Call it from the router's event loop
    thread: the scrape-time gauges read the partitions' live state.
    """
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def samples(source: Collector, name: str) -> list[Sample]:
    """Every sample named `name` (e.g. `ops_router_events_applied_total`) that `source` (a registry
    or one metric) holds now."""
    return [s for family in source.collect() for s in family.samples if s.name == name]


def total(source: Collector, name: str, **match: str) -> float:
    """The sum of the samples named `name` whose labels include `match`."""
    return sum(s.value for s in samples(source, name) if all(s.labels.get(k) == v for k, v in match.items()))


# The events of one kind counted in one integer per batch (see `applied_weights`).
KIND_BITS: Final = 32
_KIND_MASK: Final = (1 << KIND_BITS) - 1


def applied_weights(kinds: Iterable[str]) -> dict[str, int]:
    """Per kind, what one event adds to a batch's single tally: 1, 2**32, 2**64, ...

    The partition's hot loop counts the events it applies per kind with one integer
    addition each (`tally += weight`, the weight cached with the subject) and splits the
    tally once per batch with `split_tally`. A batch would need 2**32 events of one kind
    to spill into the next kind's bits.
    """
    return {kind: 1 << (KIND_BITS * i) for i, kind in enumerate(kinds)}


def split_tally(tally: int, kinds: Iterable[str]) -> list[tuple[str, int]]:
    """(kind, events) with events > 0, of a tally made with `applied_weights(kinds)`."""
    out: list[tuple[str, int]] = []
    for kind in kinds:
        n = tally & _KIND_MASK
        if n:
            out.append((kind, n))
        tally >>= KIND_BITS
    return out


class Summary:
    """The one-line periodic summary of the router's activity, read from the metrics.

    Each `fields()` call reports what happened since the previous one: events applied per
    second, exceptions raised and cleared, dead letters; and, as they stand, the consumer
    lag and resident actors.
    """

    def __init__(self, metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._last = self._read()
        self._at = clock()

    def _read(self) -> tuple[float, float, float, float]:
        m = self.metrics
        exceptions = PREFIX + "exceptions_total"
        return (
            total(m.events_applied, PREFIX + "events_applied_total"),
            total(m.exceptions, exceptions, status="raised"),
            total(m.exceptions, exceptions, status="cleared"),
            total(m.dead_letters, PREFIX + "dead_letters_total"),
        )

    def fields(self) -> dict[str, float | int]:
        now = self.clock()
        current = self._read()
        parts = self.metrics.partitions()
        applied, raised, cleared, dead = (int(c - p) for c, p in zip(current, self._last, strict=True))
        span = max(now - self._at, 1e-9)
        self._last, self._at = current, now
        return {
            "events_per_s": round(applied / span, 1),
            "events": applied,
            "exceptions_raised": raised,
            "exceptions_cleared": cleared,
            "dead_letters": dead,
            "lag": sum(p.lag for p in parts),
            "resident_actors": sum(p.resident_actors for p in parts),
            "interval_s": round(span, 1),
        }
