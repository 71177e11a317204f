"""The daemon's lifecycle: server, connection, streams, store, partitions, queries, graceful stop."""

from __future__ import annotations

import functools
import gc
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import anyio
import structlog
from nats.aio.client import Client as NATS
from nats.js.manager import JetStreamManager

from actors import Thresholds
from contracts.config import Config, ConfigError, duration_us
from contracts.secrets import redact
from router import health as health_model
from router.engine import open_query
from router.engine.assignment import Share
from router.engine.deps import PartitionDeps
from router.engine.ownership import (
    DataDirBusy,
    InstanceLock,
    Lease,
    Ownership,
    Timings,
)
from router.engine.partition import Partition
from router.engine.queries import serve_queries
from router.engine.running import CLOSE_S, run_owned
from router.engine.startup import (
    beyond_repair,
    check_duplicate_window,
    find,
    open_store,
    quarantine,
    riding_through,
)
from router.errors import FatalError
from router.jetstream import streams
from router.jetstream.connection import connect_options
from router.jetstream.ownership import OwnershipBucket, bucket_name
from router.jetstream.parser import FastParser, Refusal
from router.jetstream.publisher import Publisher
from router.jetstream.statecopy import StateCopy
from router.jetstream.statecopy import bucket_name as state_bucket_name
from router.metrics import PartitionGauges, RouterMetrics, Summary
from snapshots import Store, StoreDamagedError, StoreFullError

log = structlog.get_logger()




def wall_clock_us() -> int:
    return time.time_ns() // 1000


class Runtime:
    """Everything one router process owns. Build with `Runtime.open(cfg)`, then `serve()`."""

    def __init__(
        self, cfg: Config, nc: NATS, store: Store, clock: Callable[[], int], holding: Share
    ) -> None:
        self.cfg = cfg
        self.nc = nc
        self.jsm: JetStreamManager = nc.jsm()
        self.store = store
        self.now_us = clock
        self.thresholds = Thresholds.from_rules(cfg.rules)
        self.horizon_us = duration_us(cfg.router.timer_horizon)
        self.snapshot_every_s = duration_us(cfg.snapshots.every) / 1e6
        self.publisher = Publisher(nc)
        self.metrics = RouterMetrics()
        self.deps = PartitionDeps(
            cfg=cfg,
            nc=nc,
            jsm=self.jsm,
            store=store,
            publisher=self.publisher,
            thresholds=self.thresholds,
            now_us=clock,
            raw_path=self.raw_path,
            horizon_us=self.horizon_us,
            snapshot_every_s=self.snapshot_every_s,
            metrics=self.metrics,
        )
        # The partitions this instance runs now, in order: those it holds the leases of (see
        # router.engine.assignment). Changed in place: queries hold it.
        self.holding = holding
        self.instance = holding.ownership.instance
        self.partitions: list[Partition] = []
        self.metrics.watch_partitions(self._partition_gauges)
        self.metrics.watch_open(self._open_by_rule)
        self.started_at = time.monotonic()
        self.started_wall = health_model.now_rfc3339()
        self.status: health_model.Status = "starting"
        self._stop = anyio.Event()
        self._damaged: StoreDamagedError | None = None
        self._damage_found = anyio.Event()
        self.closing = False  # set once the final snapshot is written: the connection closes next
        self.url = ""
        self.state_copy: StateCopy | None = None  # [snapshots] cluster_copy (router.engine.clustercopy)
        self._stopped: dict[int, int] = {}  # partition -> applied_seq, of those stopped by a stop
        self._processed_at_stop = 0

    def raw_path(self, sub: Any, handler: Callable[[bytes, bytes, bytes, Any], None] | None, raw: bool = False) -> None:
        """Deliver `sub`'s messages straight from the protocol parser to `handler` (None: undo).

        nats-py builds a Msg, queues it and runs a callback task for every message; the partition's
        hot path needs none of that. `router.jetstream.parser.FastParser` (installed by `_connect`)
        calls the handler in wire order, every other subscription on nats-py's own path. `raw`:
        the header block as it came (bytes), not parsed (~80 us a message)."""
        parser = self.nc._ps
        assert isinstance(parser, FastParser), "connect with router.engine.daemon._connect"
        parser.raw_headers.discard(sub._id)
        if handler is None:
            parser.handlers.pop(sub._id, None)
            return
        parser.handlers[sub._id] = handler
        if raw:
            parser.raw_headers.add(sub._id)

    def refuse_bad_subjects(self, sub: Any, refusal: Refusal) -> None:
        """Give `sub`'s messages whose subject or reply subject is not valid UTF-8 to `refusal`
        (nats-py could not decode them; see router.jetstream.parser)."""
        parser = self.nc._ps
        assert isinstance(parser, FastParser), "connect with router.engine.daemon._connect"
        parser.refusals[sub._id] = refusal

    @classmethod
    @asynccontextmanager
    async def open(
        cls, cfg: Config, clock: Callable[[], int] = wall_clock_us, *, rebuilding: bool = False
    ) -> AsyncIterator[Runtime]:
        """Everything started and opened, closed again on exit. `rebuilding`: see `open_store`."""
        async with AsyncExitStack() as stack:
            data_dir = cfg.data_dir
            data_dir.mkdir(parents=True, exist_ok=True)
            url = cfg.nats.url.strip()
            if url == "embedded":
                from router.jetstream.embedded import embedded_server

                url = await stack.enter_async_context(embedded_server(data_dir, cfg.nats.embedded_port))
            try:
                lock = InstanceLock(data_dir)
            except DataDirBusy as exc:
                raise FatalError(str(exc)) from None
            stack.callback(lock.release)
            holder: dict[str, Runtime] = {}
            nc = await _connect(cfg, url, holder)
            stack.push_async_callback(_close_nats, nc)
            jsm = nc.jsm()
            try:
                infos = await riding_through("streams", streams.ensure_streams, jsm, cfg)
            except streams.StreamSetupError as exc:
                raise FatalError(str(exc)) from None
            timings = Timings.from_config(cfg)
            check_duplicate_window(cfg, timings.lease_s + timings.poll_s, infos)
            try:
                bucket = await riding_through(
                    "ownership bucket", functools.partial(
                        OwnershipBucket.open, nc, bucket_name(cfg.router.consumer), replicas=cfg.streams.replicas,
                        io_timeout=timings.io_timeout_s,
                    ),
                )
            except Exception as exc:
                raise FatalError(
                    f"cannot open the ownership bucket KV {bucket_name(cfg.router.consumer)}: {exc!r}"
                ) from None
            state_copy = await _open_state_copy(nc, cfg) if cfg.snapshots.cluster_copy else None
            store = await open_store(cfg, infos[cfg.streams.events], rebuilding=rebuilding, copied=state_copy is not None)
            stack.push_async_callback(store.close)
            holding = Share(Ownership(bucket, lock.instance, timings), cfg.router.partitions)
            rt = cls(cfg, nc, store, clock, holding)
            rt.url = url
            rt.state_copy = state_copy
            holder["rt"] = rt
            yield rt

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def store_damaged(self, exc: StoreDamagedError) -> None:
        """Found outside the partitions (a state query): `serve` raises it, as a partition would."""
        if self._damaged is None:
            self._damaged = exc
            self._damage_found.set()

    async def _raise_damage(self) -> None:
        await self._damage_found.wait()
        assert self._damaged is not None
        raise self._damaged

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `request_stop()`; then stop fetching, finish in-flight work and snapshot."""
        cfg = self.cfg
        # SQLite runs in aiosqlite's thread; with the default 5 ms switch interval a snapshot
        # write could hold the event loop off for that long when both want the GIL. Measured
        # with scripts/bench (snapshot scenario, 3 runs each): 1 ms gave an exception p99 of
        # 10.5 ms while 100k actors were written, 0.2 ms gave 9.4 ms; catch-up was unchanged.
        sys.setswitchinterval(0.0002)
        # Everything loaded so far (modules, classes, config) lives as long as the process:
        # keep it out of every later full collection, which would otherwise walk it each time.
        gc.collect()
        gc.freeze()
        async with anyio.create_task_group() as tg:
            await tg.start(self.publisher.serve, self.raw_path)
            if self.state_copy is not None:
                await self.state_copy.start(self.raw_path)
            await tg.start(
                functools.partial(
                    serve_queries, self.nc, self.partitions, self.store, self.thresholds, self.health,
                    self.refuse_bad_subjects, self.store_damaged, self.holding.owns, self.instance,
                    partition_count=cfg.router.partitions,
                )
            )
            tg.start_soon(self._raise_damage)
            self.status = "ok"
            tg.start_soon(self._health_file_loop)
            tg.start_soon(self._summary_loop)
            log.info(
                "router_started",
                url=redact(self.url),
                partitions=cfg.router.partitions,
                snapshots=str(cfg.snapshot_path),
                instance=self.instance,
            )
            await self.holding.serve(self._own, self._stop, task_status=task_status)
            self.closing = True  # the connection closes next
            self.status = "stopped"
            log.info(
                "router_stopped",
                applied_seq=[self._stopped[i] for i in sorted(self._stopped)],
                partitions=sorted(self._stopped),
                processed=self._processed_at_stop,
            )
            self._write_health()  # last: no reader may take an earlier report for a running router
            tg.cancel_scope.cancel()

    def owns(self, partition: int) -> bool:
        return self.holding.owns(partition)

    async def open_counts(self, by: Sequence[str] = open_query.BOARD) -> dict[tuple[str | None, ...], int]:
        """Open exceptions (CONTRACT 5.1) of the partitions this instance runs now, counted by the
        columns `by`: any of "kind", "key", "rule", "location", "severity", in that tuple's order.
        {(values...): count}; location None for rules without one; zero counts left out.

        The page's board uses the default (severity, kind, rule, location), the metrics'
        `open_exceptions{kind,rule}` gauge `open_query.BY_RULE`. Read from the stored open set
        (one GROUP BY in SQLite) with the changes not yet stored laid over it: no actor is loaded,
        so it is cheap enough for every scrape. Other instances count their own partitions."""
        running = [p for p in list(self.partitions) if self.owns(p.index)]
        return await open_query.counts(running, self.store, by)

    def owned(self) -> list[int]:
        """The partitions this instance owns now (the others are answered by their owners)."""
        return self.holding.owned()

    def assignments(self) -> dict[str, list[int]]:
        """Every live instance and the partitions it owns, from the ownership records (read every
        second); this instance's from its own leases."""
        return self.holding.assignments()

    async def _own(
        self, lease: Lease, lost: anyio.Event, release: anyio.Event, running: Callable[[], None]
    ) -> bool:
        """Run one partition under its lease (see router.engine.running.run_owned)."""
        return await run_owned(self, lease, lost, release, running)

    async def _open_by_rule(self) -> dict[tuple[str, str], int]:
        """`ops_router_open_exceptions{kind,rule}`: read at every scrape (see RouterMetrics.scrape)."""
        counts = await self.open_counts(open_query.BY_RULE)
        return {(str(kind), str(rule)): n for (kind, rule), n in counts.items()}

    def _partition_gauges(self) -> list[PartitionGauges]:
        """What each partition reports at scrape time (see RouterMetrics.watch_partitions)."""
        now, now_us = time.monotonic(), self.now_us()
        return [
            PartitionGauges(
                partition=p.index,
                lag=p.meter.lag,
                resident_actors=len(p.resident),
                snapshot_age_s=now - p.snapshots.caught_up_at,
                timers_due_soon=len(p.timers.heap),
                timers_overdue_s=max(0, now_us - p.timers.heap[0][0]) / 1e6 if p.timers.heap else 0.0,
            )
            for p in self.partitions
        ]

    def health(self) -> health_model.Health:
        """The one health model: what router.health answers and <data>/health.json holds."""
        nc = self.nc
        connected = nc.is_connected and not self.closing
        now = time.monotonic()
        parts = [
            health_model.PartitionHealth(
                partition=p.index,
                applied_seq=p.applied_seq,
                effects_confirmed_seq=p.effects_seq,
                snapshot_seq=p.snapshots.snapshot_seq,
                lag=p.meter.lag,
                caught_up=p.caught_up_us > 0,
                resident_actors=len(p.resident),
                dirty_actors=len(p.snapshots.dirty),
                timers_due_soon=len(p.timers.heap),
                processed=p.processed,
                dead_lettered=p.outbox.dead_lettered,
                exceptions=p.outbox.exceptions_sent,
                last_snapshot_age_s=round(now - p.snapshots.caught_up_at, 3),
                disk_full=p.snapshots.disk_full,
            )
            for p in self.partitions
        ]
        disk_full = any(p.disk_full for p in parts)
        status = self.status
        if status == "ok" and not connected:
            status = "nats_unavailable"
        elif status == "ok" and disk_full:
            status = "disk_full"
        return health_model.Health(
            status=status,
            disk_full=disk_full,
            connected=connected,
            nats="connected" if connected else ("reconnecting" if nc.is_reconnecting else "closed"),
            ready=connected and status in ("ok", "disk_full") and all(p.caught_up for p in parts)
            and self.holding.role == "owner",
            owned=self.holding.owned(),
            partition_count=self.cfg.router.partitions,
            instances=self.holding.assignments(),
            pid=os.getpid(),
            started_at=self.started_wall,
            updated_at=health_model.now_rfc3339(),
            refresh_s=health_model.REFRESH_S,
            uptime_s=round(now - self.started_at, 1),
            unconfirmed_publishes=self.publisher.outstanding,
            disk=health_model.disk_health(self.cfg.data_dir),
            partitions=parts,
            instance=self.instance,
            role=self.holding.role,
            owners={str(p): o for p, o in sorted(self.holding.owners().items())},
        )

    def _write_health(self) -> None:
        try:
            health_model.write_file(self.cfg.data_dir, self.health())
        except OSError as exc:
            log.debug("health_file_not_written", error=str(exc))

    async def _health_file_loop(self) -> None:
        """`<data>/health.json`, remade every REFRESH_S: readable even while NATS is away."""
        while True:
            self._write_health()
            await anyio.sleep(health_model.REFRESH_S)

    async def _summary_loop(self) -> None:
        """`router_summary` at info every `[log] summary_every`: what the router did meanwhile."""
        every = duration_us(self.cfg.log.summary_every) / 1e6
        if every <= 0:
            return
        summary = Summary(self.metrics)
        while True:
            await anyio.sleep(every)
            log.info("router_summary", **summary.fields())


async def _open_state_copy(nc: NATS, cfg: Config) -> StateCopy:
    name = state_bucket_name(cfg.router.consumer)
    try:
        # (asked again while the cluster elects a leader or is slow to make the R3 bucket)
        return await riding_through(  # type: ignore[no-any-return]
            "state copy bucket", functools.partial(StateCopy.open, nc, name, replicas=cfg.streams.replicas)
        )
    except Exception as exc:
        raise FatalError(
            f"cannot open the cluster copy of the state, KV {name} ([snapshots] cluster_copy): {exc!r}"
        ) from None


async def _connect(cfg: Config, url: str, holder: dict[str, Runtime]) -> NATS:
    async def disconnected() -> None:
        rt = holder.get("rt")
        if rt is not None and rt.closing:
            return  # our own close at the end of a stop
        log.warning("nats_disconnected", url=redact(url))
        if rt is not None:
            for p in rt.partitions:
                p.on_disconnected()

    async def reconnected() -> None:
        log.info("nats_reconnected", url=redact(url))
        rt = holder.get("rt")
        if rt is not None:
            for p in rt.partitions:
                p.on_reconnected()

    async def error(exc: Exception) -> None:
        log.warning("nats_error", error=repr(exc))

    try:
        opts = connect_options(
            cfg, url, name="ops-router", disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error
        )
    except ConfigError as exc:
        raise FatalError(f"config error: {exc}") from None
    opts.update(
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=3,
        allow_reconnect=True,
        pending_size=64 * 1024 * 1024,
    )
    try:
        with anyio.fail_after(15):
            nc = NATS()
            nc._ps = FastParser(nc)  # see router/jetstream/parser.py
            await nc.connect(**opts)
            return nc
    except Exception as exc:
        raise FatalError(f"cannot connect to NATS at {redact(url)} (nats.url): {exc!r}") from None


async def _close_nats(nc: NATS) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_S):
        try:
            await nc.drain()
        except Exception:
            with suppress(Exception):
                await nc.close()


# A service runs beside the router (the HTTP console, on-call), composed by `router run`: the engine
# imports none. `await service(rt, task_status=...)` once the Runtime is open (connected, streams
# ready, store open), before the partitions start; it calls `task_status.started()` once it serves
# (a FatalError before that stops the start with its message), and is cancelled after the graceful
# stop (final snapshots written, NATS still connected). Started again after a store rebuild.
Service = Callable[..., Coroutine[Any, Any, None]]


async def run(cfg: Config, clock: Callable[[], int] = wall_clock_us, services: Sequence[Service] = ()) -> int:
    """`router run`: serve until SIGTERM/SIGINT; 0 after a clean stop, 1 on a fatal error.

    A snapshot store found damaged while the router runs (its first read error, wherever it
    happens) is moved aside and the router starts again, rebuilding from the stream, or
    stops with a message when the stream no longer holds the whole history. `services` run
    beside it (see `Service`).
    """
    rebuilding = False
    try:
        while await _serve_until_stopped(cfg, clock, rebuilding, services):
            rebuilding = True
    except FatalError as exc:
        log.error("router_failed", error=str(exc))
        return 1
    return 0


async def _serve_until_stopped(
    cfg: Config, clock: Callable[[], int], rebuilding: bool, services: Sequence[Service] = ()
) -> bool:
    """One life of the runtime; True when it found its store damaged and moved it aside (start again)."""
    failure: BaseException | None = None
    damage: StoreDamagedError | None = None
    async with Runtime.open(cfg, clock, rebuilding=rebuilding) as rt:
        async with anyio.create_task_group() as tg:

            async def signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for signum in received:
                        log.info("signal_received", signal=signal.Signals(signum).name)
                        rt.request_stop()
                        return

            tg.start_soon(signals)
            try:
                for service in services:
                    await tg.start(service, rt)
                await rt.serve()
            except BaseException as exc:  # (raised here, not wrapped in this task group's ExceptionGroup)
                failure = find(exc, FatalError)
                full = find(exc, StoreFullError)
                if failure is None and full is not None:  # where no retry helps (starting, stopping)
                    failure = FatalError(f"{full}: free space on the disk that holds it and start again")
                damage = find(exc, StoreDamagedError) if failure is None else None
                if failure is None and damage is None:
                    raise
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if damage is None:
            return False
        first = await _events_first_seq(rt)
        if first is not None and first > 1 and not cfg.snapshots.cluster_copy:  # (else restored from the copy)
            raise beyond_repair(cfg, damage, first)
        stopping = rt.stopping
    # The store is closed now.
    await quarantine(cfg, damage, found="reading it while running")
    return not stopping


async def _events_first_seq(rt: Runtime) -> int | None:
    """The first sequence EVENTS holds, or None when it cannot be asked now."""
    try:
        info = await rt.jsm.stream_info(rt.cfg.streams.events)
    except Exception as exc:
        log.warning("stream_info_failed", stream=rt.cfg.streams.events, error=repr(exc))
        return None
    return int(info.state.first_seq or 0)
