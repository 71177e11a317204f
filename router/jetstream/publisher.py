"""JetStream publishing without per-message futures: core publishes with a reply inbox, PubAcks matched by id.

Every publish carries a `Nats-Msg-Id`, so a retry after a lost PubAck (reconnect, server
restart) is dropped by the stream's duplicate window instead of stored twice. A publish is
retried until the server confirms it: nothing an effect promises is given up silently.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = structlog.get_logger()

Done = Callable[[], None]
# True while the publisher of a message may still send it (see `Publisher.publish`).
Fence = Callable[[], bool]


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ACK_DECODER = msgspec.json.Decoder(_PubAck)
PubAck = _PubAck


class PublishRefused(Exception):
    """The stream answered a publish with an error (or not at all: no responders)."""


async def publish_acked(
    nc: NATS, subject: str, payload: bytes, headers: dict[str, str], timeout: float  # noqa: ASYNC109 (nats' own)
) -> PubAck:
    """One JetStream publish, waited for: its PubAck (`seq`, `duplicate`). For callers that
    answer someone once stored (HTTP ingestion): nats-py's request, the ack read with msgspec.
    Raises nats' TimeoutError, NoRespondersError, or PublishRefused with the stream's error."""
    msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
    try:
        ack = _ACK_DECODER.decode(msg.data)
    except msgspec.DecodeError:
        raise PublishRefused(f"unreadable PubAck: {msg.data[:200]!r}") from None
    if ack.error is not None:
        raise PublishRefused(f"{ack.error.code} {ack.error.description} (err_code {ack.error.err_code})")
    if not ack.stream:
        raise PublishRefused(f"not a PubAck: {msg.data[:200]!r}")
    return ack


class _Pending:
    __slots__ = ("done", "fence", "headers", "payload", "sent_at", "subject", "tries")

    def __init__(
        self, subject: str, payload: bytes, headers: dict[str, str], done: Done | None, fence: Fence | None
    ) -> None:
        self.subject = subject
        self.payload = payload
        self.headers = headers
        self.done = done
        self.fence = fence
        self.sent_at = 0.0
        self.tries = 0


class Publisher:
    """Publishes into streams and calls `done()` once the server has stored (or deduplicated) it."""

    def __init__(self, nc: NATS, retry_after: float = 2.0) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + ".pa"
        self._next = 0
        self._pending: dict[str, _Pending] = {}
        self._retry_after = retry_after
        self.published = 0
        self.retried = 0
        self.fenced = 0  # unconfirmed publishes dropped because their partition's lease ended
        self._idle: anyio.Event | None = None  # see wait_idle

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    @property
    def max_payload(self) -> int:
        """The largest message (headers included) the server accepts."""
        return int(self._nc.max_payload)

    async def serve(
        self, raw_path: Callable[..., None] | None = None, *, task_status: Any = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Receive PubAcks and retry unconfirmed publishes until cancelled."""
        sub = await self._nc.subscribe(
            self._prefix + ".*", cb=self._on_ack, pending_msgs_limit=0, pending_bytes_limit=0
        )
        if raw_path is not None:
            raw_path(sub, self.on_ack_raw)
        task_status.started()
        try:
            while True:
                await anyio.sleep(self._retry_after / 2)
                await self._retry_stale()
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # connection closed
                await sub.unsubscribe()

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str], done: Done | None, fence: Fence | None = None
    ) -> None:
        """Send one message; `done` runs when the stream confirms it. `headers` must hold Nats-Msg-Id.

        A retry first asks `fence()`: once it says False (the partition's lease is gone) the
        message is dropped unsent; the partition's new owner publishes it with the same id.
        """
        self._next += 1
        token = str(self._next)
        p = _Pending(subject, payload, headers, done, fence)
        self._pending[token] = p
        await self._send(token, p)

    async def _send(self, token: str, p: _Pending) -> None:
        p.sent_at = time.monotonic()
        p.tries += 1
        nc = self._nc
        try:
            if nc.is_connected:
                # The HPUB line built here, as nats-py would, minus its per-header checks: our
                # header names are constants and our values never hold CR or LF.
                await nc._send_command(_hpub(p.subject, f"{self._prefix}.{token}", p.headers, p.payload))
                if nc._flush_queue is not None and nc._flush_queue.empty():
                    await nc._flush_pending()
            else:
                await nc.publish(p.subject, p.payload, reply=f"{self._prefix}.{token}", headers=p.headers)
        except Exception as exc:  # disconnected with a full buffer, closed: retried later
            if p.tries <= 3 or p.tries % 50 == 0:
                log.warning("publish_deferred", subject=p.subject, error=repr(exc), tries=p.tries)
        else:
            self.published += 1

    async def _on_ack(self, msg: Msg) -> None:
        """nats-py's callback path (used when the raw path is not installed)."""
        self.on_ack_raw(msg.subject.encode(), b"", msg.data, msg.headers)

    def on_ack_raw(self, subject: bytes, reply: bytes, data: bytes, hdr: dict[str, str] | None) -> None:
        token = subject[subject.rfind(b".") + 1 :].decode("utf-8", "replace")
        p = self._pending.get(token)
        if p is None:
            return  # answer to an earlier try that was already confirmed
        if not data:
            # 503 no responders: the stream is missing or the server is restarting.
            return
        try:
            ack = _ACK_DECODER.decode(data)
        except msgspec.DecodeError:
            log.warning("puback_unreadable", subject=p.subject, data=data[:200])
            return
        if ack.error is not None:
            if p.tries <= 3 or p.tries % 50 == 0:
                log.error(
                    "publish_rejected",
                    subject=p.subject,
                    code=ack.error.code,
                    err_code=ack.error.err_code,
                    description=ack.error.description,
                    tries=p.tries,
                )
            return  # retried by serve()
        del self._pending[token]
        if p.done is not None:
            p.done()
        if not self._pending and self._idle is not None:
            self._idle.set()

    async def _retry_stale(self) -> None:
        if not self._pending or not self._nc.is_connected:
            return
        cutoff = time.monotonic() - self._retry_after
        stale = [(t, p) for t, p in self._pending.items() if p.sent_at < cutoff]
        for token, p in stale:
            if p.fence is not None and not p.fence():
                del self._pending[token]
                self.fenced += 1
                if not self._pending and self._idle is not None:
                    self._idle.set()
                continue
            self.retried += 1
            await self._send(token, p)

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 (a bounded wait at shutdown)
        """Wait until every publish is confirmed; False when `timeout` passed first."""
        with anyio.move_on_after(timeout):
            while self._pending:
                self._idle = anyio.Event()
                await self._idle.wait()
            return True
        return False


def _hpub(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    hdr = b"NATS/1.0\r\n" + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()) + b"\r\n"
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(), reply.encode(), len(hdr), len(hdr) + len(payload), hdr, payload
    )
