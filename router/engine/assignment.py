"""Partitions shared among the live instances: each has one owner at a time, each instance a fair share.

Built on the records of `router.jetstream.ownership` (one compare-and-set record per
partition, one presence record per instance) and the leases of `router.engine.ownership`;
there is no coordinator: every instance reads the records every `Timings.poll_s` and decides
for itself, and the compare-and-set decides every race.

- Live instances: this one, and every other whose presence record (`i.<instance>`, rewritten
  every `lease_renew_every`) changed within the longer of our lease and its own, or which
  holds a partition record that is still being renewed. A graceful stop deletes the presence
  record: the others count the instance out at once.
- The share: with P partitions and n live instances, each holds between floor(P/n) and
  ceil(P/n). An instance above ceil(P/n) hands the excess over; one above floor(P/n) while
  another live instance is below it hands one over (only the one holding most, so that not
  all of them give one up at once). An instance below its share takes free partitions: never
  written, released, its own from an earlier life, or lapsed (the record stood still for a
  lease: its owner died or froze).
- Handing over is graceful: the partition stops fetching, applies what it received, waits
  for its effects to be confirmed, writes its final snapshot, then the record is released
  (with its applied-through sequence) and a taker starts at once.
- A lease lost (expired, taken) abandons only that partition; the others go on.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import structlog

from router.engine.ownership import Lease, Ownership
from router.jetstream.ownership import (
    Held,
    InstanceRecord,
    OwnershipDamaged,
    OwnershipUnavailable,
)

log = structlog.get_logger()

# work(lease, lost, release, running): run the partition of `lease`; call `running()` once it
# applies events; return True after a graceful stop (when `release` is set: its lease is then
# released) or False when `lost` is set (abandoned: nothing more is sent or written for it).
Work = Callable[[Lease, anyio.Event, anyio.Event, Callable[[], None]], Awaitable[bool]]


class Share:
    """This instance's part of the partitions: take a fair share, keep it, hand it over."""

    def __init__(self, ownership: Ownership, count: int) -> None:
        self.ownership = ownership
        self.count = count
        self.instance = ownership.instance
        self.leases: dict[int, Lease] = {}  # the partitions this instance holds now
        self._release: dict[int, anyio.Event] = {}
        # What the last reading saw: partition -> (record, revision) or None when never written.
        self.records: dict[int, Held | None] = {}
        self._seen: dict[int, tuple[int, float]] = {}  # partition -> (revision, first seen at)
        self._peers: dict[str, tuple[int, float, InstanceRecord]] = {}  # instance -> (revision, since, record)
        self.live: list[str] = [self.instance]
        self._announced: set[tuple[int, str, int]] = set()
        self._unreadable = False
        self.rounds = 0

    # ------------------------------------------------------------------ what others ask

    @property
    def role(self) -> Literal["owner", "standby"]:
        return "owner" if self.leases else "standby"

    def owns(self, partition: int) -> bool:
        lease = self.leases.get(partition)
        return lease is not None and lease.valid()

    def owned(self) -> list[int]:
        """The partitions this instance owns now (their leases valid), in order."""
        return sorted(p for p, lease in self.leases.items() if lease.valid())

    def assignments(self) -> dict[str, list[int]]:
        """Instance -> the partitions it owns, as of the last reading of the records (this
        instance's from its leases). An instance that holds nothing is listed when it is live."""
        out: dict[str, list[int]] = {i: [] for i in self.live}
        now = self.ownership.clock()
        for p, held in self.records.items():
            if held is None or p in self.leases:
                continue
            rec = held.record
            if rec.state == "held" and rec.owner != self.instance and not self._lapsed(p, held, now):
                out.setdefault(rec.owner, []).append(p)
        out[self.instance] = self.owned()
        return {i: sorted(ps) for i, ps in sorted(out.items())}

    def owners(self) -> dict[int, str]:
        """Partition -> the instance its record names as holding it (last reading; ours from our leases)."""
        out = {
            p: held.record.owner for p, held in self.records.items()
            if held is not None and held.record.state == "held"
        }
        out.update(dict.fromkeys(self.owned(), self.instance))
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ the loop

    async def serve(self, work: Work, stop: anyio.Event, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Until `stop`: read the records, hand over and take partitions, run each held one with
        `work`. `task_status.started()` once the first reading's partitions run. At `stop`, every
        partition is stopped gracefully and released, and the presence record deleted."""
        t = self.ownership.timings
        started = False
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._announce_loop)
            async with anyio.create_task_group() as parts:
                while not stop.is_set():
                    try:
                        await self._round(parts, work, stop)
                    except OwnershipUnavailable as exc:
                        if not self._unreadable:
                            log.warning("ownership_unreadable", error=str(exc))
                        self._unreadable = True
                    except OwnershipDamaged as exc:
                        log.error("ownership_damaged", error=str(exc))
                    if not started:
                        started = True
                        task_status.started()
                    with anyio.move_on_after(t.poll_s):
                        await stop.wait()
                for release in self._release.values():
                    release.set()
            with anyio.CancelScope(shield=True):
                await self._withdraw()
            outer.cancel_scope.cancel()

    async def _round(self, parts: anyio.abc.TaskGroup, work: Work, stop: anyio.Event) -> None:
        now = self.ownership.clock()
        bucket = self.ownership.bucket
        peers = await bucket.instances()
        records: dict[int, Held | None] = {}
        for p in range(self.count):
            records[p] = await bucket.read(p)
        if self._unreadable:
            log.info("ownership_readable")
            self._unreadable = False
        self.records = records
        self.rounds += 1
        now = self.ownership.clock()
        live = {self.instance}
        for inst, (rec, rev) in peers.items():
            seen = self._peers.get(inst)
            if seen is None or seen[0] != rev:
                self._peers[inst] = (rev, now, rec)
            _rev, since, rec_ = self._peers[inst]
            if now - since < max(self.ownership.timings.lease_s, rec_.lease_s):
                live.add(inst)
        for inst in list(self._peers):
            if inst not in peers:
                del self._peers[inst]
        free: list[tuple[int, Held | None, str]] = []
        counts: dict[str, int] = {}
        for p, held in records.items():
            if p in self.leases:
                continue
            reason = self._free(p, held, now)
            if reason is not None:
                free.append((p, held, reason))
            elif held is not None:
                live.add(held.record.owner)  # renewing a record: it lives, presence or not
                counts[held.record.owner] = counts.get(held.record.owner, 0) + 1
        self.live = sorted(live)
        mine = sum(1 for p in self.leases if not self._release[p].is_set())
        counts[self.instance] = mine
        for inst in live:
            counts.setdefault(inst, 0)
        n = len(live)
        hi, lo = math.ceil(self.count / n), self.count // n
        if stop.is_set():
            return
        # Hand over what is above the share.
        excess = mine - hi
        if excess <= 0 and mine > lo and any(counts[i] < lo for i in live):
            richest = max(live, key=lambda i: (counts[i], [-ord(c) for c in i]))
            excess = 1 if richest == self.instance else 0
        if excess > 0:
            for p in sorted((p for p in self.leases if not self._release[p].is_set()), reverse=True)[:excess]:
                log.info("partition_handing_over", partition=p, live=n, holding=mine, share=hi)
                self._release[p].set()
            return
        # Take free partitions up to the share.
        if mine < lo:
            room = lo - mine
        elif mine < hi and mine <= min(counts[i] for i in live):
            room = 1
        else:
            room = 0
        if room <= 0:
            return
        for p, held, reason in free[:room]:
            if reason == "lapsed" and held is not None:
                log.warning(
                    "ownership_lapsed", partition=p, owner=held.record.owner, epoch=held.record.epoch,
                    unchanged_s=round(now - self._seen[p][1], 2),
                )
            lease = await self.ownership.claim(p, held, reason)
            if lease is None:
                continue
            if self.rounds == 1:
                # The first reading's partitions all run before serve() says it started.
                await parts.start(self._hold, lease, work)
            else:
                # Later ones (a takeover, a hand-over) start side by side: each may restore its
                # actors from the cluster copy first, and the last should not wait for the first.
                parts.start_soon(self._hold, lease, work)

    def _free(self, p: int, held: Held | None, now: float) -> str | None:
        """Why partition `p` (not held here) may be taken now, or None while another holds it."""
        if held is None:
            return "new"
        rec = held.record
        if rec.state == "released":
            return "released"
        if rec.owner == self.instance:
            return "own"
        if self._lapsed(p, held, now):
            return "lapsed"
        key = (p, rec.owner, rec.epoch)
        if key not in self._announced and len(self.leases) < math.ceil(self.count / max(1, len(self.live))):
            self._announced.add(key)
            log.info(
                "ownership_standby", partition=p, owner=rec.owner, owner_host=rec.host, owner_pid=rec.pid,
                epoch=rec.epoch, lease_s=max(self.ownership.timings.lease_s, rec.lease_s),
            )
        return None

    def _lapsed(self, p: int, held: Held, now: float) -> bool:
        """Whether `p`'s record stood still for a whole lease (by our clock, since we first saw it)."""
        seen = self._seen.get(p)
        if seen is None or seen[0] != held.revision:
            self._seen[p] = (held.revision, now)
            return False
        return now - seen[1] >= max(self.ownership.timings.lease_s, held.record.lease_s)

    # ------------------------------------------------------------------ one partition

    async def _hold(self, lease: Lease, work: Work, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Run `lease`'s partition under its renewals until handed over, lost or stopped."""
        p = lease.partition
        release, lost = anyio.Event(), anyio.Event()
        self.leases[p], self._release[p] = lease, release
        signalled = False

        def running() -> None:
            nonlocal signalled
            if not signalled:
                signalled = True
                task_status.started()

        try:
            async with anyio.create_task_group() as tg:

                async def keep() -> None:
                    await self.ownership.keep(lease)
                    lost.set()

                tg.start_soon(keep)
                await work(lease, lost, release, running)
                tg.cancel_scope.cancel()
        finally:
            del self.leases[p], self._release[p]
            with anyio.CancelScope(shield=True):
                if lease.valid():
                    await self.ownership.release(lease)
            if not signalled:
                signalled = True
                task_status.started()

    # ------------------------------------------------------------------ presence

    async def _announce_loop(self) -> None:
        o = self.ownership
        renewal = 0
        while True:
            record = InstanceRecord(
                instance=self.instance, renewal=renewal, lease_s=o.timings.lease_s, host=o.host, pid=o.pid,
                partitions=self.owned(),
            )
            try:
                await o.bucket.announce(record)
                renewal += 1
            except OwnershipUnavailable as exc:
                log.debug("presence_not_written", error=str(exc))
            await anyio.sleep(o.timings.renew_s)

    async def _withdraw(self) -> None:
        o = self.ownership
        if not o.bucket.connected:
            return
        try:
            await o.bucket.withdraw(self.instance)
        except OwnershipUnavailable as exc:
            log.warning("presence_not_withdrawn", error=str(exc))
