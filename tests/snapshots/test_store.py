"""The snapshot store: round trips, timer replacement, due timers, marks, transactions under concurrency."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import snapshots.store as store_module
from snapshots import (
    ActorRecord,
    DueTimer,
    PartitionMarks,
    Store,
    StoreError,
)
from snapshots.store import DUE_TIMERS_SQL
from tests.support.stored import load_actor

pytestmark = pytest.mark.anyio


def rec(key: str, seq: int = 1, timers: dict[str, int] | None = None, kind: str = "sku") -> ActorRecord:
    return ActorRecord(kind, key, seq, f"{kind}:{key}@{seq}".encode(), timers or {})


async def test_open_creates_missing_file_and_folder(db_path: Path) -> None:
    assert not db_path.parent.exists()
    async with await Store.open(db_path) as store:
        assert store.created
        assert store.path == db_path
        assert await store.marks(0) == PartitionMarks(0, 0)
        assert await store.count_actors() == 0
    assert db_path.is_file()
    assert not db_path.with_name(db_path.name + ".creating").exists()
    async with await Store.open(db_path) as store:
        assert not store.created


async def test_round_trip_survives_reopen(db_path: Path) -> None:
    async with await Store.open(db_path) as store:
        await store.write_snapshot(
            0,
            [
                rec("A", 3, {"sla": 500}),
                rec("B", 7),
                rec("S1", 5, {"stall": 900, "sla": 100}, kind="shipment"),
            ],
            applied_seq=7,
            effects_seq=6,
        )
        await store.write_snapshot(1, [rec("C", 8)], applied_seq=8)
    async with await Store.open(db_path) as store:
        assert await store.marks(0) == PartitionMarks(7, 6)
        assert await store.all_marks() == {0: PartitionMarks(7, 6), 1: PartitionMarks(8, 0)}
        loaded = await store.load_actors([("sku", "A"), ("sku", "B"), ("shipment", "S1"), ("sku", "nope")])
        assert loaded == {
            ("sku", "A"): (3, b"sku:A@3"),
            ("sku", "B"): (7, b"sku:B@7"),
            ("shipment", "S1"): (5, b"shipment:S1@5"),
        }
        assert await load_actor(store, "sku", "C") == (8, b"sku:C@8")
        assert await load_actor(store, "shipment", "A") is None
        assert await store.due_timers(0, 10**6) == [
            DueTimer(100, "shipment", "S1", "sla"),
            DueTimer(500, "sku", "A", "sla"),
            DueTimer(900, "shipment", "S1", "stall"),
        ]
        stats = await store.stats()
        assert (stats.actors, stats.timers) == (4, 3)
        assert stats.partitions == {0: PartitionMarks(7, 6), 1: PartitionMarks(8, 0)}
        assert stats.file_bytes > 0


async def test_writing_an_actor_replaces_its_timers(store: Store) -> None:
    await store.write_snapshot(0, [rec("A", 1, {"a": 10, "b": 20}), rec("B", 1, {"a": 15})], applied_seq=1)
    await store.write_snapshot(0, [rec("A", 2, {"b": 25, "c": 30})], applied_seq=2)
    assert await store.due_timers(0, 100) == [
        DueTimer(15, "sku", "B", "a"),
        DueTimer(25, "sku", "A", "b"),
        DueTimer(30, "sku", "A", "c"),
    ]
    await store.write_snapshot(0, (r for r in [rec("A", 3)]), applied_seq=3)  # no timers: its rows go
    assert await store.due_timers(0, 100) == [DueTimer(15, "sku", "B", "a")]
    await store.write_actors(0, [rec("B", 4, {"z": 5})])
    assert await store.due_timers(0, 100) == [DueTimer(5, "sku", "B", "z")]
    await store.write_actors(0, [rec("B", 5)])
    assert await store.due_timers(0, 100) == []
    assert await store.marks(0) == PartitionMarks(3, 0)  # write_actors leaves the marks alone
    assert await load_actor(store, "sku", "B") == (5, b"sku:B@5")


async def test_a_record_of_a_kind_without_timers_leaves_timer_rows_alone(store: Store) -> None:
    """timers=None (the kind keeps none) skips the timer rows; {} replaces them with none."""
    await store.write_snapshot(0, [rec("A", 1, {"a": 10}), rec("B", 1, {"b": 20})], applied_seq=1)
    await store.write_snapshot(0, [ActorRecord("sku", "A", 2, b"a2", None)], applied_seq=2)
    await store.write_actors(0, [ActorRecord("sku", "B", 2, b"b2", None)])
    assert await store.due_timers(0, 100) == [DueTimer(10, "sku", "A", "a"), DueTimer(20, "sku", "B", "b")]
    assert await load_actor(store, "sku", "A") == (2, b"a2")
    assert await load_actor(store, "sku", "B") == (2, b"b2")
    await store.write_snapshot(0, [ActorRecord("sku", "A", 3, b"a3", {})], applied_seq=3)
    assert await store.due_timers(0, 100) == [DueTimer(20, "sku", "B", "b")]


async def test_due_timers_order_limit_and_partition(store: Store) -> None:
    await store.write_snapshot(
        0,
        [
            rec("B", timers={"y": 30, "x": 30}),
            rec("A", timers={"z": 30}),
            rec("S", kind="shipment", timers={"x": 30}),
            rec("C", timers={"x": 10}),
            rec("D", timers={"x": 31}),
        ],
        applied_seq=1,
    )
    await store.write_snapshot(1, [rec("E", timers={"x": 1})], applied_seq=1)
    # Earliest first; equal deadlines by kind, key, name. until_us is inclusive.
    assert await store.due_timers(0, 30) == [
        DueTimer(10, "sku", "C", "x"),
        DueTimer(30, "shipment", "S", "x"),
        DueTimer(30, "sku", "A", "z"),
        DueTimer(30, "sku", "B", "x"),
        DueTimer(30, "sku", "B", "y"),
    ]
    assert await store.due_timers(0, 30, limit=2) == [
        DueTimer(10, "sku", "C", "x"),
        DueTimer(30, "shipment", "S", "x"),
    ]
    assert await store.due_timers(0, 9) == []
    assert await store.due_timers(1, 10**9) == [DueTimer(1, "sku", "E", "x")]
    assert await store.due_timers(2, 10**9) == []


def test_due_timers_reads_only_the_covering_index(tmp_path: Path) -> None:
    """The due query is a range scan of timers_due, with no sort and no table lookups."""
    from snapshots import _schema

    path = tmp_path / "plan.db"
    _schema.create_file(path)
    con = sqlite3.connect(path)
    try:
        plan = " | ".join(r[3] for r in con.execute("EXPLAIN QUERY PLAN " + DUE_TIMERS_SQL, (0, 5, 10)))
    finally:
        con.close()
    assert "USING COVERING INDEX timers_due (partition=? AND deadline_us<?)" in plan
    assert "TEMP B-TREE" not in plan


async def test_effects_mark_never_moves_back(store: Store) -> None:
    await store.write_effects_mark(3, 10)
    assert await store.marks(3) == PartitionMarks(0, 10)
    await store.write_effects_mark(3, 5)
    assert await store.marks(3) == PartitionMarks(0, 10)
    await store.write_snapshot(3, [], applied_seq=12, effects_seq=7)  # built before the mark of 10
    assert await store.marks(3) == PartitionMarks(12, 10)
    await store.write_snapshot(3, [], applied_seq=14)  # None: keep
    assert await store.marks(3) == PartitionMarks(14, 10)
    await store.write_snapshot(3, [], applied_seq=20, effects_seq=18)
    assert await store.marks(3) == PartitionMarks(20, 18)


async def test_load_actors_in_chunks(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_LOAD_ROWS", 3)
    await store.write_snapshot(
        0, [rec(f"K{i}", i) for i in range(10)] + [rec("K1", 1, kind="campaign")], applied_seq=10
    )
    want = [("sku", f"K{i}") for i in range(12)] + [("campaign", "K1"), ("campaign", "K2")]
    loaded = await store.load_actors(iter(want))
    assert loaded == {("sku", f"K{i}"): (i, f"sku:K{i}@{i}".encode()) for i in range(10)} | {
        ("campaign", "K1"): (1, b"campaign:K1@1")
    }
    assert await store.load_actors([]) == {}


async def test_load_actors_returns_any_state_bytes_intact(store: Store) -> None:
    # One query returns the states laid end to end: bytes that are not UTF-8, NULs, empty states.
    states = [b"", b"\x00", b"\xff\xfe\x00\x80", bytes(range(256)), b"\xc3\x28" * 1000, b"plain"]
    records = [ActorRecord("sku", f"B{i}", i + 1, st, None) for i, st in enumerate(states)]
    await store.write_snapshot(0, records, applied_seq=len(states))
    loaded = await store.load_actors([("sku", f"B{i}") for i in range(len(states) + 2)])
    assert loaded == {("sku", f"B{i}"): (i + 1, st) for i, st in enumerate(states)}


async def test_failed_write_commits_nothing(store: Store) -> None:
    await store.write_snapshot(0, [rec("A", 1, {"t": 1})], applied_seq=1)
    # Records beyond the first statement, so that one already ran when the bad record is met.
    good = [rec(f"G{i}", 2, {"t": 2}) for i in range(store_module._STATEMENT_ROWS)]
    bad = [rec("A", 2, {"t": 2}), *good, rec("B", 2), ActorRecord("sku", "C", 2, None, {})]  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.write_snapshot(0, bad, applied_seq=2)
    no_kind = [*good, ActorRecord(None, "D", 2, b"d", {})]  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=r"write_snapshot failed: NOT NULL constraint failed: actors\.kind"):
        await store.write_snapshot(0, no_kind, applied_seq=2)
    assert await store.marks(0) == PartitionMarks(1, 0)
    assert await store.load_actors([("sku", "A"), ("sku", "B")]) == {("sku", "A"): (1, b"sku:A@1")}
    assert await store.due_timers(0, 100) == [DueTimer(1, "sku", "A", "t")]
    await store.write_snapshot(0, [rec("B", 3)], applied_seq=3)  # still usable
    assert await store.marks(0) == PartitionMarks(3, 0)


async def test_cancelled_write_is_all_or_nothing(store: Store) -> None:
    batch_size = 20_000
    for round_, delay in enumerate((0, 0.001, 0.005, 0.02, 0.05, 10), start=1):
        batch = [rec(f"K{i}", round_, {"t": round_}) for i in range(batch_size)]
        with anyio.move_on_after(delay):
            await store.write_snapshot(0, batch, applied_seq=round_)
        applied = (await store.marks(0)).applied_seq
        states = await store.load_actors([("sku", f"K{i}") for i in range(0, batch_size, 997)])
        assert {seq for seq, _ in states.values()} <= {applied}
        if applied:
            assert len(states) == len(range(0, batch_size, 997))
        timers = await store.due_timers(0, 10**9, limit=batch_size + 1)
        assert len(timers) == (batch_size if applied else 0)
        assert {t.deadline_us for t in timers} <= {applied}
    assert (await store.marks(0)).applied_seq == round_  # the uncancelled last round


async def test_concurrent_tasks_do_not_interleave_transactions(store: Store) -> None:
    async def snapshot(partition: int) -> None:
        for seq in range(1, 4):
            batch = [rec(f"P{partition}-{i}", seq, {"t": seq}) for i in range(3000)]
            await store.write_snapshot(partition, batch, applied_seq=seq, effects_seq=seq)

    async def marks(partition: int) -> None:
        for seq in range(1, 200):
            await store.write_effects_mark(partition, seq)
            await anyio.lowlevel.checkpoint()

    async def reads() -> None:
        for _ in range(50):
            loaded = await store.load_actors([("sku", f"P0-{i}") for i in range(0, 3000, 100)])
            assert len({seq for seq, _ in loaded.values()}) <= 1  # never half a snapshot
            await store.due_timers(0, 10**6)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for p in (0, 1):
                tg.start_soon(snapshot, p)
                tg.start_soon(marks, p)
            tg.start_soon(reads)
    assert await store.all_marks() == {0: PartitionMarks(3, 199), 1: PartitionMarks(3, 199)}
    assert (await store.stats()).timers == 6000


async def test_reads_do_not_wait_for_a_write_in_progress(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads see the last committed state while a large snapshot is being written, then the new one.

    The write is held open inside its transaction, after its rows went in and before COMMIT,
    until the reads are done: reads that waited for the write would time out.
    """
    await store.write_snapshot(0, [rec("A", 1, {"t": 1})], applied_seq=1)
    big = [rec(f"K{i}", 2) for i in range(60_000)] + [rec("A", 2, {"t": 2})]
    written = anyio.Event()  # the rows are in, not committed
    release = anyio.Event()
    done = anyio.Event()
    put_actors = store_module._put_actors

    async def put_and_hold(*args: Any) -> None:
        await put_actors(*args)
        written.set()
        await release.wait()

    monkeypatch.setattr(store_module, "_put_actors", put_and_hold)
    seen_during: list[object] = []

    async def write() -> None:
        await store.write_snapshot(0, big, applied_seq=2)
        done.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            await written.wait()
            with anyio.fail_after(10):
                seen_during.append(await load_actor(store, "sku", "A"))
                seen_during.append(await store.due_timers(0, 10))
                seen_during.append(await store.marks(0))
            seen_during.append(done.is_set())
            release.set()
    assert seen_during == [(1, b"sku:A@1"), [DueTimer(1, "sku", "A", "t")], PartitionMarks(1, 0), False]
    assert await load_actor(store, "sku", "A") == (2, b"sku:A@2")  # after the write returned
    assert await store.marks(0) == PartitionMarks(2, 0)


async def test_closed_store_raises_and_close_twice_is_fine(db_path: Path) -> None:
    store = await Store.open(db_path)
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match=r"is closed \(marks\)"):
        await store.marks(0)


async def test_integrity_check(store: Store, db_path: Path) -> None:
    await store.write_snapshot(0, [rec("A", 1, {"t": 1}), rec("B", 1)], applied_seq=1)
    assert await store.integrity_check() == []
    con = sqlite3.connect(db_path)
    with con:
        con.execute("INSERT INTO timers VALUES ('sku', 'ghost', 't', 5, 0)")
        con.execute("INSERT INTO timers VALUES ('sku', 'B', 't', 5, 4)")
    con.close()
    assert await store.integrity_check() == [
        "1 timers have no actor row",
        "1 timers name a partition other than their actor's",
    ]


@pytest.mark.parametrize(("mode", "level"), [("OFF", 0), ("NORMAL", 1), ("FULL", 2)])
async def test_synchronous_setting(db_path: Path, mode: store_module.Synchronous, level: int) -> None:
    async with await Store.open(db_path, synchronous=mode) as store:
        assert store.synchronous == mode
        db = store._db
        assert db is not None
        assert list(await db.execute_fetchall("PRAGMA synchronous")) == [(level,)]
        assert list(await db.execute_fetchall("PRAGMA journal_mode")) == [("wal",)]


async def test_bad_synchronous_is_a_usage_error(db_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous must be one of OFF, NORMAL, FULL"):
        await Store.open(db_path, synchronous="SOMETIMES")  # type: ignore[arg-type]
    assert not db_path.exists()


def _thread_niceness() -> dict[int, int]:
    """{thread id: niceness} of this process's threads (field 19 of /proc/self/task/<tid>/stat)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended since the listing (a worker thread of an earlier test)
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out[int(task.name)] = int(fields[16])
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux only")
async def test_only_the_writer_thread_runs_at_lower_priority(db_path: Path) -> None:
    import os
    import threading

    def try_lower(result: list[BaseException | None]) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, store_module.WRITER_NICENESS)
            result.append(None)
        except OSError as exc:
            result.append(exc)

    probe: list[BaseException | None] = []
    t = threading.Thread(target=try_lower, args=(probe,))
    t.start()
    t.join()
    if probe != [None]:
        pytest.skip(f"this system does not let a thread lower its priority: {probe}")
    before = _thread_niceness()
    own = os.getpriority(os.PRIO_PROCESS, 0)
    async with await Store.open(db_path):
        now = _thread_niceness()
        added = {tid: nice for tid, nice in now.items() if tid not in before}
        lowered = max(own, store_module.WRITER_NICENESS)
        # The writer's thread; the reader's (and any worker thread the opening used) keep ours.
        assert sorted(added.values()) == [own] * (len(added) - 1) + [lowered]
        assert len(added) >= 2
        assert now[threading.get_native_id()] == own  # the event loop's thread is untouched
