"""What one partition reports to the metrics registry, and how its hot loop counts cheaply.

The drain must not pay for a dictionary update per event. It adds one integer per applied
event instead, a weight per kind (`router.metrics.applied_weights`) cached with the subject
(`counted`), and hands the sum to `PartitionMeter.batch` once per drain, which splits it into
kinds and reads the lag from the last delivery's ack subject.
"""

from __future__ import annotations

from typing import Final

import actors
from contracts.decode import Rejected, StoredSubject
from router.jetstream.pull import reply_pending
from router.metrics import RouterMetrics, applied_weights, split_tally

KINDS: Final = tuple(actors.ACTORS)
WEIGHTS: Final = applied_weights(KINDS)

# A stored subject as the partition caches it: (subject, kind, key, (kind, key), weight of the kind).
CountedSubject = tuple[str, str, str, tuple[str, str], int]


def counted(parsed: StoredSubject | Rejected) -> CountedSubject | Rejected:
    """A subject's reading with its kind's weight appended (a Rejected one as it is)."""
    if isinstance(parsed, Rejected):
        return parsed
    return (*parsed, WEIGHTS[parsed[1]])


class PartitionMeter:
    """One partition's share of the registry: what its loop and parts report."""

    __slots__ = ("_applied", "_lag_gauge", "label", "lag", "metrics", "partition")

    def __init__(self, metrics: RouterMetrics, index: int) -> None:
        self.metrics = metrics
        self.partition = str(index)
        self.label = (self.partition,)
        self._applied = metrics.events_applied
        self._lag_gauge = metrics.consumer_lag
        self.lag = 0  # events of the partition stored and not yet applied, as of its last delivery

    def start(self, backlog: int) -> None:
        """At start-up, before any delivery: the backlog (at most: with partitions, some is others')."""
        self.lag = backlog
        self._lag_gauge.set(self.label, backlog)

    def batch(self, tally: int, last_reply: bytes, queued: int) -> None:
        """Once per drain: the events applied (a tally of weights) and the lag after the last delivery."""
        if tally:
            partition, applied = self.partition, self._applied
            for kind, n in split_tally(tally, KINDS):
                applied.inc((partition, kind), n)
        if last_reply:
            self.lag = reply_pending(last_reply) + queued
            self._lag_gauge.set(self.label, self.lag)

    def collect(self, resident: int, snapshot_age_s: float) -> None:
        """The gauges read rather than tracked (see Registry.add_collector)."""
        m = self.metrics
        m.resident_actors.set(self.label, resident)
        m.last_snapshot_age.set(self.label, round(snapshot_age_s, 3))
        m.consumer_lag.set(self.label, self.lag)
