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

import contextlib
import hashlib
from collections.abc import Iterable
from typing import Final

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from router.jetstream.publisher import publish_acked

BUCKET_SUFFIX: Final = "_ingest"
# Keys looked up by one direct-get request (a batch of POST /events).
MULTI_LAST: Final = 256
_ENC: Final = msgspec.json.Encoder()


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
                            direct=True,  # direct gets: one request looks up a whole batch (first_seqs)
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
            if info.config.max_age is None or abs(info.config.max_age - self.ttl_s) > 0.001 or not info.config.allow_direct:
                info.config.max_age = self.ttl_s
                info.config.allow_direct = True
                await jsm.update_stream(info.config)
            return kv
        raise AssertionError("unreachable")  # pragma: no cover

    async def first_seq(self, msg_id: str) -> int | None:
        """The EVENTS sequence stored first for `msg_id` within the TTL, or None (a direct get)."""
        key = entry_key(msg_id)
        try:
            await self._bucket()
            msg = await self._nc.request(
                f"$JS.API.DIRECT.GET.KV_{self.name}.$KV.{self.name}.{key}", b"", timeout=self.timeout
            )
        except Exception as exc:
            raise IdempotencyUnavailable(f"{type(exc).__name__}: {exc}") from None
        hdr = msg.headers or {}
        status = hdr.get("Status")
        if status == "404" or "KV-Operation" in hdr:  # never written (or expired), or deleted
            return None
        if status is not None:
            raise IdempotencyUnavailable(f"direct get on KV_{self.name}: {status} {hdr.get('Description', '')}")
        value = bytes(msg.data or b"")
        return int(value) if value.isdigit() else None  # not ours (written by hand): publish; the stream decides

    async def first_seqs(self, msg_ids: Iterable[str]) -> dict[str, int]:
        """`first_seq` of many ids at once: direct gets of the last message of each key
        (`multi_last`), MULTI_LAST keys per request. The ids not found are left out."""
        by_subject = {f"$KV.{self.name}.{entry_key(i)}": i for i in msg_ids}
        found: dict[str, int] = {}
        if not by_subject:
            return found
        subjects = list(by_subject)
        try:
            await self._bucket()
            for start in range(0, len(subjects), MULTI_LAST):
                chunk = subjects[start : start + MULTI_LAST]
                for subject, value in await self._multi_last(chunk):
                    if value.isdigit():
                        found[by_subject[subject]] = int(value)
        except Exception as exc:
            raise IdempotencyUnavailable(f"{type(exc).__name__}: {exc}") from None
        return found

    async def _multi_last(self, subjects: list[str]) -> list[tuple[str, bytes]]:
        """(subject, value) of the keys that hold a value; deleted and missing ones are left out."""
        out: list[tuple[str, bytes]] = []
        done = anyio.Event()
        failed: list[str] = []

        async def on_reply(msg: Msg) -> None:
            hdr = msg.headers or {}
            status = hdr.get("Status")
            if status is not None:
                if status not in ("204", "404"):  # 204: end of batch; 404: none of them
                    failed.append(f"{status} {hdr.get('Description', '')}")
                done.set()
            elif "KV-Operation" not in hdr:  # a DEL or PURGE marker: no value
                out.append((hdr.get("Nats-Subject", ""), bytes(msg.data or b"")))

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=on_reply)
        try:
            request = _ENC.encode({"multi_last": subjects, "batch": len(subjects)})
            await self._nc.publish(f"$JS.API.DIRECT.GET.KV_{self.name}", request, reply=inbox)
            with anyio.fail_after(self.timeout):
                await done.wait()
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await sub.unsubscribe()
        if failed:
            raise RuntimeError(f"direct get on KV_{self.name}: {failed[0]}")
        return out

    async def remember(self, msg_id: str, seq: int) -> None:
        try:
            await self._bucket()
            await publish_acked(
                self._nc, f"$KV.{self.name}.{entry_key(msg_id)}", str(seq).encode(),
                {"Nats-Expected-Stream": f"KV_{self.name}"}, self.timeout,
            )
        except Exception as exc:
            raise IdempotencyUnavailable(f"{type(exc).__name__}: {exc}") from None
