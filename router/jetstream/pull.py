"""A partition's pull requests: the `$JS.API.CONSUMER.MSG.NEXT` protocol, by hand.

Two requests are kept outstanding (one being delivered, one queued); the server answers a
request with messages, then a status when it ends early: 404/408 (nothing more: the consumer
is caught up), 409 (the consumer was deleted or its leader changed, or a limit was hit), 100
(a heartbeat). Delivered messages are counted against the requests oldest first (the server
serves them in order).

A delivered message's ack subject carries its positions:
`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts ns>.<pending>[.<token>]`,
with a domain and an account hash after `ACK` in the 12-token form. The partition's hot loop
reads the tokens inline; `reply_seq`, `reply_ts_ns` and `reply_pending` say the same in words.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import structlog

log = structlog.get_logger()

# A waiting pull request expires after this; its 408 tells the partition it is caught up,
# which is what lets a timer fire (so keep it well under a second).
PULL_EXPIRES_NS: Final = 400_000_000
ACK_PREFIX: Final = b"$JS.ACK."
# Requests with no word from the server for this long are taken as lost.
LOST_AFTER_S: Final = 5.0


def reply_seq(reply: bytes) -> int:
    """The stream sequence in a message's ack subject."""
    tokens = reply.split(b".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def reply_ts_ns(reply: bytes) -> int:
    """The JetStream timestamp (ns) in a message's ack subject."""
    tokens = reply.split(b".")
    return int(tokens[7] if len(tokens) == 9 else tokens[9])


def reply_pending(reply: bytes) -> int:
    """How many messages the consumer still had for us when it delivered this one."""
    tokens = reply.split(b".")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


class PullRequests:
    """The outstanding pull requests of one consumer and what their statuses say."""

    def __init__(self, stream: str, consumer: str, partition: int = 0) -> None:
        self._log = log.bind(partition=partition)
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = ""  # set by the partition once subscribed
        self.requests: dict[str, int] = {}  # request -> messages it may still deliver
        self.sent: dict[str, int] = {}  # request -> when it was sent (the clock's microseconds)
        self._next = 0
        self.last_heard = time.monotonic()
        # Called before every pull request and ack: raises when the partition may no longer
        # use the consumer (its lease ended; see router.engine.ownership).
        self.fence: Callable[[], None] = _unfenced

    def __len__(self) -> int:
        return len(self.requests)

    async def send(self, nc: Any, batch: int, now_us: int) -> bool:
        """Ask for `batch` more messages; False (and nothing outstanding) when the publish failed."""
        self.fence()
        self._next += 1
        rid = f"{self.inbox}.{self._next}"
        self.requests[rid] = batch
        sent = self.sent
        if len(sent) >= 8:  # answered or abandoned requests
            for old in [r for r in sent if r not in self.requests]:
                del sent[old]
        sent[rid] = now_us
        req = b'{"batch":%d,"expires":%d}' % (batch, PULL_EXPIRES_NS)
        try:
            await nc.publish(self.subject, req, reply=rid)
        except Exception as exc:
            self.requests.pop(rid, None)
            self._log.warning("pull_failed", error=repr(exc))
            return False
        return True

    async def ack(self, nc: Any, reply: bytes) -> None:
        """Acknowledge (AckAll) through the message of ack subject `reply`; a failure is left to the next ack."""
        self.fence()
        try:
            await nc.publish(reply.decode(), b"+ACK")
        except Exception as exc:  # disconnected: the next ack covers it (AckAll)
            self._log.debug("ack_deferred", error=repr(exc))

    def account(self, delivered: int) -> None:
        """Count delivered messages against the requests, oldest first."""
        requests = self.requests
        while delivered and requests:
            rid = next(iter(requests))
            left = requests[rid]
            if left <= delivered:
                delivered -= left
                del requests[rid]
            else:
                requests[rid] = left - delivered
                delivered = 0

    def on_status(self, hdr: dict[str, str] | None, data: bytes, rid: str, now_us: int) -> tuple[int, bool]:
        """A status message on request `rid`: (the time up to which the stream was seen, 0 when
        it says nothing about that; whether the consumer must be recreated)."""
        hdr = hdr or {}
        status = hdr.get("Status", "")
        if status in ("404", "408"):
            if rid in self.requests:
                del self.requests[rid]
                # The server expired the request no sooner than PULL_EXPIRES after we sent it, and had
                # nothing more for us then: everything stored before that moment was delivered ahead of
                # this status. (The time we read the status is later, and events stored in between
                # may still be on their way: counting them as seen could fire a timer too early.)
                sent = self.sent.pop(rid, None)
                if sent is not None:
                    return (min(now_us, sent + PULL_EXPIRES_NS // 1000) if status == "408" else sent), False
        elif status == "409":
            current = self.requests.pop(rid, None) is not None  # not one to an old consumer
            desc = hdr.get("Description", "")
            if ("Deleted" in desc or "Leadership" in desc) and current:
                return 0, True
            if "Exceeded" not in desc and "Max" not in desc:
                self._log.info("pull_status", status=status, description=desc)
        elif status == "100":
            pass  # heartbeat
        elif data == b"" and not hdr:
            self.requests.pop(rid, None)
        return 0, False

    def lost(self) -> bool:
        """Requests outstanding but nothing heard for LOST_AFTER_S: forget them (new ones follow)."""
        if self.requests and time.monotonic() - self.last_heard > LOST_AFTER_S:
            self._log.warning("pull_requests_lost", requests=len(self.requests))
            self.requests.clear()
            self.last_heard = time.monotonic()
            return True
        return False

    def clear(self) -> None:
        self.requests.clear()


def _unfenced() -> None:
    """The fence of requests made without a lease (tests, tools)."""
