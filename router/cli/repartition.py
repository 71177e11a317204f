"""`router repartition --to N`: move a stopped deployment from its partition count to N.

Every router instance must be stopped (producers may go on publishing; see the README). Steps,
each printed as it goes:

1. checks: no router answers `router.health`; `EVENTS` has no interior gaps (sequence numbers
   are kept, so the stores' marks stay valid); the local snapshot store is readable.
2. a new stream `<events>_P<N>` sourced from the old one through the subject transform that
   computes the partition token (`events.<kind>.<key>` -> `events.<p>.<kind>.<key>`, and a
   partitioned subject re-partitioned), starting at the old stream's first sequence, so every
   event keeps its sequence number; waited for until it holds everything.
3. a copy of the snapshot store laid out for N partitions (`snapshots.relayout`): actors,
   timers and open exceptions moved to their key's new partition; every partition's marks
   from the old ones (nothing lost, nothing applied twice: an actor past an event skips it).
4. the switch: the old stream stops taking `events.>` (its subjects become
   `<events>.retired`), the new one takes them once it has every event, and the new store
   replaces the old (kept beside it as `<name>.before-p<N>-<time>`).
5. the cluster copy of the state is emptied (each partition uploads its new layout at its first
   start) and the old stream's consumers are deleted.

A failure before the end undoes what was done, in reverse order (the new stream deleted, the
old stream's subjects back, the old store back in place), and the old deployment runs as
before. The old stream itself is kept (retired) until someone deletes it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import anyio.to_thread
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import NotFoundError

from contracts.config import Config, load_config
from router.cli.client import ClientError, connect, resolve_server
from router.cli.common import EXIT_FAILURE, EXIT_OK, err, run_async
from router.jetstream import streams
from router.jetstream.statecopy import bucket_name as state_bucket_name
from snapshots import _schema
from snapshots.errors import StoreError
from snapshots.relayout import relayout

STEPS: Final = ("checks", "copy", "store", "subjects", "switch", "cleanup")


class Failed(Exception):
    """A step failed; the message says which and why."""


def new_stream_name(cfg: Config, partitions: int) -> str:
    return f"{cfg.streams.events}_P{partitions}"


def _same(tokens: int, rest: bool = False) -> api.SubjectTransform:
    """A transform that keeps `events.` + `tokens` tokens (and the rest, with `rest`) as they are."""
    src = "events" + ".*" * tokens + (".>" if rest else "")
    dest = "events" + "".join(f".{{{{wildcard({i})}}}}" for i in range(1, tokens + 1)) + (".>" if rest else "")
    return api.SubjectTransform(src=src, dest=dest)


def transforms(old: int, new: int) -> list[api.SubjectTransform]:
    """The source's subject transforms from `old` to `new` partitions (they are its filters too:
    every shape of subject the old stream may hold is named, by token count, without overlap).

    `events.<kind>.<key>` gets the partition token (when `new` > 1); with `old` > 1, each old
    partition's `events.<p>.<kind>.<key>` gets its new one (one transform per old partition).
    Any other subject (bad ones, dead-lettered already) is copied as it is. With `old` > 1 a
    bad subject of four tokens (`events.sku.K.extra`) cannot be told from a partitioned one by
    a filter: it is not copied, the counts differ, and the migration stops and rolls back.
    """
    three = (api.SubjectTransform(
        src="events.*.*", dest=f"events.{{{{partition({new},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
    ) if new > 1 else _same(2))
    out = [_same(1), three, _same(3, rest=True)]
    if old > 1:
        token = f"{{{{partition({new},2)}}}}." if new > 1 else ""
        out += [
            api.SubjectTransform(src=f"events.{p}.*.*", dest=f"events.{token}{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}")
            for p in range(old)
        ]
    else:
        out.append(_same(3))
    return out


class Migration:
    def __init__(self, cfg: Config, to: int, nc: Any, fail_after: str | None, out: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.to = to
        self.nc = nc
        self.jsm = nc.jsm()
        self.fail_after = fail_after
        self.out = out
        self.old = cfg.streams.events
        self.new = new_stream_name(cfg, to)
        self.store = cfg.snapshot_path
        self.staged = self.store.with_name(f"{self.store.name}.p{to}")
        self.undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        self.out(f"[{time.monotonic() - self.started:6.1f}s] {text}")

    def done(self, step: str) -> None:
        if self.fail_after == step:
            raise Failed(f"failure injected after step {step!r} (--fail-after)")

    async def run(self) -> None:
        try:
            await self._checks()
            self.done("checks")
            await self._copy()
            self.done("copy")
            await self._store()
            self.done("store")
            await self._subjects()
            self.done("subjects")
            await self._switch()
            self.done("switch")
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._rollback(exc)
            raise
        self.undo.clear()
        await self._cleanup()

    async def _rollback(self, exc: BaseException) -> None:
        self.say(f"FAILED: {exc}")
        for what, step in reversed(self.undo):
            self.say(f"rolling back: {what}")
            try:
                await step()
            except Exception as undo_exc:  # go on with the rest; say what is left
                self.say(f"  could not: {undo_exc!r} (do it by hand)")
        self.say(f"rolled back: the deployment is as it was ({self.old}, {self.cfg.router.partitions} partition(s))")

    # ------------------------------------------------------------------ steps

    async def _checks(self) -> None:
        self.say(f"step 1/5: checks ({self.old}, {self.cfg.router.partitions} -> {self.to} partitions)")
        try:
            await self.nc.request("router.health", b"", timeout=1.5)
        except (NoRespondersError, NatsTimeoutError, TimeoutError):
            pass
        else:
            raise Failed("a router answers router.health: stop every instance first (SIGTERM)")
        info = await self.jsm.stream_info(self.old)
        if int(info.state.num_deleted or 0):
            raise Failed(
                f"stream {self.old} has {info.state.num_deleted} deleted messages inside it: sequence "
                f"numbers could not be kept"
            )
        with contextlib.suppress(NotFoundError):
            have = await self.jsm.stream_info(self.new)
            if have.config.sources and not have.config.subjects:
                self.say(f"  deleting {self.new}, left by an earlier try that did not finish")
                await self.jsm.delete_stream(self.new)
            else:
                raise Failed(f"stream {self.new} exists already (and takes subjects): nothing to do, or delete it")
        if not self.store.exists():
            raise Failed(
                f"no snapshot store at {self.store}: start the router once (it restores or rebuilds it), "
                f"stop it, then repartition"
            )
        self.staged.unlink(missing_ok=True)
        self.say(f"  stream {self.old}: sequences {info.state.first_seq}..{info.state.last_seq}; store {self.store}")

    async def _copy(self) -> None:
        info = await self.jsm.stream_info(self.old)
        c = info.config
        self.say(f"step 2/5: copying {self.old} into {self.new} with the partition token ({info.state.messages:,} messages)")
        cfg = api.StreamConfig(
            name=self.new,
            retention=c.retention,
            storage=c.storage,
            max_age=c.max_age,
            duplicate_window=c.duplicate_window,
            num_replicas=c.num_replicas,
            allow_direct=True,
            first_seq=int(info.state.first_seq or 1),
            sources=[api.StreamSource(
                name=self.old, subject_transforms=transforms(self.cfg.router.partitions, self.to) or None
            )],
        )
        await self.jsm.add_stream(cfg)
        self.undo.append((f"delete stream {self.new}", lambda: self.jsm.delete_stream(self.new)))
        await self._caught_up()

    async def _caught_up(self, within: float = 600.0) -> None:
        """Until the new stream holds every message of the old one, at the same sequences."""
        deadline = time.monotonic() + within
        shown = 0.0
        while True:
            old = await self.jsm.stream_info(self.old)
            new = await self.jsm.stream_info(self.new)
            o_last, n_last = int(old.state.last_seq or 0), int(new.state.last_seq or 0)
            if n_last >= o_last and int(new.state.messages or 0) == int(old.state.messages or 0):
                if n_last != o_last or int(new.state.first_seq or 0) != int(old.state.first_seq or 0):
                    raise Failed(
                        f"{self.new} holds sequences {new.state.first_seq}..{n_last}, {self.old} "
                        f"{old.state.first_seq}..{o_last}: they differ"
                    )
                self.say(f"  {self.new}: {n_last - int(new.state.first_seq or 1) + 1:,} messages, up to sequence {n_last:,}")
                return
            if time.monotonic() - shown >= 1.0:
                shown = time.monotonic()
                self.say(f"  copied through sequence {n_last:,} of {o_last:,}")
            if time.monotonic() >= deadline:
                raise Failed(f"{self.new} did not catch up with {self.old} in {within:.0f} s")
            await anyio.sleep(0.1)

    async def _store(self) -> None:
        self.say(f"step 3/5: the snapshot store laid out for {self.to} partitions -> {self.staged}")
        self.undo.append((f"delete {self.staged}", self._drop_staged))
        try:
            copied = await anyio.to_thread.run_sync(
                relayout, self.store, self.staged, self.to, streams.partition_of
            )
        except StoreError as exc:
            raise Failed(f"the store could not be copied: {exc}") from exc
        marks = sorted(set(copied.marks.values()))
        self.say(f"  {copied.actors:,} actors, {copied.timers:,} timers; marks (applied, effects) {marks}")

    async def _drop_staged(self) -> None:
        for p in (self.staged, _schema.wal_path(self.staged), _schema.shm_path(self.staged)):
            p.unlink(missing_ok=True)

    async def _subjects(self) -> None:
        self.say(f"step 4/5: switching events.> from {self.old} to {self.new}")
        info = await self.jsm.stream_info(self.old)
        before = list(info.config.subjects or [])
        info.config.subjects = [f"{self.old}.retired"]
        await self.jsm.update_stream(info.config)

        async def back() -> None:
            now = await self.jsm.stream_info(self.old)
            now.config.subjects = before
            await self.jsm.update_stream(now.config)

        self.undo.append((f"give {self.old} its subjects {before} back", back))
        await self._caught_up()  # what was published up to the change
        new = await self.jsm.stream_info(self.new)
        cfg = new.config
        cfg.sources = None
        cfg.subjects = ["events.>"]
        if self.to > 1:
            n = self.to
            cfg.subject_transform = api.SubjectTransform(
                src="events.*.*", dest=f"events.{{{{partition({n},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
            )
        await self.jsm.update_stream(cfg)

        async def unsubject() -> None:
            now = await self.jsm.stream_info(self.new)
            now.config.subjects = [f"{self.new}.unused"]
            now.config.subject_transform = None
            await self.jsm.update_stream(now.config)

        self.undo.append((f"take events.> from {self.new} again", unsubject))
        self.say(f"  {self.new} takes events.> now")

    async def _switch(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.say(f"step 5/5: the new store in place of {self.store}")
        moved = await anyio.to_thread.run_sync(_schema.quarantine_file, self.store, f"before-p{self.to}")
        staged = self.staged

        async def back() -> None:
            for a, b in ((moved, self.store), (_schema.wal_path(moved), _schema.wal_path(self.store)),
                         (_schema.shm_path(moved), _schema.shm_path(self.store))):
                if a.exists():
                    a.replace(b)

        self.undo.append((f"put {moved} back in place", back))
        staged.replace(self.store)
        self.say(f"  the old store is kept as {moved.name} ({stamp})")

    async def _cleanup(self) -> None:
        bucket = state_bucket_name(self.cfg.router.consumer)
        with contextlib.suppress(NotFoundError):
            await self.jsm.purge_stream(f"KV_{bucket}")
            self.say(f"  cluster copy {bucket} emptied (each partition uploads its new layout at its first start)")
        for i in range(self.cfg.router.partitions):
            with contextlib.suppress(NotFoundError):
                await self.jsm.delete_consumer(self.old, streams.consumer_name(self.cfg, i))
        self.say(
            f"done. In every instance's config set:\n  [router] partitions = {self.to}\n"
            f"  [streams] events = \"{self.new}\"\nthen start the routers. {self.old} is retired (kept; delete it "
            f"once you no longer want it: nats stream rm {self.old})"
        )


def cmd_repartition(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.to == cfg.router.partitions:
        err(f"[router] partitions is {args.to} already")
        return EXIT_FAILURE

    async def main() -> int:
        try:
            server = resolve_server(args.server, cfg)
            async with connect(server, cfg=cfg) as nc:
                await Migration(cfg, args.to, nc, args.fail_after, lambda s: print(s, flush=True)).run()
        except (Failed, ClientError, StoreError) as exc:
            err(str(exc))
            return EXIT_FAILURE
        return EXIT_OK

    rc: int = run_async(main)
    return rc


def add_parser(sub: Any, config_opt: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "repartition",
        parents=[config_opt],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="move a stopped deployment's stream and store to N partitions",
        description=sys.modules[__name__].__doc__,
    )
    p.add_argument("--to", type=int, required=True, metavar="N", help="the new partition count (1-1024)")
    p.add_argument("--server", metavar="URL", help="NATS URL (default: [nats] url, or NATS_URL)")
    p.add_argument("--fail-after", choices=STEPS, help=argparse.SUPPRESS)  # fault injection for the tests
    p.set_defaults(func=cmd_repartition)
