"""What a start checks: the snapshot store against the stream, and what to do when the store is damaged.

The store says through which stream sequence each partition applied; the stream says what
it still holds. State can be brought up to date only when every event after the store's
marks is still in the stream, and rebuilt from nothing only when the stream holds the whole
history. Anything else stops the start with a message that says what to do.

A store found damaged later, at its first read error wherever that happens, is handled by
the daemon the same way: moved aside, then a new start rebuilds from the stream, or the
router stops when the stream cannot rebuild it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import structlog

from contracts.config import Config
from router.errors import FatalError
from snapshots import Store, StoreDamagedError, StoreError
from snapshots.relayout import LAYOUT_BLOB

log = structlog.get_logger()


async def delivered_through(store: Store, index: int, delivered: int, confirmed: int) -> int:
    """The highest stream sequence any run of partition `index` received, `delivered` (the
    consumer's mark, which covers only the last run) included, kept in the store.

    Every start recreates the consumer, so its delivered mark forgets an earlier run that got
    further before a crash; that run may have stored effects beyond it, which a restart past
    the duplicate window must find (`router.jetstream.recovery`) rather than publish again.
    Kept before the consumer is recreated, so a crash right after it still remembers; written
    only when events above `confirmed` (the effects-confirmed mark) were received, so a start
    that has nothing to check writes nothing (a damaged store is left as it was found).
    """
    name = f"delivered_through.{index}"
    raw = await store.read_blob(name)
    kept = int(raw) if raw and raw.isdigit() else 0
    if delivered > kept and delivered > confirmed:
        await store.save_blob(name, str(delivered).encode())
    return max(kept, delivered)


def check_marks(index: int, applied: int, info: Any, cfg: Config) -> tuple[int, int]:
    """(first, last) sequence of EVENTS (`info`), when partition `index`, applied through
    `applied`, can go on from there; FatalError otherwise."""
    stream = cfg.streams.events
    first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
    if applied > last:
        raise FatalError(
            f"partition {index}: the snapshot store has applied through sequence {applied} "
            f"but stream {stream} ends at {last}: the stream was recreated or purged. "
            f"Move {cfg.snapshot_path} aside to rebuild from what the stream holds"
        )
    if first > applied + 1 and info.state.messages:
        raise FatalError(
            f"partition {index}: the snapshot store has applied through sequence {applied} "
            f"but stream {stream} now starts at {first}: events {applied + 1}..{first - 1} were "
            f"removed before they were applied, so state cannot be brought up to date. Restore "
            f"{cfg.snapshot_path} from a backup that has applied through sequence {first - 1} or later"
        )
    return first, last


def beyond_repair(cfg: Config, exc: StoreDamagedError, first: int) -> FatalError:
    """The error for a damaged store that the stream (starting at `first`) cannot rebuild."""
    path = cfg.snapshot_path
    return FatalError(
        f"snapshot store {path} is damaged ({exc.reason}) and stream {cfg.streams.events} "
        f"no longer holds the whole history (it starts at sequence {first}; events "
        f"1..{first - 1} are gone), so state cannot be rebuilt from it. Restore {path} from a "
        f"backup and start again; the damaged file was left in place"
    )


async def quarantine(cfg: Config, exc: StoreDamagedError, found: str) -> Path:
    """Move a damaged store aside (kept, named with the time) and say so in one line."""
    path = cfg.snapshot_path
    moved = await Store.quarantine(path)
    log.error(
        "snapshot_store_damaged", path=str(path), reason=exc.reason, found=found, moved_to=str(moved),
        action="rebuilding from the stream",
    )
    return moved


E = TypeVar("E", bound=BaseException)


def find(exc: BaseException, cls: type[E]) -> E | None:
    """`exc` itself when a `cls`, else the first `cls` inside it (task groups wrap what their tasks raise)."""
    if isinstance(exc, cls):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find(inner, cls)
            if found is not None:
                return found
    return None


async def open_store(cfg: Config, events_info: Any, *, rebuilding: bool = False, copied: bool = False) -> Store:
    """Open the snapshot store; rebuild from the stream when damaged and the stream still has it all.

    `rebuilding`: the last store was found damaged and moved aside, which was said already.
    `copied`: the cluster copy is on: a missing or damaged store is restored from it at the
    partition's start, which then checks that the stream holds everything after its marks.
    """
    path = cfg.snapshot_path
    first = int(events_info.state.first_seq or 0)
    has_history = first <= 1 or copied  # never purged (sequence 1 onward is all there), or copied
    try:
        store = await Store.open(path, synchronous=cfg.snapshots.synchronous)
    except StoreDamagedError as exc:
        if not has_history:
            raise beyond_repair(cfg, exc, first) from None
        await quarantine(cfg, exc, found="opening it")
        rebuilding = True
        store = await Store.open(path, synchronous=cfg.snapshots.synchronous)
    store = await _check_layout(cfg, store, copied)
    if store.created and not has_history:
        await store.close()
        path.unlink(missing_ok=True)
        raise FatalError(
            f"snapshot store {path} does not exist but stream {cfg.streams.events} already starts at "
            f"sequence {first} (earlier events are gone): state cannot be rebuilt from the stream. "
            f"Restore {path} from a backup"
        )
    if store.created and int(events_info.state.messages or 0) and not rebuilding:
        action = "restoring from the cluster copy, else rebuilding from the stream" if copied else "rebuilding state from the stream"
        log.warning("snapshot_store_new", path=str(path), action=action)
    return store


async def prepare_riding_through(p: Any, lease: Any) -> None:
    """`p.prepare()` (a Partition), asked again while JetStream answers nothing or is between
    leaders (a node of the cluster lost: an election takes seconds), for as long as `lease`
    holds: once it does not, `lease.check()` raises LeaseLost and the partition is abandoned."""
    import anyio

    from router.jetstream.connection import is_transient

    tries = 0
    while True:
        lease.check()
        try:
            await p.prepare()
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            tries += 1
            log.warning("partition_prepare_retry", partition=p.index, tries=tries, error=repr(exc))
        await anyio.sleep(min(0.25 * tries, 1.0))


async def riding_through(what: str, fn: Any, *args: Any, within_s: float = 30.0) -> Any:
    """`await fn(*args)`, asked again on a transient JetStream failure (see `is_transient`) for up
    to `within_s`: a start against a cluster that is electing a leader waits for it."""
    import anyio

    from router.jetstream.connection import is_transient

    deadline = anyio.current_time() + within_s
    tries = 0
    while True:
        try:
            return await fn(*args)
        except Exception as exc:
            if not is_transient(exc) or anyio.current_time() >= deadline:
                raise
            tries += 1
            log.warning("jetstream_retry", what=what, tries=tries, error=repr(exc))
        await anyio.sleep(min(0.25 * tries, 1.0))


# How long a new owner may take, after it took a partition, to apply again the events whose
# effects the old owner had on the wire: those lie past the consumer's ack floor, at most
# `[router] max_ack_pending` events, plus the replay from the new owner's last snapshot.
REPLAY_ALLOWANCE_S = 60.0


def check_duplicate_window(cfg: Config, takeover_s: float, infos: dict[str, Any]) -> bool:
    """Warn (`duplicate_window_short`) when a stream the router publishes to keeps a duplicate
    window shorter than the longest takeover plus replay; False then.

    An owner that lost its lease (frozen, cut off) may still have publishes in its socket; the
    new owner publishes the same effects under the same `Nats-Msg-Id` when it applies those
    events again, and the stream drops the second copy only within its duplicate window. The
    window checked is the stream's own (a stream made elsewhere keeps its setting), against
    `takeover_s` (the lease and a reading interval) + REPLAY_ALLOWANCE_S."""
    need = takeover_s + REPLAY_ALLOWANCE_S
    ok = True
    for name in (cfg.streams.events, cfg.streams.exceptions, cfg.streams.deadletter):
        info = infos.get(name)
        window = float(getattr(getattr(info, "config", None), "duplicate_window", 0) or 0)
        if window < need:
            ok = False
            log.warning(
                "duplicate_window_short", stream=name, duplicate_window_s=window, needed_s=need,
                takeover_s=takeover_s, replay_allowance_s=REPLAY_ALLOWANCE_S,
                advice="raise the stream's duplicate window ([streams] duplicate_window for streams the router "
                "creates; `nats stream edit` for one that exists): a taken-over partition's overlap could "
                "otherwise publish an effect twice",
            )
    return ok


async def _check_layout(cfg: Config, store: Store, copied: bool) -> Store:
    """The store must be laid out for `[router] partitions` (`router repartition` changes both).

    A store that does not say yet is marked now. One laid out for another count (this
    instance's store from before a repartition made elsewhere) is moved aside when the cluster
    copy can restore it, else the start stops with a message."""
    want = str(cfg.router.partitions)
    try:
        have = await store.read_blob(LAYOUT_BLOB)
        if have is None:
            await store.save_blob(LAYOUT_BLOB, want.encode())
            return store
    except StoreError:  # a damaged store: found (and handled) where the partitions read it
        return store
    if have.decode(errors="replace") == want:
        return store
    path = store.path
    await store.close()
    if not copied:
        raise FatalError(
            f"snapshot store {path} is laid out for {have.decode(errors='replace')} partitions but "
            f"[router] partitions is {want}: run `router repartition --to {want}` (or move the store "
            f"aside to rebuild it from the stream)"
        )
    moved = await Store.quarantine(path, "other-layout")
    log.warning(
        "snapshot_store_other_layout", path=str(path), partitions=have.decode(errors="replace"), want=want,
        moved_to=str(moved), action="restoring from the cluster copy",
    )
    store = await Store.open(path, synchronous=cfg.snapshots.synchronous)
    await store.save_blob(LAYOUT_BLOB, want.encode())
    return store
