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


def _where(
    partitions: Sequence[int], filters: Mapping[str, str], exclude: Sequence[tuple[str, str]]
) -> tuple[str, list[object]]:
    clauses = ["partition IN (SELECT value FROM json_each(?))"]
    args: list[object] = [_JSON.encode(list(partitions)).decode()]
    for name, value in filters.items():
        if name not in COLUMNS:
            raise ValueError(f"not a column of the open set: {name!r}")
        clauses.append(f"{name} = ?")
        args.append(value)
    if exclude:
        clauses.append("(kind, key) NOT IN (SELECT j.value->>0, j.value->>1 FROM json_each(?) AS j)")
        args.append(_JSON.encode(list(exclude)).decode())
    return " AND ".join(clauses), args


async def page(
    store: Store,
    partitions: Sequence[int],
    filters: Mapping[str, str],
    exclude: Sequence[tuple[str, str]],
    after: tuple[str, str, str, str] | None,
    limit: int,
) -> tuple[list[OpenRow], int]:
    """(up to `limit` rows after `after` in sort order, the count of every match) of the stored
    open set of `partitions`, leaving out the keys in `exclude`; one statement, one read."""
    where, args = _where(partitions, filters, exclude)
    cursor = ""
    page_args = list(args)
    if after is not None:
        cursor = " AND (kind, key, rule, location) > (?, ?, ?, ?)"
        page_args += list(after)
    sql = (
        f"SELECT kind, key, rule, location, severity, payload, (SELECT count(*) FROM open_exceptions WHERE {where})"
        f" FROM open_exceptions WHERE {where}{cursor} ORDER BY kind, key, rule, location LIMIT ?"
    )
    async with store.reader("open_page") as db:
        found = list(await db.execute_fetchall(sql, (*args, *page_args, limit)))
        if not found:
            ((total,),) = await db.execute_fetchall(f"SELECT count(*) FROM open_exceptions WHERE {where}", args)
            return [], int(total)
    return [OpenRow(*r[:6]) for r in found], int(found[0][6])


async def groups(
    store: Store, partitions: Sequence[int], columns: Sequence[str], exclude: Sequence[tuple[str, str]]
) -> list[tuple[tuple[str, ...], int]]:
    """[(values of `columns`, count)] of the stored open set of `partitions`, without `exclude`d keys."""
    for c in columns:
        if c not in COLUMNS:
            raise ValueError(f"not a column of the open set: {c!r}")
    where, args = _where(partitions, {}, exclude)
    cols = ", ".join(columns)
    sql = f"SELECT {cols}, count(*) FROM open_exceptions WHERE {where} GROUP BY {cols}"
    async with store.reader("open_groups") as db:
        rows = await db.execute_fetchall(sql, args)
    n = len(columns)
    return [(tuple(str(v) for v in r[:n]), int(r[n])) for r in rows]


async def of_keys(store: Store, keys: Sequence[tuple[str, str]]) -> list[OpenRow]:
    """Every stored row of `keys`."""
    if not keys:
        return []
    sql = (
        "SELECT kind, key, rule, location, severity, payload FROM open_exceptions WHERE (kind, key) IN"
        " (SELECT j.value->>0, j.value->>1 FROM json_each(?) AS j)"
    )
    async with store.reader("open_of_keys") as db:
        rows = await db.execute_fetchall(sql, (_JSON.encode(list(keys)).decode(),))
    return [OpenRow(*r) for r in rows]


async def count(store: Store) -> int:
    """Rows in the stored open set (every partition): for tooling."""
    async with store.reader("open_count") as db:
        ((n,),) = await db.execute_fetchall("SELECT count(*) FROM open_exceptions")
    return int(n)
