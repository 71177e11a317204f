"""The future-`ts` guard (CONTRACT section 2): an event whose `ts` is more than `[rules]
max_future_skew` ahead of its JetStream timestamp is dead-lettered `invalid`.

The drain asks `check` only about a `ts` above `bound`, the stream time of the last event
checked plus the skew: stream times only grow along the stream, so a `ts` at or below it is
within the skew of its own stream time. On the hot path that is one integer comparison.
"""

from __future__ import annotations

from contracts.config import duration_us
from contracts.decode import INVALID, Rejected, future_ts
from router.jetstream.pull import reply_ts_ns


class FutureGuard:
    __slots__ = ("bound", "max_skew_us")

    def __init__(self, max_future_skew: str) -> None:
        self.max_skew_us = duration_us(max_future_skew)
        self.bound = 0

    def check(self, ts_us: int, reply: bytes, subject: str) -> Rejected | None:
        """The exact check against the message's own stream time (from its ack subject)."""
        stream_us = (reply_ts_ns(reply) + 500) // 1000
        detail = future_ts(ts_us, stream_us, self.max_skew_us)
        if detail is not None:
            return Rejected(subject, INVALID, detail)
        self.bound = stream_us + self.max_skew_us
        return None
