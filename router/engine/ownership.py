"""Who runs a partition: a lease on its ownership record, standby, takeover, and the fence.

The record (`router.jetstream.ownership`) says which instance owns a partition and under
which epoch. The owner renews it every `[router] lease_renew_every` by compare-and-set on
the revision it last wrote. A standby reads it every second and takes it over (epoch + 1,
compare-and-set on the revision it watched) once the revision has stood still for
`[router] lease` by its own clock, or at once when the owner released it.

The owner trusts its lease only until `last successful renewal (sent at) + lease - margin`
by its monotonic clock, which keeps counting while the process is frozen (SIGSTOP) or
stalled. A standby starts its wait no earlier than that renewal was stored, and waits the
whole lease, so the old owner's deadline has passed before anyone else can hold the
partition. Everything a partition sends out or writes down (effect publishes, acks, pulls,
consumer changes, snapshots) first calls `Lease.check()`, which raises `LeaseLost` past
the deadline: a frozen owner that wakes up after losing its lease does none of them. What
it had handed to the socket before it froze may still arrive; those publishes carry
deterministic `Nats-Msg-Id`s, and the stream drops them as duplicates of the new owner's
within `[streams] duplicate_window`.

An instance is identified by `<data>/instance.id` (host name and a random part, made at
its first start) and guarded by an flock on `<data>/router.lock`: with the lock held, a
record naming our own id was written by this process or by a dead predecessor on the same
data folder, so it is taken back at once instead of after a lease.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import structlog

from contracts.config import Config, duration_us
from router.jetstream.ownership import (
    Held,
    OwnerRecord,
    OwnershipBucket,
    OwnershipConflict,
    OwnershipDamaged,
    OwnershipUnavailable,
)
from router.pidlock import PidLock, PidLockBusy

log = structlog.get_logger()

LOCK_FILE: Final = "router.lock"
ID_FILE: Final = "instance.id"

Clock = Callable[[], float]


class LeaseLost(Exception):
    """The partition's lease is no longer ours (or may not be): send and write nothing more for it."""


def is_lease_lost(exc: BaseException) -> bool:
    """`exc` is LeaseLost, or a group of nothing else (as a task group raises it)."""
    if isinstance(exc, LeaseLost):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_lease_lost(e) for e in exc.exceptions)
    return False


class DataDirBusy(Exception):
    """Another live router uses this data folder."""


@dataclass(frozen=True)
class Timings:
    lease_s: float
    renew_s: float

    @property
    def margin_s(self) -> float:
        """How much sooner than a standby the owner stops trusting its lease (clock rates, latency)."""
        return self.lease_s / 5

    @property
    def poll_s(self) -> float:
        """How often a standby reads the records."""
        return min(1.0, self.renew_s)

    @property
    def io_timeout_s(self) -> float:
        """The longest one read or write of a record may take."""
        return min(2.0, self.renew_s)

    @classmethod
    def from_config(cls, cfg: Config) -> Timings:
        return cls(duration_us(cfg.router.lease) / 1e6, duration_us(cfg.router.lease_renew_every) / 1e6)


class Lease:
    """This instance's hold on one partition, valid until `deadline` (monotonic) unless lost sooner."""

    __slots__ = ("clock", "deadline", "epoch", "lost", "partition", "progress", "record", "revision")

    def __init__(self, partition: int, record: OwnerRecord, revision: int, deadline: float, clock: Clock) -> None:
        self.partition = partition
        self.record = record
        self.epoch = record.epoch
        self.revision = revision
        self.deadline = deadline
        self.clock = clock
        self.lost: str | None = None
        # The partition's applied-through as its snapshots stand (set by whoever runs it): written
        # into the record at every renewal and at the release.
        self.progress: Callable[[], int] | None = None

    def applied_seq(self) -> int:
        """What the record says next: never lower than what it says now."""
        now = self.record.applied_seq
        return max(now, self.progress()) if self.progress is not None else now

    def valid(self) -> bool:
        return self.lost is None and self.clock() < self.deadline

    def check(self) -> None:
        """The fence: raise LeaseLost unless the lease is still ours and current."""
        if self.lost is None and self.clock() < self.deadline:
            return
        if self.lost is None:
            self.lost = "expired"
        raise LeaseLost(f"partition {self.partition}: lease of epoch {self.epoch} {self.lost}")


class Ownership:
    """Take, keep and give back partition leases for one instance."""

    def __init__(
        self,
        bucket: OwnershipBucket,
        instance: str,
        timings: Timings,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.bucket = bucket
        self.instance = instance
        self.timings = timings
        self.clock = clock
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owners: dict[int, str] = {}  # partition -> owner last seen (for health)

    def _record(self, epoch: int, renewal: int = 0, applied_seq: int = 0) -> OwnerRecord:
        return OwnerRecord(
            owner=self.instance, epoch=epoch, renewal=renewal, lease_s=self.timings.lease_s,
            host=self.host, pid=self.pid, applied_seq=applied_seq,
        )

    async def acquire(self, partition: int) -> Lease:
        """Wait as a standby until this instance holds the partition; return the lease."""
        t = self.timings
        watched: int | None = None  # the revision being watched
        since = 0.0  # when it was first seen
        announced: tuple[str, int] | None = None
        while True:
            try:
                held = await self.bucket.read(partition)
                if held is None:
                    lease = await self.claim(partition, None, "new")
                    if lease is not None:
                        return lease
                    continue
                rec, rev = held
                self.owners[partition] = rec.owner
                if rec.state == "released" or rec.owner == self.instance:
                    reason = "released" if rec.state == "released" else "own"
                    lease = await self.claim(partition, held, reason)
                    if lease is not None:
                        return lease
                    continue
                now = self.clock()
                if rev != watched:
                    watched, since = rev, now
                    if announced != (rec.owner, rec.epoch):
                        announced = (rec.owner, rec.epoch)
                        log.info(
                            "ownership_standby", partition=partition, owner=rec.owner, owner_host=rec.host,
                            owner_pid=rec.pid, epoch=rec.epoch, lease_s=max(t.lease_s, rec.lease_s),
                        )
                elif now - since >= max(t.lease_s, rec.lease_s):
                    log.warning(
                        "ownership_lapsed", partition=partition, owner=rec.owner, epoch=rec.epoch,
                        unchanged_s=round(now - since, 2),
                    )
                    lease = await self.claim(partition, held, "lapsed")
                    if lease is not None:
                        return lease
                    continue
            except OwnershipUnavailable as exc:
                log.warning("ownership_unreadable", partition=partition, error=str(exc))
            except OwnershipDamaged as exc:
                log.error("ownership_damaged", partition=partition, error=str(exc))
            await anyio.sleep(t.poll_s)

    async def claim(self, partition: int, held: Held | None, reason: str) -> Lease | None:
        """Write ourselves in by compare-and-set; None when another instance wrote first."""
        epoch = held.record.epoch + 1 if held is not None else 1
        record = self._record(epoch, applied_seq=held.record.applied_seq if held is not None else 0)
        sent = self.clock()
        try:
            if held is None:
                rev = await self.bucket.create(partition, record)
            else:
                rev = await self.bucket.replace(partition, record, held.revision)
        except OwnershipConflict:
            return None
        lease = Lease(partition, record, rev, sent + self.timings.lease_s - self.timings.margin_s, self.clock)
        self.owners[partition] = self.instance
        log.info(
            "ownership_taken", partition=partition, owner=self.instance, epoch=epoch, revision=rev, reason=reason,
            previous_owner=held.record.owner if held is not None else None,
        )
        return lease

    async def keep(self, lease: Lease) -> str:
        """Renew `lease` until it is lost; return why (the caller stops the partition).

        A renewal that fails for want of NATS is retried; the lease stays valid until its
        deadline. A compare-and-set refused means another instance wrote the record.
        """
        t = self.timings
        next_at = self.clock() + t.renew_s
        while True:
            await anyio.sleep(max(0.0, min(next_at, lease.deadline) - self.clock()))
            if not lease.valid():
                return self._lost(lease, lease.lost or "expired")
            if self.clock() < next_at:
                continue
            record = self._record(lease.epoch, lease.record.renewal + 1, lease.applied_seq())
            sent = self.clock()
            try:
                with anyio.fail_after(max(0.05, min(t.io_timeout_s, lease.deadline - sent))):
                    rev = await self.bucket.replace(lease.partition, record, lease.revision)
            except OwnershipConflict:
                if not await self._landed(lease, record):
                    return self._lost(lease, "taken")
                rev = lease.revision
            except (OwnershipUnavailable, TimeoutError) as exc:
                log.warning(
                    "ownership_renewal_failed", partition=lease.partition, error=str(exc) or type(exc).__name__,
                    valid_for_s=round(lease.deadline - self.clock(), 2),
                )
                next_at = self.clock() + min(0.5, t.renew_s)
                continue
            if lease.lost is not None:
                return self._lost(lease, lease.lost)
            lease.record, lease.revision = record, rev
            lease.deadline = max(lease.deadline, sent + t.lease_s - t.margin_s)
            next_at = sent + t.renew_s

    async def _landed(self, lease: Lease, record: OwnerRecord) -> bool:
        """After a refused renewal: is the record ours anyway (an earlier try stored, its reply lost)?"""
        try:
            held = await self.bucket.read(lease.partition)
        except (OwnershipUnavailable, OwnershipDamaged):
            return False
        if held is None:
            return False
        rec = held.record
        if rec.owner == self.instance and rec.epoch == lease.epoch and rec.state == "held":
            lease.revision = held.revision
            lease.record = rec
            return True
        self.owners[lease.partition] = rec.owner
        return False

    def _lost(self, lease: Lease, reason: str) -> str:
        lease.lost = lease.lost or reason
        taken_by = self.owners.get(lease.partition) if reason == "taken" else None
        log.warning("ownership_lost", partition=lease.partition, epoch=lease.epoch, reason=reason, taken_by=taken_by)
        return reason

    async def release(self, lease: Lease) -> bool:
        """Hand the partition over now (after its last snapshot): a standby takes it without waiting.

        Not while NATS is away (a stop must not wait for it): the lease then lapses as after a crash.
        """
        if not lease.valid():
            return False
        if not self.bucket.connected:
            log.warning("ownership_not_released", partition=lease.partition, reason="NATS unavailable")
            return False
        record = OwnerRecord(
            owner=self.instance, epoch=lease.epoch, state="released", renewal=lease.record.renewal + 1,
            lease_s=self.timings.lease_s, host=self.host, pid=self.pid, applied_seq=lease.applied_seq(),
        )
        lease.lost = "released"
        try:
            await self.bucket.replace(lease.partition, record, lease.revision)
        except (OwnershipConflict, OwnershipUnavailable) as exc:
            log.warning("ownership_release_failed", partition=lease.partition, error=str(exc))
            return False
        log.info("ownership_released", partition=lease.partition, epoch=lease.epoch, applied_seq=record.applied_seq)
        return True


# ---------------------------------------------------------------------- the instance


class InstanceLock:
    """`<data>/router.lock`, flock-ed while this router lives, and the instance id beside it."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        try:
            # The file stays on release: unlinking it would race a new holder.
            self._lock = PidLock(self.path)
        except PidLockBusy as busy:
            raise DataDirBusy(
                f"another router (pid {busy.holder}) is running with data folder {data_dir}; stop it first, "
                "or give this one another [snapshots] path"
            ) from None
        self.instance = _instance_id(data_dir / ID_FILE)

    def release(self) -> None:
        self._lock.release()


def _instance_id(path: Path) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{1,80}", text):
            return text
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:48] or "host"
    ident = f"{host}-{secrets.token_hex(4)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(ident + "\n")
    tmp.replace(path)
    return ident
