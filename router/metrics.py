"""One metrics registry: the counters and gauges every part of the router reports to.

Small and in-house. What reads it: the periodic `router_summary` log line, the health
model, and later a Prometheus exposition (`exposition()` already writes that text form).

- A metric has a name, a help text and fixed label names; a sample is keyed by a tuple of
  label values in that order (`("0", "sku")`). Labels are small, closed sets (partition,
  kind, rule, status, reason): never a key, an id or a subject, which would grow without end.
- Counters only go up (`inc`); gauges are set (`set`). Neither checks its labels on the way
  in: the callers are few, and `Registry.check()` (run by the tests) finds a wrong arity.
- Hot paths count in local variables and report once per batch (see the partition's drain).
- Values that are cheap to read but costly to track (resident actors, snapshot age) are set
  by collectors, which `collect()` runs before anything reads the registry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import ClassVar, Final, TypeVar

Labels = tuple[str, ...]


class Metric:
    """A named family of samples, one per label tuple."""

    kind: ClassVar[str] = "untyped"
    __slots__ = ("help", "labelnames", "name", "values")

    def __init__(self, name: str, help: str, labelnames: Labels = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.values: dict[Labels, float] = {}

    def get(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0)

    def total(self) -> float:
        """The sum over every label tuple."""
        return sum(self.values.values())

    def by(self, label: str) -> dict[str, float]:
        """Sums per value of one label (`exceptions.by("status")` -> {"raised": 3, "cleared": 1})."""
        i = self.labelnames.index(label)
        out: dict[str, float] = {}
        for labels, value in self.values.items():
            out[labels[i]] = out.get(labels[i], 0) + value
        return out


class Counter(Metric):
    kind = "counter"
    __slots__ = ()

    def inc(self, labels: Labels = (), n: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + n


class Gauge(Metric):
    kind = "gauge"
    __slots__ = ()

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value


_M = TypeVar("_M", bound=Metric)


class Registry:
    """Every metric of one process, by name."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def counter(self, name: str, help: str, labelnames: Labels = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Labels = ()) -> Gauge:
        return self._add(Gauge(name, help, labelnames))

    def _add(self, metric: _M) -> _M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered already")
        self._metrics[metric.name] = metric
        return metric

    def add_collector(self, collect: Callable[[], None]) -> None:
        """`collect()` runs before every read: it sets gauges that are read, not tracked."""
        self._collectors.append(collect)

    def remove_collector(self, collect: Callable[[], None]) -> None:
        self._collectors.remove(collect)

    def collect(self) -> list[Metric]:
        """Run the collectors, then every metric by name."""
        for collect in list(self._collectors):
            collect()
        return [self._metrics[name] for name in sorted(self._metrics)]

    def __getitem__(self, name: str) -> Metric:
        return self._metrics[name]

    def check(self) -> list[str]:
        """Samples whose label tuple does not match their metric's label names."""
        return [
            f"{m.name}{labels}: expected labels {m.labelnames}"
            for m in self._metrics.values()
            for labels in m.values
            if len(labels) != len(m.labelnames) or not all(isinstance(v, str) for v in labels)
        ]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def exposition(metrics: Iterable[Metric]) -> str:
    """The Prometheus text format (version 0.0.4) of `metrics` (e.g. `registry.collect()`)."""
    lines: list[str] = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in sorted(m.values.items()):
            if labels:
                pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(m.labelnames, labels, strict=True))
                lines.append(f"{m.name}{{{pairs}}} {_number(value)}")
            else:
                lines.append(f"{m.name} {_number(value)}")
    return "\n".join(lines) + "\n"


class RouterMetrics:
    """The router's metrics: one home for their names, labels and meaning."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = r = registry if registry is not None else Registry()
        self.events_applied = r.counter(
            "router_events_applied_total", "Events applied to an actor", ("partition", "kind")
        )
        self.exceptions = r.counter(
            "router_exceptions_total",
            "Exception events published (raised or cleared), by kind and rule",
            ("kind", "rule", "status"),
        )
        self.dead_letters = r.counter(
            "router_dead_letters_total", "Events dead-lettered, by Router-Error reason", ("reason",)
        )
        self.consumer_lag = r.gauge(
            "router_consumer_lag",
            "Events stored in the partition's share of EVENTS and not yet applied (as of its last delivery)",
            ("partition",),
        )
        self.resident_actors = r.gauge("router_resident_actors", "Actors held in memory", ("partition",))
        self.last_snapshot_age = r.gauge(
            "router_last_snapshot_age_seconds",
            "Seconds since the partition's stored state last caught up with what it applied",
            ("partition",),
        )


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
    """The one-line periodic summary of the router's activity, read from the registry.

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
        status = m.exceptions.by("status")
        return (m.events_applied.total(), status.get("raised", 0), status.get("cleared", 0), m.dead_letters.total())

    def fields(self) -> dict[str, float | int]:
        self.metrics.registry.collect()
        now = self.clock()
        current = self._read()
        applied, raised, cleared, dead = (int(c - p) for c, p in zip(current, self._last, strict=True))
        span = max(now - self._at, 1e-9)
        self._last, self._at = current, now
        return {
            "events_per_s": round(applied / span, 1),
            "events": applied,
            "exceptions_raised": raised,
            "exceptions_cleared": cleared,
            "dead_letters": dead,
            "lag": int(self.metrics.consumer_lag.total()),
            "resident_actors": int(self.metrics.resident_actors.total()),
            "interval_s": round(span, 1),
        }
