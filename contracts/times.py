"""Times as whole microseconds since the epoch, and their RFC 3339 form (UTC, `Z`)."""

from __future__ import annotations

import datetime as _dt
from typing import Final

EPOCH: Final = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_US: Final = _dt.timedelta(microseconds=1)


def to_us(value: _dt.datetime) -> int:
    """Whole microseconds since the epoch of an aware datetime."""
    return (value - EPOCH) // _US


def ns_to_us(ns: int) -> int:
    """JetStream nanosecond timestamps, rounded half up to the microsecond."""
    return (ns + 500) // 1000


def rfc3339(us: int) -> str:
    """`YYYY-MM-DDThh:mm:ss[.ffffff]Z` of whole microseconds since the epoch."""
    t = EPOCH + _dt.timedelta(microseconds=us)
    if t.microsecond:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_opt(us: int | None) -> str | None:
    return None if us is None else rfc3339(us)
