"""The stored open set (snapshots/open_index.py): written with the actor rows, read by page and group."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from snapshots import ActorRecord, OpenRows, Store
from snapshots import open_index as stored

pytestmark = pytest.mark.anyio


def rec(key: str, open_rows: OpenRows | None, kind: str = "sku") -> ActorRecord:
    return ActorRecord(kind, key, 1, b"state", None, open_rows)


def put(*entries: tuple[str, str, str]) -> OpenRows:
    return OpenRows(put=tuple((rule, loc, sev, f'{{"rule":"{rule}","location":"{loc}"}}') for rule, loc, sev in entries))


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    return await Store.open(tmp_path / "router.db")


async def test_changes_travel_with_the_actor_rows(store: Store, tmp_path: Path) -> None:
    await store.write_snapshot(0, [
        rec("A", put(("stockout", "DS-1", "critical"), ("low_stock", "DS-1", "warning"), ("return_spike", "", "warning"))),
        rec("B", put(("low_stock", "DS-2", "warning"))),
        rec("C", None),
    ], applied_seq=3)
    await store.write_snapshot(1, [rec("S", put(("sla_at_risk", "", "warning")), kind="shipment")], applied_seq=4)
    rows, of_keys, total = await stored.page(store, [0, 1], {}, None, 10, [])
    assert [(r.kind, r.key, r.rule, r.location) for r in rows] == [
        ("shipment", "S", "sla_at_risk", ""),
        ("sku", "A", "low_stock", "DS-1"), ("sku", "A", "return_spike", ""), ("sku", "A", "stockout", "DS-1"),
        ("sku", "B", "low_stock", "DS-2"),
    ]
    assert (of_keys, total) == ([], 5)
    assert sorted((r.key, r.rule) for r in await stored.of_keys(store, [("sku", "B"), ("shipment", "S"), ("sku", "Z")])) == [
        ("B", "low_stock"), ("S", "sla_at_risk"),
    ]
    # Filters, a partition, a cursor, keys left out of the page (their rows come apart).
    rows, of_keys, total = await stored.page(store, [0], {"rule": "low_stock"}, None, 10, [("sku", "A")])
    assert [r.key for r in rows] == ["B"]
    assert sorted(r.rule for r in of_keys) == ["low_stock", "return_spike", "stockout"]
    assert total == 2
    rows, _, total = await stored.page(store, [0, 1], {}, ("sku", "A", "low_stock", "DS-1"), 2, [])
    assert [(r.key, r.rule) for r in rows] == [("A", "return_spike"), ("A", "stockout")]
    assert total == 5
    found, _ = await stored.groups(store, [0, 1], ("kind", "rule"), [])
    assert sorted(found) == [(("shipment", "sla_at_risk"), 1), (("sku", "low_stock"), 2), (("sku", "return_spike"), 1),
                             (("sku", "stockout"), 1)]
    found, of_keys = await stored.groups(store, [0], ("severity", "kind", "rule", "location", "key"), [("sku", "B")])
    assert len(found) == 4
    assert [r.key for r in of_keys] == ["B"]

    # A drop, a replacement, and a finished entity's clear, written with the actors.
    await store.write_actors(0, [
        rec("A", OpenRows(drop=(("stockout", "DS-1"),), put=(("low_stock", "DS-1", "warning", '{"new":1}'),))),
        rec("S", OpenRows(clear=True), kind="shipment"),
    ])
    rows, _, total = await stored.page(store, [0, 1], {}, None, 10, [])
    assert [(r.key, r.rule, r.payload) for r in rows] == [
        ("A", "low_stock", '{"new":1}'), ("A", "return_spike", '{"rule":"return_spike","location":""}'),
        ("B", "low_stock", '{"rule":"low_stock","location":"DS-2"}'),
    ]
    assert total == 3
    assert await store.integrity_check() == []

    # Rolled back with the actors: a fence that refuses leaves both as they were.
    def refuse() -> None:
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError):
        await store.write_snapshot(0, [rec("B", OpenRows(clear=True))], applied_seq=9, fence=refuse)
    assert (await stored.page(store, [0], {"key": "B"}, None, 10, []))[2] == 1
    await store.close()

    con = sqlite3.connect(tmp_path / "router.db")
    with con:
        con.execute("INSERT INTO open_exceptions VALUES ('sku', 'ghost', 'stockout', 'X', 0, 'critical', '{}')")
    con.close()
    async with await Store.open(tmp_path / "router.db") as again:
        assert await again.integrity_check() == ["1 open exceptions have no actor row in their partition"]
