"""The Prometheus naming conventions the router's metrics keep, as a check over a text exposition."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

PREFIX: Final = "ops_router_"
# Label names: small, closed sets only (never an entity key, an id or a subject).
LABELS: Final = frozenset(
    {"partition", "kind", "rule", "status", "reason", "outcome", "source", "version", "python", "nats_py", "le"}
)
# Units that are not base units (prometheus.io/docs/practices/naming: seconds, bytes).
NOT_BASE: Final = re.compile(
    r"_(ms|us|ns|millis|milliseconds|microseconds|nanoseconds|minutes|hours|days|kb|mb|gb|kilobytes|megabytes)(_|$)"
)
BASE_UNITS: Final = ("_seconds", "_bytes")


def naming_problems(text: str, keys: Iterable[str] = ()) -> list[str]:
    """What in `text` (a text exposition) breaks the conventions; `keys`: entity keys that must
    not appear as label values."""
    keys = set(keys)
    problems: list[str] = []
    # The parser names a counter's samples `<family>_total` whatever the text said: read the TYPE lines.
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"] and parts[3] == "counter" and not parts[2].endswith("_total"):
            problems.append(f"{parts[2]}: a counter without _total")
    for family in text_string_to_metric_families(text):
        name = family.name
        if not name.startswith(PREFIX):
            problems.append(f"{name}: no {PREFIX} prefix")
        if NOT_BASE.search(name):
            problems.append(f"{name}: not a base unit (use seconds or bytes)")
        if family.type == "histogram" and not name.endswith(BASE_UNITS):
            problems.append(f"{name}: a histogram without a unit suffix ({' or '.join(BASE_UNITS)})")
        if family.type != "counter" and name.endswith("_total"):
            problems.append(f"{name}: _total on a {family.type}")
        if name.endswith("_info") and family.type not in ("gauge", "info"):
            problems.append(f"{name}: an _info pseudo-metric must be a gauge")
        for s in family.samples:
            if name.endswith("_info") and s.value != 1:
                problems.append(f"{s.name}: an _info sample is 1, not {s.value}")
            for label, value in s.labels.items():
                if label not in LABELS:
                    problems.append(f"{s.name}: label {label!r} is not one of the closed sets {sorted(LABELS)}")
                if value in keys:
                    problems.append(f"{s.name}: label {label}={value!r} is an entity key")
    return problems
