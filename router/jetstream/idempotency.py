"""Idempotency keys of HTTP ingestion, remembered for `[http] idempotency_ttl` (CONTRACT section 7).

The stream's duplicate window (minutes) drops a retry with the same `Nats-Msg-Id` only while it
lasts; partners retry for hours. So the first stored copy's sequence is kept in a JetStream
KV bucket, `<router.consumer>_ingest`, whose `max_age` is the TTL: one key per message id
(its SHA-256 in hex, as message ids may hold any printable character), the value the
sequence in decimal. Every router instance shares the bucket, so a retry that lands on
another instance is answered the same.

The order is: look the id up (found: a duplicate, with the first sequence); else publish
with the `Nats-Msg-Id`; then record what the PubAck says (the first sequence also when the
PubAck says duplicate: a racing retry inside the duplicate window). A crash between the
publish and the record leaves the id unrecorded: a retry within the duplicate window is still
answered duplicate by the stream, and recorded then.
"""

from __future__ import annotations

import hashlib
from typing import Final

import anyio
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

BUCKET_SUFFIX: Final = "_ingest"


class IdempotencyUnavailable(Exception):
    """The bucket could not be read or written now (NATS away, a timeout): answer 503."""


def bucket_name(consumer: str) -> str:
    return f"{consumer}{BUCKET_SUFFIX}"


def entry_key(msg_id: str) -> str:
    return hashlib.sha256(msg_id.encode("utf-8", "surrogateescape")).hexdigest()


class IdempotencyStore:
    """First sequences by message id in a KV bucket with a TTL; opened on first use."""

    def __init__(self, nc: NATS, name: str, ttl_s: float, replicas: int, timeout: float = 5.0) -> None:
        self._nc = nc
        self.name = name
        self.ttl_s = ttl_s
        self.replicas = replicas
        self.timeout = timeout
        self._kv: KeyValue | None = None
        self._opening = anyio.Lock()

    async def _bucket(self) -> KeyValue:
        if self._kv is not None:
            return self._kv
        async with self._opening:
            if self._kv is None:
                with anyio.fail_after(3 * self.timeout):
                    self._kv = await self._open()
        return self._kv

    async def _open(self) -> KeyValue:
        """Bind the bucket, creating it when missing; a TTL changed in config is applied to it."""
        js = self._nc.jetstream(timeout=self.timeout)
        for attempt in range(3):
            try:
                kv = await js.key_value(self.name)
            except BucketNotFoundError:
                try:
                    return await js.create_key_value(
                        api.KeyValueConfig(
                            bucket=self.name,
                            description="ops-router HTTP idempotency keys: first EVENTS sequence by Nats-Msg-Id",
                            history=1,
                            ttl=self.ttl_s,
                            replicas=self.replicas,
                            storage=api.StorageType.FILE,
                        )
                    )
                except Exception:
                    if attempt == 2:
                        raise
                    continue  # created by another instance meanwhile: bind to it
            jsm = self._nc.jsm()
            info = await jsm.stream_info(f"KV_{self.name}")
            if info.config.max_age is None or abs(info.config.max_age - self.ttl_s) > 0.001:
                info.config.max_age = self.ttl_s
                await jsm.update_stream(info.config)
            return kv
        raise AssertionError("unreachable")  # pragma: no cover

    async def first_seq(self, msg_id: str) -> int | None:
        """The EVENTS sequence stored first for `msg_id` within the TTL, or None."""
        try:
            kv = await self._bucket()
            entry = await kv.get(entry_key(msg_id))  # bounded by the JetStream context's timeout
        except KeyNotFoundError:
            return None
        except Exception as exc:
            raise IdempotencyUnavailable(f"{type(exc).__name__}: {exc}") from None
        try:
            return int(entry.value or b"")
        except ValueError:
            return None  # not ours (written by hand): publish, and the stream or a new record decides

    async def remember(self, msg_id: str, seq: int) -> None:
        try:
            kv = await self._bucket()
            await kv.put(entry_key(msg_id), str(seq).encode())
        except Exception as exc:
            raise IdempotencyUnavailable(f"{type(exc).__name__}: {exc}") from None
