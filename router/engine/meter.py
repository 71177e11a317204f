"""What one partition reports to the metrics, and how its hot loop counts cheaply.

The drain must not pay for a metric call per event. It adds one integer per applied
event instead, a weight per kind (`router.metrics.applied_weights`) cached with the subject
(`counted`), and hands the sum to `PartitionMeter.batch` once per drain, which splits it into
kinds, records the drain's time and reads the lag from the last delivery's ack subject.
"""

from __future__ import annotations

import time
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
    """One partition's share of the metrics: what its loop and parts report."""

    __slots__ = ("_applied", "_apply_time", "_snapshot_time", "lag", "partition")

    def __init__(self, metrics: RouterMetrics, index: int) -> None:
        self.partition = label = str(index)
        # The labelled children, bound once: a batch's report is a few plain calls.
        self._applied = {kind: metrics.events_applied.labels(label, kind) for kind in KINDS}
        self._apply_time = metrics.apply_batch.labels(label)
        self._snapshot_time = metrics.snapshot_duration.labels(label)
        self.lag = 0  # events of the partition stored and not yet applied, as of its last delivery

    def start(self, backlog: int) -> None:
        """At start-up, before any delivery: the backlog (at most: with partitions, some is others')."""
        self.lag = backlog

    def batch(self, tally: int, last_reply: bytes, queued: int, started: float) -> None:
        """Once per drain that received messages (`last_reply` is the last one's ack subject, b"" when it
        received none): the events applied (a tally of weights), the lag after the last delivery and
        the drain's time since `started` (time.monotonic())."""
        if tally:
            applied = self._applied
            for kind, n in split_tally(tally, KINDS):
                applied[kind].inc(n)
        if last_reply:
            self.lag = reply_pending(last_reply) + queued
            self._apply_time.observe(time.monotonic() - started)

    def snapshot_written(self, seconds: float) -> None:
        self._snapshot_time.observe(seconds)

