"""The stored open set (CONTRACT 5.1): one row per raise in force, kept with the actor states.

An actor record may carry `OpenRows`: what changed in its key's open set since the key was
last written. `put_open` applies them in the transaction that writes the actor rows (see
`snapshots.store`), so the stored open set always belongs to the stored states: a crash
never leaves one without the other. The reads answer `router.exceptions.open` and the
grouped counts without loading a single actor: they use the table alone.

A row: kind, key, rule, location ('' for a rule without one: a location is never empty),
partition, severity and the raise's payload as published (JSON text). The primary key
(kind, key, rule, location) is the reply's sort order, with the empty location (null) first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, NamedTuple, Protocol

import aiosqlite
import msgspec

_JSON: Final = msgspec.json.Encoder()

# The columns a filter or a grouping may name (the only text that reaches SQL unbound).
COLUMNS: Final = ("kind", "key", "rule", "location", "severity")


class OpenRows(msgspec.Struct, frozen=True, gc=False):
    """Changes to one key's open set. `clear`: every row of the key goes first (a finished
    entity); `drop`: (rule, location) rows that left; `put`: (rule, location, severity,
    payload) rows in force. `version` is the writer's own mark (see router.engine.open_index)."""

    clear: bool = False
    drop: tuple[tuple[str, str], ...] = ()
    put: tuple[tuple[str, str, str, str], ...] = ()
    version: int = 0


class Store(Protocol):
    """What the reads need of `snapshots.Store` (named so, not imported: the store imports this)."""

    def reader(self, op: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...


class OpenRow(NamedTuple):
    kind: str
    key: str
    rule: str
    location: str  # '' when the rule has none
    severity: str
    payload: str


_CLEAR: Final = (
    "DELETE FROM open_exceptions WHERE (kind, key) IN"
    " (SELECT j.value->>0, j.value->>1 FROM json_each(?1) AS j)"
)
_DROP: Final = (
    "DELETE FROM open_exceptions WHERE (kind, key, rule, location) IN"
    " (SELECT j.value->>0, j.value->>1, j.value->>2, j.value->>3 FROM json_each(?1) AS j)"
)
_PUT: Final = (
    "INSERT OR REPLACE INTO open_exceptions (kind, key, rule, location, partition, severity, payload)"
    " SELECT j.value->>0, j.value->>1, j.value->>2, j.value->>3, ?2, j.value->>4, j.value->>5"
    " FROM json_each(?1) AS j"
)


async def put_open(db: aiosqlite.Connection, partition: int, rows: Sequence[Any]) -> None:
    """Apply the `open` changes of `rows` (`snapshots.ActorRecord`s) inside the caller's transaction."""
    clear: list[tuple[str, str]] = []
    drop: list[tuple[str, str, str, str]] = []
    put: list[tuple[str, str, str, str, str, str]] = []
    for r in rows:
        o = r.open
        if o is None:
            continue
        if o.clear:
            clear.append((r.kind, r.key))
        drop += [(r.kind, r.key, rule, loc) for rule, loc in o.drop]
        put += [(r.kind, r.key, rule, loc, sev, payload) for rule, loc, sev, payload in o.put]
    if clear:
        await db.execute(_CLEAR, (_JSON.encode(clear).decode(),))
    if drop:
        await db.execute(_DROP, (_JSON.encode(drop).decode(),))
    if put:
        await db.execute(_PUT, (_JSON.encode(put).decode(), partition))


# ---------------------------------------------------------------------------------- reads


def _where(partitions: Sequence[int], filters: Mapping[str, str], *, by_index: bool) -> tuple[str, list[object]]:
    # `+partition` keeps SQLite off the index for a page: it reads the table in key order and
    # stops at the limit, instead of reading every match through the index and sorting.
    clauses = [f"{'' if by_index else '+'}partition IN (SELECT value FROM json_each(?))"]
    args: list[object] = [_JSON.encode(list(partitions)).decode()]
    for name, value in filters.items():
        if name not in COLUMNS:
            raise ValueError(f"not a column of the open set: {name!r}")
        clauses.append(f"{name} = ?")
        args.append(value)
    return " AND ".join(clauses), args


def _keys_json(keys: Sequence[tuple[str, str]]) -> str:
    return _JSON.encode(list(keys)).decode()


# Counts and groupings read the index (every column but the payload), not the table: SQLite
# would otherwise pick the table for a grouping by (kind, rule), reading every payload.
_COUNTS: Final = "INDEXED BY open_exceptions_counts"

# The rows of some keys (a JSON array of [kind, key]): a primary-key search per key.
_OF_KEYS: Final = (
    "SELECT kind, key, rule, location, severity, payload FROM open_exceptions WHERE (kind, key) IN"
    " (SELECT j.value->>0, j.value->>1 FROM json_each(?) AS j)"
)


async def page(
    store: Store,
    partitions: Sequence[int],
    filters: Mapping[str, str],
    after: tuple[str, str, str, str] | None,
    limit: int,
    keys: Sequence[tuple[str, str]],
) -> tuple[list[OpenRow], list[OpenRow], int]:
    """Of the stored open set of `partitions`, in one read (one statement: one state of the store):
    up to `limit` matching rows after `after` in sort order, leaving out `keys`; every row of
    `keys`; and the count of every match (`keys` included: the caller knows their rows)."""
    where, args = _where(partitions, filters, by_index=False)
    counted, count_args = _where(partitions, filters, by_index=True)
    if after is not None:
        where += " AND (kind, key, rule, location) > (?, ?, ?, ?)"
        args += list(after)
    # Leaving keys out row by row costs little here: a page stops at its limit.
    where += " AND kind || char(31) || key NOT IN (SELECT value FROM json_each(?))"
    args.append(_JSON.encode([f"{kind}\x1f{key}" for kind, key in keys]).decode())
    sql = (
        "SELECT 0, * FROM (SELECT kind, key, rule, location, severity, payload FROM open_exceptions"
        f" WHERE {where} ORDER BY kind, key, rule, location LIMIT ?)"
        f" UNION ALL SELECT 1, * FROM ({_OF_KEYS})"
        f" UNION ALL SELECT 2, count(*), '', '', '', '', '' FROM open_exceptions {_COUNTS} WHERE {counted}"
    )
    rows: list[OpenRow] = []
    of_keys: list[OpenRow] = []
    total = 0
    async with store.reader("open_page") as db:
        for part, *row in await db.execute_fetchall(sql, (*args, limit, _keys_json(keys), *count_args)):
            if part == 0:
                rows.append(OpenRow(*row))
            elif part == 1:
                of_keys.append(OpenRow(*row))
            else:
                total = int(row[0])
    return rows, of_keys, total


async def groups(
    store: Store, partitions: Sequence[int], columns: Sequence[str], keys: Sequence[tuple[str, str]]
) -> tuple[list[tuple[tuple[str, ...], int]], list[OpenRow]]:
    """Of the stored open set of `partitions`, in one read: [(values of `columns`, count)] of every
    row (`keys` included), and every row of `keys`."""
    for c in columns:
        if c not in COLUMNS:
            raise ValueError(f"not a column of the open set: {c!r}")
    where, args = _where(partitions, {}, by_index=True)
    cols = ", ".join(columns)
    n = len(columns)
    pad = ", ".join(["''"] * (6 - n - 1)) if n < 5 else ""
    sql = (
        f"SELECT 0, {cols}, count(*){', ' + pad if pad else ''} FROM open_exceptions {_COUNTS} WHERE {where}"
        f" GROUP BY {cols}"
        f" UNION ALL SELECT 1, * FROM ({_OF_KEYS})"
    )
    found: list[tuple[tuple[str, ...], int]] = []
    of_keys: list[OpenRow] = []
    async with store.reader("open_groups") as db:
        for part, *row in await db.execute_fetchall(sql, (*args, _keys_json(keys))):
            if part == 0:
                found.append((tuple(str(v) for v in row[:n]), int(row[n])))
            else:
                of_keys.append(OpenRow(*row))
    return found, of_keys


async def of_keys(store: Store, keys: Sequence[tuple[str, str]]) -> list[OpenRow]:
    """Every stored row of `keys`."""
    if not keys:
        return []
    async with store.reader("open_of_keys") as db:
        rows = await db.execute_fetchall(_OF_KEYS, (_keys_json(keys),))
    return [OpenRow(*r) for r in rows]


# Kinds whose entities finish (a delivered shipment, an ended campaign).
FINISHING: Final = ("campaign", "shipment")


async def finishing_keys(store: Store, partitions: Sequence[int]) -> dict[int, list[tuple[str, str]]]:
    """{partition: [(kind, key)]} of the entities of kinds that finish with stored rows (from the
    index: no payload is read)."""
    out: dict[int, list[tuple[str, str]]] = {p: [] for p in partitions}
    async with store.reader("open_finishing") as db:
        rows = await db.execute_fetchall(
            f"SELECT partition, kind, key FROM open_exceptions {_COUNTS} WHERE kind IN (?, ?)", FINISHING
        )
    seen: set[tuple[str, str]] = set()
    for p, kind, key in rows:
        if p in out and (kind, key) not in seen:
            seen.add((kind, key))
            out[p].append((kind, key))
    return out


async def count(store: Store) -> int:
    """Rows in the stored open set (every partition): for tooling."""
    async with store.reader("open_count") as db:
        ((n,),) = await db.execute_fetchall("SELECT count(*) FROM open_exceptions")
    return int(n)
