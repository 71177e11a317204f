"""Partition ownership records in a JetStream KV bucket, written only by compare-and-set.

One key per partition, `p.<partition>`, in the bucket `<router.consumer>_owners`; its value
is an `OwnerRecord` (JSON). A record is created with `create` (it must not exist) and
changed only with `update(last=<revision read>)`, so of two instances writing after reading
the same revision exactly one succeeds: the other gets `OwnershipConflict`. The stream
sequence of a write (its revision) is what the next write must name.

Nothing here decides who should own what, or when a lease has lapsed: that is the policy
in `router.engine.ownership`. The bucket keeps no TTL: a record outlives its owner, so the
epoch (and later the applied-through sequence) is never lost, and a lapse is judged by
watching the revision stand still.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

BUCKET_SUFFIX: Final = "_owners"
# Past revisions kept per key: for `nats kv history`, when someone asks who owned what.
HISTORY: Final = 8


class OwnerRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Who owns a partition. Unknown fields are kept out, not refused: later versions add some."""

    owner: str  # the instance id (`router.engine.ownership.instance_id`)
    epoch: int  # raised by one at every change of owner; fences what an earlier owner does
    state: Literal["held", "released"] = "held"
    renewal: int = 0  # bumped at every renewal (tells our own write from another's)
    lease_s: float = 0.0  # the owner's lease: a standby waits at least this long
    host: str = ""
    pid: int = 0
    # The owner's applied-through sequence: every event of the partition at or below it is in
    # the owner's last snapshot (written at every renewal and at the release).
    applied_seq: int = 0


class InstanceRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """A live instance, at key `i.<instance>`: rewritten every renewal while it runs, deleted at a
    graceful stop. Partitions are shared among the instances whose record keeps changing."""

    instance: str
    renewal: int = 0
    lease_s: float = 0.0
    host: str = ""
    pid: int = 0
    partitions: list[int] = msgspec.field(default_factory=list)  # those it owned at this write


_ENC: Final = msgspec.json.Encoder()
_DEC: Final = msgspec.json.Decoder(OwnerRecord)
_IDEC: Final = msgspec.json.Decoder(InstanceRecord)
INSTANCE_PREFIX: Final = "i."


class Held(NamedTuple):
    record: OwnerRecord
    revision: int


class OwnershipConflict(Exception):
    """The record changed since the revision named: another instance wrote it."""


class OwnershipUnavailable(Exception):
    """The bucket could not be read or written now (NATS away, a timeout); try again later."""


class OwnershipDamaged(Exception):
    """A record that is not an OwnerRecord: someone wrote the key by hand."""


def bucket_name(consumer: str) -> str:
    return f"{consumer}{BUCKET_SUFFIX}"


def record_key(partition: int) -> str:
    return f"p.{partition}"


def instance_key(instance: str) -> str:
    return f"{INSTANCE_PREFIX}{instance}"


class OwnershipBucket:
    """Read and compare-and-set the ownership records; every call bounded by `timeout` seconds."""

    def __init__(self, kv: KeyValue, name: str, timeout: float, nc: NATS | None = None) -> None:
        self.kv = kv
        self._nc = nc
        self.name = name
        self.timeout = timeout

    @classmethod
    async def open(cls, nc: NATS, name: str, *, replicas: int, io_timeout: float) -> OwnershipBucket:
        """Bind the bucket, creating it when missing (two instances may race to: both end bound)."""
        js = nc.jetstream(timeout=io_timeout)
        for attempt in range(3):
            try:
                kv = await js.key_value(name)
            except BucketNotFoundError:
                try:
                    kv = await js.create_key_value(
                        api.KeyValueConfig(
                            bucket=name,
                            description="ops-router partition owners (owner, epoch); written by compare-and-set",
                            history=HISTORY,
                            replicas=replicas,
                            storage=api.StorageType.FILE,
                        )
                    )
                except Exception:
                    if attempt == 2:
                        raise
                    continue  # created by another instance meanwhile: bind to it
            return cls(kv, name, io_timeout, nc)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def connected(self) -> bool:
        return self._nc is None or bool(self._nc.is_connected)

    async def read(self, partition: int) -> Held | None:
        """The partition's record and its revision; None when there is none."""
        try:
            with anyio.fail_after(self.timeout):
                entry = await self.kv.get(record_key(partition))
        except KeyNotFoundError:
            return None  # never written, or deleted by hand
        except Exception as exc:
            raise OwnershipUnavailable(f"{type(exc).__name__}: {exc}") from None
        try:
            record = _DEC.decode(entry.value or b"")
        except msgspec.DecodeError as exc:
            raise OwnershipDamaged(
                f"KV {self.name} key {record_key(partition)} (revision {entry.revision}) is not an ownership "
                f"record: {exc}; delete the key (`nats kv del {self.name} {record_key(partition)}`)"
            ) from None
        assert entry.revision is not None
        return Held(record, int(entry.revision))

    async def create(self, partition: int, record: OwnerRecord) -> int:
        """Write the first record of a partition; OwnershipConflict when one exists."""
        return await self._write(partition, record, None)

    async def replace(self, partition: int, record: OwnerRecord, last: int) -> int:
        """Write `record` if the partition's record is still at revision `last`; the new revision."""
        return await self._write(partition, record, last)

    async def _write(self, partition: int, record: OwnerRecord, last: int | None) -> int:
        value = _ENC.encode(record)
        try:
            with anyio.fail_after(self.timeout):
                if last is None:
                    return int(await self.kv.create(record_key(partition), value))
                return int(await self.kv.update(record_key(partition), value, last=last))
        except KeyWrongLastSequenceError:
            raise OwnershipConflict(f"{record_key(partition)} changed since revision {last}") from None
        except Exception as exc:
            raise OwnershipUnavailable(f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ instances

    async def announce(self, record: InstanceRecord) -> int:
        """Write this instance's presence record (its own key: no compare-and-set needed)."""
        try:
            with anyio.fail_after(self.timeout):
                return int(await self.kv.put(instance_key(record.instance), _ENC.encode(record)))
        except Exception as exc:
            raise OwnershipUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def withdraw(self, instance: str) -> None:
        """Delete this instance's presence record (a graceful stop): the others count it out at once."""
        try:
            with anyio.fail_after(self.timeout):
                await self.kv.delete(instance_key(instance))
        except Exception as exc:
            raise OwnershipUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def instances(self) -> dict[str, tuple[InstanceRecord, int]]:
        """Every presence record now stored: instance -> (record, revision). Listed with one stream
        info request (the bucket's subjects under `i.`), then read key by key."""
        prefix = f"$KV.{self.name}."
        try:
            with anyio.fail_after(self.timeout):
                info = await self.kv._js.stream_info(  # (the JetStream context is a manager too)
                    f"KV_{self.name}", subjects_filter=f"{prefix}{INSTANCE_PREFIX}>"
                )
        except Exception as exc:
            raise OwnershipUnavailable(f"{type(exc).__name__}: {exc}") from None
        out: dict[str, tuple[InstanceRecord, int]] = {}
        for subject in (info.state.subjects or {}):
            key = subject[len(prefix):]
            try:
                with anyio.fail_after(self.timeout):
                    entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue  # deleted meanwhile (or a delete marker)
            except Exception as exc:
                raise OwnershipUnavailable(f"{type(exc).__name__}: {exc}") from None
            try:
                rec = _IDEC.decode(entry.value or b"")
            except msgspec.DecodeError:
                continue  # not ours: ignored (it counts as no instance)
            assert entry.revision is not None
            out[rec.instance] = (rec, int(entry.revision))
        return out
