"""A store file that cannot be used is reported precisely, never silently replaced; quarantine moves it aside."""

from __future__ import annotations

import random
import re
import sqlite3
from pathlib import Path

import pytest

from snapshots import ActorRecord, Store, StoreDamagedError, StoreError

pytestmark = pytest.mark.anyio


async def make_store(path: Path, actors: int = 400) -> None:
    async with await Store.open(path) as store:
        batch = [ActorRecord("sku", f"K{i}", i, bytes(300), {"t": i}) for i in range(actors)]
        await store.write_snapshot(0, batch, applied_seq=actors)


async def open_damaged(path: Path) -> StoreDamagedError:
    """Open `path`, expecting StoreDamagedError; check the file was left exactly as it was."""
    before = path.read_bytes()
    with pytest.raises(StoreDamagedError) as info:
        await Store.open(path)
    err = info.value
    assert err.path == path
    assert "\n" not in str(err)
    assert str(err) == f"snapshot store {path} is damaged: {err.reason}"
    assert path.read_bytes() == before
    return err


async def test_missing_file_is_created_not_damaged(db_path: Path) -> None:
    await make_store(db_path)
    db_path.unlink()
    async with await Store.open(db_path) as store:
        assert store.created
        assert await store.count_actors() == 0


async def test_empty_file(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"")
    err = await open_damaged(db_path)
    assert err.reason == "empty file (0 bytes), not a SQLite database"


async def test_random_bytes(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(random.Random(3).randbytes(8192))
    err = await open_damaged(db_path)
    assert err.reason.startswith("not a SQLite database (starts with b'")


async def test_text_file(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_text("[nats]\nurl = 'embedded'\n")
    err = await open_damaged(db_path)
    assert err.reason == 'not a SQLite database (starts with b"[nats]\\nurl = \'em")'


async def test_truncated_to_a_few_bytes(db_path: Path) -> None:
    await make_store(db_path)
    with db_path.open("r+b") as f:
        f.truncate(10)
    err = await open_damaged(db_path)
    assert err.reason == "truncated to 10 bytes, shorter than the SQLite header"


async def test_truncated_mid_file(db_path: Path) -> None:
    await make_store(db_path)
    size = db_path.stat().st_size
    with db_path.open("r+b") as f:
        f.truncate(size // 2)
    err = await open_damaged(db_path)
    assert re.fullmatch(
        rf"truncated to {size // 2} bytes; its header records {size // 4096} pages of 4096 bytes \({size} bytes\)",
        err.reason,
    )


async def test_foreign_sqlite_database(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    con = sqlite3.connect(db_path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    err = await open_damaged(db_path)
    assert err.reason == "a SQLite database but not a snapshot store (application_id 0x00000000)"


async def test_wrong_schema_version(db_path: Path) -> None:
    await make_store(db_path)
    con = sqlite3.connect(db_path)
    with con:
        con.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    con.close()
    err = await open_damaged(db_path)
    assert err.reason == "schema version 99, this build reads version 2"


async def test_a_store_of_schema_1_is_not_read(db_path: Path) -> None:
    """A store from before the open-exceptions table: taken for damaged, so the router rebuilds
    it from the stream (its open set cannot be made exact from the old store alone)."""
    await make_store(db_path)
    con = sqlite3.connect(db_path)
    with con:
        con.execute("DROP TABLE open_exceptions")
        con.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
    con.close()
    err = await open_damaged(db_path)
    assert err.reason == "missing schema: no open_exceptions, open_exceptions_counts"


async def test_missing_version_row(db_path: Path) -> None:
    await make_store(db_path)
    con = sqlite3.connect(db_path)
    with con:
        con.execute("DELETE FROM meta WHERE name = 'schema_version'")
    con.close()
    err = await open_damaged(db_path)
    assert err.reason == "missing schema: no schema_version row in meta"


async def test_missing_table(db_path: Path) -> None:
    await make_store(db_path)
    con = sqlite3.connect(db_path)
    con.execute("DROP TABLE timers")
    con.close()
    err = await open_damaged(db_path)
    assert err.reason == "missing schema: no timers, timers_due"


async def test_corrupt_pages_behind_a_good_header(db_path: Path) -> None:
    await make_store(db_path)
    data = db_path.read_bytes()
    db_path.write_bytes(data[:4096] + random.Random(5).randbytes(len(data) - 4096))
    err = await open_damaged(db_path)
    assert err.reason == "SQLite says: database disk image is malformed (during open)"


async def test_corrupt_actor_pages_found_by_integrity_check_and_reads(db_path: Path) -> None:
    """Start-up checks are cheap, so damage deep in the file shows at the first read, and in the full check."""
    await make_store(db_path, actors=2000)
    con = sqlite3.connect(db_path)
    (root,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'actors'").fetchone()
    con.close()
    with db_path.open("r+b") as f:
        f.seek((root - 1) * 4096)
        f.write(b"\xff" * 4096)
    async with await Store.open(db_path) as store:
        problems = await store.integrity_check()
        assert problems
        assert all("\n" not in p for p in problems)
        with pytest.raises(StoreDamagedError, match=r"SQLite says: .*malformed.* \(during load_actors\)$"):
            await store.load_actors([("sku", "K1")])


async def test_a_folder_in_the_way_is_an_error_but_not_damage(db_path: Path) -> None:
    db_path.mkdir(parents=True)
    with pytest.raises(StoreError, match="is not a regular file") as info:
        await Store.open(db_path)
    assert not isinstance(info.value, StoreDamagedError)


async def test_quarantine_moves_file_and_log_aside(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"garbage")
    wal = db_path.with_name(db_path.name + "-wal")
    shm = db_path.with_name(db_path.name + "-shm")
    wal.write_bytes(b"old log")
    shm.write_bytes(b"old shm")
    with pytest.raises(StoreDamagedError):
        await Store.open(db_path)

    moved = await Store.quarantine(db_path)
    assert re.fullmatch(r"router\.db\.damaged-\d{8}T\d{6}Z", moved.name), moved.name
    assert moved.parent == db_path.parent
    assert moved.read_bytes() == b"garbage"
    assert moved.with_name(moved.name + "-wal").read_bytes() == b"old log"
    assert moved.with_name(moved.name + "-shm").read_bytes() == b"old shm"
    assert not db_path.exists()
    assert not wal.exists()
    assert not shm.exists()

    async with await Store.open(db_path) as store:
        assert store.created

    # A second quarantine (in the same second, as here) does not overwrite the first.
    again = await Store.quarantine(db_path)
    assert again != moved
    assert again.name.startswith("router.db.damaged-")
    assert again.exists()
    assert moved.exists()


async def test_quarantine_of_nothing_is_an_error(db_path: Path) -> None:
    with pytest.raises(StoreError, match="no such file"):
        await Store.quarantine(db_path)


async def test_a_log_without_its_database_is_not_replayed_into_a_new_store(db_path: Path) -> None:
    await make_store(db_path)
    # Keep a log with frames: copy it while a writer holds the file open.
    async with await Store.open(db_path) as store:
        await store.write_snapshot(0, [ActorRecord("sku", "LATE", 9, b"x")], applied_seq=9)
        wal_bytes = db_path.with_name(db_path.name + "-wal").read_bytes()
    assert len(wal_bytes) > 32
    db_path.unlink()
    db_path.with_name(db_path.name + "-wal").write_bytes(wal_bytes)
    async with await Store.open(db_path) as store:
        assert store.created
        assert await store.count_actors() == 0
        assert await store.integrity_check() == []


def test_error_pickles_with_its_fields(tmp_path: Path) -> None:
    import pickle

    err = pickle.loads(pickle.dumps(StoreDamagedError(tmp_path / "x.db", "truncated")))
    assert (err.path, err.reason) == (tmp_path / "x.db", "truncated")
    assert str(err) == f"snapshot store {tmp_path / 'x.db'} is damaged: truncated"
