"""Times as whole microseconds since the epoch, and their RFC 3339 form (UTC, `Z`)."""

from __future__ import annotations

import datetime as _dt
from typing import Final

EPOCH: Final = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_US: Final = _dt.timedelta(microseconds=1)
# 400 Gregorian years repeat the calendar exactly: 146097 days.
_CYCLE_US: Final = 146_097 * 86_400_000_000
# A valid input such as `0001-01-01T00:00:00+23:59` is in UTC year 0, outside `datetime`;
# such instants are represented with the extreme offset that keeps the local time in range.
_MAX_OFFSET_US: Final = (23 * 60 + 59) * 60_000_000
_EAST: Final = _dt.timezone(_dt.timedelta(microseconds=_MAX_OFFSET_US))
_WEST: Final = _dt.timezone(-_dt.timedelta(microseconds=_MAX_OFFSET_US))


def to_us(value: _dt.datetime) -> int:
    """Whole microseconds since the epoch of an aware datetime."""
    return (value - EPOCH) // _US


def from_us(us: int) -> _dt.datetime:
    """The aware datetime of `us` (UTC; outside UTC's range, the offset that keeps it in range)."""
    try:
        return EPOCH + _dt.timedelta(microseconds=us)
    except OverflowError:
        if us < 0:
            return _dt.datetime(1970, 1, 1, tzinfo=_EAST) + _dt.timedelta(microseconds=us + _MAX_OFFSET_US)
        return _dt.datetime(1970, 1, 1, tzinfo=_WEST) + _dt.timedelta(microseconds=us - _MAX_OFFSET_US)


def ns_to_us(ns: int) -> int:
    """JetStream nanosecond timestamps, rounded half up to the microsecond."""
    return (ns + 500) // 1000


def rfc3339(us: int) -> str:
    """`YYYY-MM-DDThh:mm:ss[.ffffff]Z` of whole microseconds since the epoch.

    Never fails: the year is always zero-padded to four digits (`0999`, and `0000` for an
    input such as `0001-01-01T00:00:00+01:00`), which `strftime` does not do. The one UTC
    year RFC 3339 cannot write, reachable from `9999-12-31T23:00:00-02:00`, prints as `10000`.
    """
    seconds, micro = divmod(us, 1_000_000)
    prefix = _SECONDS.get(seconds)
    if prefix is None:
        prefix = _seconds_prefix(seconds)
    if micro:
        return f"{prefix}.{micro:06d}Z"
    return prefix + "Z"


# Exceptions name the same few seconds over and over (event time, detection time).
_SECONDS: dict[int, str] = {}


def _seconds_prefix(seconds: int) -> str:
    cycles, rem = divmod(seconds * 1_000_000, _CYCLE_US)
    t = EPOCH + _dt.timedelta(microseconds=rem)
    year = t.year + 400 * cycles
    prefix = f"{year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if len(_SECONDS) >= 4096:
        _SECONDS.clear()
    _SECONDS[seconds] = prefix
    return prefix


def rfc3339_opt(us: int | None) -> str | None:
    return None if us is None else rfc3339(us)


def skew_text(us: int) -> str:
    """A positive duration for people: `5h30m`, `2h`, `2914d5h3m12s`; under 10 s to the microsecond (`1.5s`).

    From 10 s on it is rounded to whole seconds: a skew measured against a stream timestamp
    carries the publish delay, and `5h30m` reads better than `5h29m59.987s`.
    """
    if us < 10_000_000:
        whole, frac = divmod(us, 1_000_000)
        return f"{whole}.{frac:06d}".rstrip("0").rstrip(".") + "s"
    seconds = (us + 500_000) // 1_000_000
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n)
