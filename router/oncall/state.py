"""A target's durable state: its open entries and how far through EXCEPTIONS it is (SQLite).

One file per target, `<data>/oncall/<target>.db`. An entry's state is written before the
target is called when the call opens a ticket (`sending`), so a crash in between is followed
by the call again, never by a ticket nobody closes; `done_seq` moves with the changes of the
messages it covers, so a restart replays exactly what it may have half done. Everything
replayed is idempotent at the target (labels, dedup keys, exception ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from router.oncall.targets import Entry

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    akey TEXT PRIMARY KEY,
    raw BLOB NOT NULL,
    labels TEXT NOT NULL,
    state TEXT NOT NULL,
    eligible_us INTEGER NOT NULL
);
"""


class TargetState:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.entries: dict[str, Entry] = {}
        self.done_seq = 0
        # While > done_seq: the first start's silent fold of what EXCEPTIONS held (nothing sent).
        self.seed_through = 0
        self.created = False

    @classmethod
    async def open(cls, path: Path) -> TargetState:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
        st = cls(db)
        async with db.execute("SELECT k, v FROM meta") as cur:
            meta = {k: int(v) async for k, v in cur}
        st.created = "done_seq" not in meta
        st.done_seq = meta.get("done_seq", 0)
        st.seed_through = meta.get("seed_through", 0)
        async with db.execute("SELECT akey, raw, labels, state, eligible_us FROM entries") as cur:
            async for akey, raw, lab, state, eligible in cur:
                st.entries[akey] = Entry(akey, json.loads(raw), bytes(raw), json.loads(lab), state, int(eligible))
        return st

    async def close(self) -> None:
        # Shielded: the sink stops by being cancelled, and a close cut short leaves aiosqlite's
        # thread to finish it and call back into an event loop that is gone (a traceback at
        # every SIGTERM of `router oncall`).
        with anyio.CancelScope(shield=True):
            await self.db.close()

    async def put(self, e: Entry) -> None:
        self.entries[e.akey] = e
        await self.db.execute(
            "INSERT OR REPLACE INTO entries (akey, raw, labels, state, eligible_us) VALUES (?, ?, ?, ?, ?)",
            (e.akey, e.raw, json.dumps(e.labels), e.state, e.eligible_us),
        )

    async def set_state(self, e: Entry, state: Any) -> None:
        e.state = state
        await self.db.execute("UPDATE entries SET state = ? WHERE akey = ?", (state, e.akey))

    async def remove(self, akey: str) -> None:
        self.entries.pop(akey, None)
        await self.db.execute("DELETE FROM entries WHERE akey = ?", (akey,))

    async def set_meta(self, key: str, value: int) -> None:
        await self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    async def commit(self, done_seq: int | None = None) -> None:
        if done_seq is not None and done_seq > self.done_seq:
            self.done_seq = done_seq
        await self.set_meta("done_seq", self.done_seq)
        await self.db.commit()
