"""snapshots.backup and the commands on it (`router backup`, `restore`, `check-store`), on real SQLite files."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from router.cli.main import main
from snapshots import ActorRecord, Store, StoreDamagedError, StoreError
from snapshots.backup import backup, in_use, restore, verify

pytestmark = pytest.mark.anyio


async def cli(*argv: str) -> int:
    return await anyio.to_thread.run_sync(main, list(argv))


def generation(seq: int, n: int) -> list[ActorRecord]:
    """Every actor at `seq`: a copy taken between two snapshots has them all at its applied mark."""
    return [ActorRecord("sku", f"K{i}", seq, seq.to_bytes(8, "big") * 40, {"t": seq}) for i in range(n)]


async def make_store(path: Path, actors: int = 400, seq: int = 1) -> None:
    async with await Store.open(path) as store:
        await store.write_snapshot(0, generation(seq, actors), applied_seq=seq, effects_seq=seq)


def damage(path: Path) -> None:
    """4 KiB overwritten on the actors table's root page (mid-file)."""
    con = sqlite3.connect(path)
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'actors'").fetchone()
    con.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * 4096)
        f.write(b"\xff" * 4096)


async def test_a_backup_taken_during_snapshot_writes_is_one_snapshot_and_blocks_neither(
    db_path: Path, tmp_path: Path
) -> None:
    """Snapshots go on committing while the copy is made, and the copy holds one of them whole:
    the partition's mark with exactly the actor rows written in the same transaction."""
    n = 50_000
    written: list[int] = []
    lag = 0.0
    done = False
    async with await Store.open(db_path) as store:
        await store.write_snapshot(0, generation(1, n), applied_seq=1, effects_seq=1)

        async def writer() -> None:
            seq = 1
            while not done:
                seq += 1
                await store.write_snapshot(0, generation(seq, 10), applied_seq=seq, effects_seq=seq)
                written.append(seq)

        async def ticker() -> None:
            nonlocal lag
            last = time.perf_counter()
            while not done:
                await anyio.sleep(0.001)
                now = time.perf_counter()
                lag = max(lag, now - last - 0.001)
                last = now

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            tg.start_soon(ticker)
            with anyio.fail_after(30):
                while len(written) < 2:  # the writer is under way
                    await anyio.sleep(0.01)
            before = len(written)
            copied = await anyio.to_thread.run_sync(backup, db_path, tmp_path / "b.db")
            during = len(written) - before
            done = True
    assert copied.actors == n
    ((applied, effects),) = copied.marks.values()
    assert applied == effects > 2
    con = sqlite3.connect(tmp_path / "b.db")
    fresh = {row[0] for row in con.execute("SELECT last_seq FROM actors WHERE key IN ('K0', 'K9')")}
    (oldest,) = con.execute("SELECT min(last_seq) FROM actors").fetchone()
    con.close()
    assert fresh == {applied}  # the rows committed with the mark, and nothing later
    assert oldest == 1
    print(f"backup of {n:,} actors: {copied.seconds:.3f} s, {during} snapshots committed meanwhile, loop lag {lag * 1000:.1f} ms")
    assert during > 0  # the writer was not blocked by the copy


async def test_backup_refuses_an_existing_path_and_leaves_nothing_half_written(db_path: Path, tmp_path: Path) -> None:
    await make_store(db_path)
    dest = tmp_path / "b.db"
    dest.write_text("mine")
    with pytest.raises(StoreError, match="already exists"):
        backup(db_path, dest)
    assert dest.read_text() == "mine"
    damage(db_path)
    with pytest.raises(StoreDamagedError):
        backup(db_path, tmp_path / "c.db")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["b.db"]
    with pytest.raises(StoreError, match="no snapshot store"):
        backup(tmp_path / "none.db", tmp_path / "d.db")


async def test_restore_refuses_an_open_store_and_keeps_the_one_it_replaces(db_path: Path, tmp_path: Path) -> None:
    await make_store(db_path, actors=100, seq=7)
    copy = tmp_path / "b.db"
    backup(db_path, copy)
    async with await Store.open(db_path) as store:
        await store.write_snapshot(0, generation(9, 150), applied_seq=9, effects_seq=9)
        assert in_use(db_path)
        with pytest.raises(StoreError, match="open in another process"):
            restore(copy, db_path)
    assert not in_use(db_path)
    copied, replaced = restore(copy, db_path)
    assert copied.marks == {0: (7, 7)}
    assert replaced is not None
    assert replaced.name.startswith("router.db.replaced-")
    async with await Store.open(db_path) as store:
        assert (await store.marks(0)) == (7, 7)
        assert (await store.stats()).actors == 100
        assert await store.integrity_check() == []
    assert verify(replaced).marks == {0: (9, 9)}


async def test_check_store_prints_rows_and_marks_and_fails_on_damage(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_store(db_path, actors=2000, seq=42)
    assert await cli("check-store", str(db_path)) == 0
    out = capsys.readouterr().out
    assert "rows: 2,000 actors, 2,000 timers" in out
    assert "partition 0: applied through 42, effects through 42" in out
    assert "integrity: ok" in out
    damage(db_path)
    assert await cli("check-store", str(db_path)) == 1
    out = capsys.readouterr().out
    assert "integrity: DAMAGED" in out
    assert await cli("check-store", str(db_path.parent / "none.db")) == 2
    assert "no snapshot store" in capsys.readouterr().err
    assert not (db_path.parent / "none.db").exists()


async def test_restore_where_only_a_stale_log_is_left_removes_the_log(db_path: Path, tmp_path: Path) -> None:
    """A -wal beside no store (a store deleted by hand, its log not) would be replayed into the restored file."""
    await make_store(db_path, actors=10, seq=3)
    copy = tmp_path / "b.db"
    backup(db_path, copy)
    db_path.unlink()
    Path(f"{db_path}-wal").write_bytes(b"stale log")
    Path(f"{db_path}-shm").write_bytes(b"stale index")
    _copied, replaced = restore(copy, db_path)
    assert replaced is None
    assert not Path(f"{db_path}-wal").exists()
    assert not Path(f"{db_path}-shm").exists()
    assert verify(db_path).marks == {0: (3, 3)}
