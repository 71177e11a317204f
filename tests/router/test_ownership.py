"""Partition ownership records and leases against a real nats-server: compare-and-set, standby,
takeover when the lease lapses or is released, the fence of a lease that ran out, renewals
through a lost reply and a NATS outage, and the data-folder lock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from contracts.config import ConfigError, config_from_dict
from router.engine.ownership import (
    DataDirBusy,
    InstanceLock,
    Lease,
    LeaseLost,
    Ownership,
    Timings,
)
from router.jetstream.ownership import (
    OwnerRecord,
    OwnershipBucket,
    OwnershipConflict,
    OwnershipUnavailable,
)

pytestmark = pytest.mark.anyio

FAST = Timings(lease_s=1.0, renew_s=0.3)


@asynccontextmanager
async def bucket(url: str, name: str = "router_owners", timeout: float = 1.0) -> AsyncIterator[OwnershipBucket]:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield await OwnershipBucket.open(nc, name, replicas=1, io_timeout=timeout)
    finally:
        await nc.close()


async def test_records_change_only_by_compare_and_set(nats_server: Any) -> None:
    async with bucket(nats_server.url) as b, bucket(nats_server.url) as other:
        assert await b.read(0) is None
        rev = await b.create(0, OwnerRecord(owner="a", epoch=1))
        with pytest.raises(OwnershipConflict):
            await other.create(0, OwnerRecord(owner="b", epoch=1))
        held = await other.read(0)
        assert held is not None
        assert (held.record.owner, held.record.epoch, held.revision) == ("a", 1, rev)
        rev2 = await b.replace(0, OwnerRecord(owner="a", epoch=1, renewal=1), rev)
        assert rev2 > rev
        with pytest.raises(OwnershipConflict):  # b read revision `rev`, which is gone
            await other.replace(0, OwnerRecord(owner="b", epoch=2), rev)
        held = await b.read(0)
        assert held is not None
        assert (held.record.owner, held.record.renewal, held.revision) == ("a", 1, rev2)
        assert await b.read(1) is None  # partitions are separate keys


async def test_a_standby_waits_then_takes_over_when_the_lease_lapses(nats_server: Any) -> None:
    async with bucket(nats_server.url) as ba, bucket(nats_server.url) as bb:
        a = Ownership(ba, "inst-a", FAST)
        b = Ownership(bb, "inst-b", FAST)
        lease_a = await a.acquire(0)
        assert (lease_a.epoch, lease_a.valid()) == (1, True)
        got: list[tuple[Lease, float]] = []
        async with anyio.create_task_group() as tg:
            keeper = anyio.CancelScope()

            async def keep_a() -> None:
                with keeper:
                    await a.keep(lease_a)

            async def standby_b() -> None:
                lease = await b.acquire(0)
                got.append((lease, time.monotonic()))

            tg.start_soon(keep_a)
            tg.start_soon(standby_b)
            await anyio.sleep(4 * FAST.lease_s)  # four leases of renewals: b must still wait
            assert not got, "the standby took a partition whose owner kept renewing"
            assert lease_a.valid()
            assert b.owners[0] == "inst-a"
            stopped = time.monotonic()
            keeper.cancel()  # a stops renewing, as a frozen or dead owner would
            with anyio.fail_after(FAST.lease_s + FAST.renew_s + 3 * FAST.poll_s + 1):
                while not got:
                    await anyio.sleep(0.01)
        lease_b, taken_at = got[0]
        assert lease_b.epoch == 2
        assert lease_b.valid()
        # The fence: a's deadline had passed, by at least the margin, before b could hold the partition.
        assert taken_at - lease_a.deadline >= FAST.margin_s - 0.01, (taken_at, lease_a.deadline)
        assert not lease_a.valid()
        with pytest.raises(LeaseLost):
            lease_a.check()
        took = taken_at - stopped
        assert FAST.lease_s - FAST.renew_s <= took <= FAST.lease_s + FAST.renew_s + 2 * FAST.poll_s, took
        # a's next renewal is refused: the record moved on.
        assert await a.keep(lease_a) in ("expired", "taken")
        held = await ba.read(0)
        assert held is not None
        assert (held.record.owner, held.record.epoch) == ("inst-b", 2)


async def test_a_released_lease_is_taken_at_once(nats_server: Any) -> None:
    async with bucket(nats_server.url) as ba, bucket(nats_server.url) as bb:
        a = Ownership(ba, "inst-a", Timings(lease_s=30.0, renew_s=3.0))
        b = Ownership(bb, "inst-b", Timings(lease_s=30.0, renew_s=3.0))
        lease_a = await a.acquire(3)
        async with anyio.create_task_group() as tg:
            got: list[Lease] = []

            async def standby_b() -> None:
                got.append(await b.acquire(3))

            tg.start_soon(standby_b)
            await anyio.sleep(0.5)
            assert not got
            released = time.monotonic()
            assert await a.release(lease_a)
            with anyio.fail_after(5):  # well under the 30 s lease
                while not got:
                    await anyio.sleep(0.01)
            took = time.monotonic() - released
        assert got[0].epoch == 2
        assert took < 2.0, took
        assert not lease_a.valid()
        with pytest.raises(LeaseLost):
            lease_a.check()


async def test_our_own_record_is_taken_back_at_once(nats_server: Any) -> None:
    """A record naming this instance was written by a predecessor on the same data folder (the
    folder's lock proves it dead): no lease to wait out after a crash and restart."""
    async with bucket(nats_server.url) as b1:
        first = await Ownership(b1, "inst-a", Timings(lease_s=30.0, renew_s=3.0)).acquire(0)
    async with bucket(nats_server.url) as b2:
        started = time.monotonic()
        again = await Ownership(b2, "inst-a", Timings(lease_s=30.0, renew_s=3.0)).acquire(0)
        assert time.monotonic() - started < 2.0
    assert again.epoch == first.epoch + 1
    assert again.revision > first.revision


async def test_two_standbys_one_winner(nats_server: Any) -> None:
    async with bucket(nats_server.url) as b0, bucket(nats_server.url) as b1, bucket(nats_server.url) as b2:
        dead = await Ownership(b0, "inst-dead", FAST).acquire(0)
        leases: dict[str, Lease] = {}
        async with anyio.create_task_group() as tg:
            for name, bk in (("inst-b", b1), ("inst-c", b2)):

                async def standby(name: str = name, bk: OwnershipBucket = bk) -> None:
                    own = Ownership(bk, name, FAST)
                    leases[name] = lease = await own.acquire(0)
                    await own.keep(lease)  # the winner renews; the other must keep waiting

                tg.start_soon(standby)
            with anyio.fail_after(FAST.lease_s * 3 + 2):
                while not leases:
                    await anyio.sleep(0.01)
            await anyio.sleep(FAST.lease_s * 3)
            tg.cancel_scope.cancel()
        assert len(leases) == 1, leases
        (winner,) = leases.values()
        assert winner.epoch == dead.epoch + 1
        assert winner.valid()


async def test_a_renewal_whose_reply_was_lost_is_recognised(nats_server: Any) -> None:
    async with bucket(nats_server.url) as b:
        own = Ownership(b, "inst-a", FAST)
        lease = await own.acquire(0)
        # A renewal that was stored while its reply never came back: the revision we hold is stale.
        await b.replace(0, OwnerRecord(owner="inst-a", epoch=lease.epoch, renewal=7, lease_s=1.0), lease.revision)
        with anyio.move_on_after(FAST.lease_s * 3):
            reason = await own.keep(lease)
            raise AssertionError(f"lease lost ({reason}) after a renewal it wrote itself")
        assert lease.valid()
        held = await b.read(0)
        assert held is not None
        assert held.revision == lease.revision
        assert held.record.renewal > 7


async def test_nats_away_longer_than_the_lease(nats_server: Any) -> None:
    async with bucket(nats_server.url, timeout=0.3) as b:
        own = Ownership(b, "inst-a", FAST)
        lease = await own.acquire(0)
        async with anyio.create_task_group() as tg:
            reasons: list[str] = []

            async def keep() -> None:
                reasons.append(await own.keep(lease))

            tg.start_soon(keep)
            await anyio.sleep(FAST.renew_s * 2)
            assert lease.valid()
            await anyio.to_thread.run_sync(nats_server.stop)
            down = time.monotonic()
            with anyio.fail_after(FAST.lease_s + 2):
                while not reasons:
                    await anyio.sleep(0.01)
            # Unrenewed, the lease ends by its own deadline, not later.
            assert time.monotonic() - down <= FAST.lease_s
            assert reasons == ["expired"]
            with pytest.raises(LeaseLost):
                lease.check()
            with pytest.raises(OwnershipUnavailable):
                await b.read(0)
            await anyio.to_thread.run_sync(nats_server.start)
            with anyio.fail_after(10):
                again = await own.acquire(0)  # our own record: taken back without a lease's wait
        assert again.epoch == lease.epoch + 1


def test_data_folder_lock_and_instance_id(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path / "data")
    try:
        with pytest.raises(DataDirBusy, match="another router"):
            InstanceLock(tmp_path / "data")
        ident = first.instance
        assert ident
    finally:
        first.release()
    second = InstanceLock(tmp_path / "data")
    try:
        assert second.instance == ident  # the same data folder is the same instance
    finally:
        second.release()
    other = InstanceLock(tmp_path / "other")
    try:
        assert other.instance != ident
    finally:
        other.release()


@pytest.mark.parametrize(
    ("router", "key"),
    [
        ({"lease": "500ms"}, "router.lease"),
        ({"lease": "10s", "lease_renew_every": "5s"}, "router.lease_renew_every"),
        ({"lease_renew_every": "0s"}, "router.lease_renew_every"),
    ],
)
def test_lease_settings_are_checked(router: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: .*e.g. lease"):
        config_from_dict({"router": router})


def test_lease_defaults() -> None:
    t = Timings.from_config(config_from_dict({}))
    assert (t.lease_s, t.renew_s) == (10.0, 3.0)
    assert t.margin_s < t.lease_s - 2 * t.renew_s


async def test_a_fenced_snapshot_is_rolled_back(tmp_path: Path) -> None:
    """The store calls the fence just before its commit: a lease that ran out leaves the store as it was."""
    from snapshots import ActorRecord, PartitionMarks, Store

    async with await Store.open(tmp_path / "router.db") as store:
        await store.write_snapshot(0, [ActorRecord("sku", "A", 3, b"a@3", {})], applied_seq=3, effects_seq=3)

        def fence() -> None:
            raise LeaseLost("partition 0: lease of epoch 1 expired")

        with pytest.raises(LeaseLost):
            await store.write_snapshot(
                0, [ActorRecord("sku", "A", 9, b"a@9", {})], applied_seq=9, effects_seq=9, fence=fence
            )
        with pytest.raises(LeaseLost):
            await store.write_actors(0, [ActorRecord("sku", "B", 9, b"b@9", {})], fence=fence)
        assert await store.marks(0) == PartitionMarks(3, 3)
        assert await store.load_actors([("sku", "A"), ("sku", "B")]) == {("sku", "A"): (3, b"a@3")}


async def test_the_publisher_drops_a_fenced_retry(nats_server: Any) -> None:
    """An unconfirmed publish is retried until confirmed, unless its partition's lease ended meanwhile."""
    from router.jetstream.publisher import Publisher

    nc = await nats.connect(nats_server.url)
    try:
        pub = Publisher(nc, retry_after=0.2)
        seen: list[bytes] = []

        async def on_msg(msg: Any) -> None:
            seen.append(msg.data)

        await nc.subscribe("nostream.x", cb=on_msg)  # no stream: never confirmed, so retried
        valid = [True]
        async with anyio.create_task_group() as tg:
            await tg.start(pub.serve)
            await pub.publish("nostream.x", b"one", {"Nats-Msg-Id": "m1"}, None, fence=lambda: valid[0])
            with anyio.fail_after(5):
                while pub.retried < 2:
                    await anyio.sleep(0.02)
            valid[0] = False
            with anyio.fail_after(5):
                while pub.outstanding:
                    await anyio.sleep(0.02)
            copies = len(seen)
            await anyio.sleep(0.6)  # three retry intervals: nothing more goes out
            tg.cancel_scope.cancel()
        assert pub.fenced == 1
        assert len(seen) == copies >= 3
    finally:
        await nc.close()


async def test_instances_share_the_partitions_and_hand_them_over(nats_server: Any) -> None:
    """Two instances split four partitions two and two (the first hands two over when the second
    appears); a lost lease abandons that partition only; a stop releases, and the other takes
    the released partitions at once (no lease to wait out)."""
    from router.engine.assignment import Share

    async with bucket(nats_server.url) as ba, bucket(nats_server.url) as bb:
        a = Share(Ownership(ba, "inst-a", FAST), 4)
        b = Share(Ownership(bb, "inst-b", FAST), 4)
        stop_a, stop_b = anyio.Event(), anyio.Event()
        ended: list[tuple[str, int, int, str]] = []  # (instance, partition, epoch, how)

        def worker(name: str) -> Any:
            async def work(lease: Lease, lost: anyio.Event, release: anyio.Event, running: Any) -> bool:
                running()
                async with anyio.create_task_group() as tg:

                    async def on(event: anyio.Event) -> None:
                        await event.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(on, lost)
                    tg.start_soon(on, release)
                graceful = release.is_set() and not lost.is_set()
                ended.append((name, lease.partition, lease.epoch, "released" if graceful else "lost"))
                return graceful

            return work

        async def until(check: Any, timeout: float) -> None:
            with anyio.fail_after(timeout):
                while not check():
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            await tg.start(a.serve, worker("a"), stop_a)
            assert a.owned() == [0, 1, 2, 3]
            tg.start_soon(b.serve, worker("b"), stop_b)
            await until(lambda: len(a.owned()) == 2 and len(b.owned()) == 2, 5 * FAST.lease_s)
            assert sorted(a.owned() + b.owned()) == [0, 1, 2, 3]
            handed = [e for e in ended if e[0] == "a"]
            assert [e[3] for e in handed] == ["released", "released"], ended
            # What a sees of both (its next reading of the records has b's two).
            await until(lambda: a.assignments() == {"inst-a": a.owned(), "inst-b": b.owned()}, 2 * FAST.lease_s)

            # A lost lease (marked lost, as a refused renewal would) abandons that partition only.
            kept = a.owned()
            a.leases[kept[0]].lost = "taken"
            await until(lambda: ("a", kept[0], 1, "lost") in ended, 3 * FAST.lease_s)
            assert kept[1] in a.owned()
            await until(lambda: sorted(a.owned() + b.owned()) == [0, 1, 2, 3], 5 * FAST.lease_s)

            # A graceful stop releases: the other takes the partitions without waiting out a lease.
            stopped = time.monotonic()
            stop_b.set()
            await until(lambda: a.owned() == [0, 1, 2, 3], 3 * FAST.lease_s)
            assert time.monotonic() - stopped < FAST.lease_s
            held = [await ba.read(p) for p in range(4)]
            assert all(h is not None and h.record.owner == "inst-a" for h in held)
            stop_a.set()
        assert sum(1 for e in ended if e[3] == "lost") == 1, ended


def test_the_duplicate_window_is_checked_against_the_longest_takeover_plus_replay() -> None:
    """Each stream's own window (not the config's) against lease + a reading + REPLAY_ALLOWANCE_S."""
    from types import SimpleNamespace

    from router.engine.startup import REPLAY_ALLOWANCE_S, check_duplicate_window

    cfg = config_from_dict({})
    takeover = Timings.from_config(cfg).lease_s + 1.0
    need = takeover + REPLAY_ALLOWANCE_S

    def infos(window: float, short: str | None = None) -> dict[str, Any]:
        return {
            name: SimpleNamespace(config=SimpleNamespace(duplicate_window=need - 1 if name == short else window))
            for name in (cfg.streams.events, cfg.streams.exceptions, cfg.streams.deadletter)
        }

    assert check_duplicate_window(cfg, takeover, infos(600.0))  # the default 10 minutes
    assert check_duplicate_window(cfg, takeover, infos(need))
    assert not check_duplicate_window(cfg, takeover, infos(600.0, short=cfg.streams.exceptions))
    assert not check_duplicate_window(cfg, takeover, infos(2.0))
