"""What a partition uses of the daemon, built by the daemon and handed down (nothing reaches back up)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.manager import JetStreamManager

from actors import Thresholds
from contracts.config import Config
from router.jetstream.publisher import Publisher
from router.metrics import RouterMetrics
from snapshots import Store

RawHandler = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]


@dataclass(frozen=True, slots=True)
class PartitionDeps:
    """The daemon's parts a partition works with."""

    cfg: Config
    nc: NATS
    jsm: JetStreamManager
    store: Store
    publisher: Publisher
    thresholds: Thresholds
    now_us: Callable[[], int]  # the wall clock in microseconds (injectable for tests)
    raw_path: Callable[[Any, RawHandler], None]  # deliver a subscription's messages to a handler raw
    horizon_us: int  # `[router] timer_horizon`
    snapshot_every_s: float  # `[snapshots] every`
    metrics: RouterMetrics = field(default_factory=RouterMetrics)  # the process's registry
