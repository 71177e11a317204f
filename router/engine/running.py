"""One partition held by this instance, from its start to a graceful stop or an abandonment.

`run_owned` is the `work` of `router.engine.assignment.Share`: it builds the partition under
its lease (every pull, ack, consumer change, publish and store write checks the lease first),
starts it (asking again while JetStream is between leaders), runs it until the router stops
or the partition is handed over (then it stops fetching, applies what it received, waits for
its effects to be confirmed and writes its final snapshot: True), or until the lease is lost
(abandoned unsnapshotted and unacknowledged: False).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio
import structlog

from contracts.config import Config, duration_us
from router import health as health_model
from router.engine.clustercopy import PartitionCopy
from router.engine.deps import PartitionDeps
from router.engine.ownership import Lease, is_lease_lost
from router.engine.partition import Partition
from router.engine.startup import prepare_riding_through
from router.jetstream.statecopy import StateCopy


class Runtime(Protocol):
    """What a held partition needs of the daemon's Runtime (router.engine.daemon)."""

    cfg: Config
    deps: PartitionDeps
    instance: str
    state_copy: StateCopy | None
    partitions: list[Partition]
    status: health_model.Status
    _stop: anyio.Event
    _stopped: dict[int, int]
    _processed_at_stop: int

log = structlog.get_logger()

# Of `[router] shutdown_timeout`, what a stop keeps for closing the NATS connection (flushing acks).
CLOSE_S = 1.0


def under_lease(p: Partition, lease: Lease) -> Partition:
    """`p` under `lease`: every pull, ack, consumer change, publish and store write checks it first."""
    p.pulls.fence = lease.check
    p.outbox.fence = lease.valid
    p.snapshots.fence = lease.check
    return p


async def _set_when(scope: anyio.CancelScope, event: anyio.Event) -> None:
    await event.wait()
    scope.cancel()


async def run_owned(
    rt: Runtime, lease: Lease, lost: anyio.Event, release: anyio.Event, running: Callable[[], None]
) -> bool:
    """Run one partition under its lease: until it is handed over or the router stops (a
    graceful stop: True), or until the lease is lost (abandoned unsnapshotted and
    unacknowledged: False)."""
    p = under_lease(Partition(rt.deps, lease.partition), lease)
    if rt.state_copy is not None:  # [snapshots] cluster_copy: written and restored under the same lease
        p.snapshots.copy = PartitionCopy(
            rt.state_copy, rt.deps.store, p.index, epoch=lease.epoch, instance=rt.instance, fence=lease.check
        )
    lease.progress = lambda: p.snapshots.snapshot_seq
    fenced = False
    graceful = False
    try:
        await prepare_riding_through(p, lease)
        _add(rt, p)
        graceful = await _run_partition(rt, p, lease, lost, release, running)
        fenced = not graceful
    except Exception as exc:
        if not is_lease_lost(exc):
            raise
        fenced = True
    finally:
        if p in rt.partitions:
            rt.partitions.remove(p)
        if fenced:
            log.warning(
                "partition_fenced", partition=p.index, epoch=lease.epoch, applied_seq=p.applied_seq,
                queued=len(p._inq), unconfirmed=len(p.outbox.inflight),
                action="nothing more is sent or written for it",
            )
    return graceful

def _add(rt: Runtime, p: Partition) -> None:
    rt.partitions.append(p)
    rt.partitions.sort(key=lambda q: q.index)

async def _run_partition(
    rt: Runtime, p: Partition, lease: Lease, lost: anyio.Event, release: anyio.Event, running: Callable[[], None]
) -> bool:
    """Run prepared `p` until a stop or hand-over (stop it gracefully: True) or a lost lease (False)."""
    cfg = rt.cfg
    # No `return` inside the task groups below: leaving a scope that was cancelled from
    # within turns the return into a cancellation, which the scope then swallows.
    abandoned = False
    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as parts:
            await parts.start(p.run)
            log.info("partitions_running", partitions=[p.index], epochs=[lease.epoch])
            running()
            with anyio.CancelScope() as waiting:
                tg.start_soon(_set_when, waiting, lost)
                tg.start_soon(_set_when, waiting, release)
                await rt._stop.wait()
                waiting.cancel()
            if lost.is_set():
                abandoned = True
                parts.cancel_scope.cancel()
            else:
                stopping = rt._stop.is_set()
                if stopping:
                    log.info("router_stopping", partition=p.index)
                    rt.status = "stopping"
                timeout = duration_us(cfg.router.shutdown_timeout) / 1e6
                # Every step below shares this deadline, leaving CLOSE_S to close the connection.
                stop_by = anyio.current_time() + max(timeout - CLOSE_S, 0.5)
                await p.stop()
                # The partition loop returns once its received messages are applied.
                with anyio.move_on_after(timeout * 0.5) as scope:
                    await p.finished.wait()
                if scope.cancelled_caught:
                    log.warning("stop_timeout_draining", partition=p.index, seconds=timeout * 0.5)
                    parts.cancel_scope.cancel()
        if not abandoned:
            with anyio.CancelScope(shield=True):
                await _final_snapshot(rt, p, stop_by)
        tg.cancel_scope.cancel()
    return not abandoned

async def _final_snapshot(rt: Runtime, p: Partition, stop_by: float) -> None:
    with anyio.move_on_after(max((stop_by - anyio.current_time()) * 0.5, 0.1)) as waited:
        await p.outbox.wait_confirmed(p.applied_seq, lambda: False)
    if waited.cancelled_caught:
        log.warning("stop_with_unconfirmed_effects", partition=p.index, outstanding=len(p.outbox.inflight))
    # A snapshot waits for the effects of what it holds; without them it is not written
    # (the next owner applies those events again and publishes what is missing).
    with anyio.move_on_after(max(stop_by - anyio.current_time(), 0.2)) as snap:
        await p.final_snapshot()
    if snap.cancelled_caught:
        log.warning("stop_without_final_snapshot", partition=p.index, reason="effects not confirmed in time")
    if rt._stop.is_set():
        rt._stopped[p.index] = p.applied_seq
        rt._processed_at_stop += p.processed
    else:
        log.info("partition_handed_over", partition=p.index, applied_seq=p.applied_seq,
                 snapshot_seq=p.snapshots.snapshot_seq)

