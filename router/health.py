"""One health model: what `<data>/health.json`, the `router.health` reply and `/readyz` report.

The router builds a `Health` about once a second (`refresh_s`) and writes it to the data
folder, where it stays readable while NATS is away; `router.health` answers with the same
struct. A file outlives its writer, so it carries the writer's `pid` and `updated_at`, and
a graceful stop writes `status = "stopped"` last. Readers use `verdict()`: a report whose
writer is gone (its pid is not alive) or that was not refreshed for `STALE_INTERVALS`
refresh intervals says the router is not running, whatever its `status` says.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path
from typing import Final, Literal

import msgspec

from contracts.times import rfc3339, to_us

Status = Literal["starting", "ok", "nats_unavailable", "disk_full", "stopping", "stopped"]
DiskStatus = Literal["ok", "low", "unknown"]

FILE_NAME: Final = "health.json"
REFRESH_S: Final = 1.0
# A report older than this many refresh intervals is stale: its writer stopped refreshing it.
STALE_INTERVALS: Final = 5
# The data folder's disk is "low" below either of these.
LOW_DISK_BYTES: Final = 512 * 1024 * 1024
LOW_DISK_RATIO: Final = 0.05


class PartitionHealth(msgspec.Struct, kw_only=True):
    partition: int
    applied_seq: int  # every event at or below it was applied (or dead-lettered)
    effects_confirmed_seq: int  # the effects of every event at or below it are stored
    snapshot_seq: int  # the stored state holds every event at or below it
    lag: int  # events of this partition stored and not yet applied, as of its last delivery
    caught_up: bool  # it has seen the end of its share of the stream at least once
    resident_actors: int
    dirty_actors: int
    timers_due_soon: int
    processed: int
    dead_lettered: int
    exceptions: int
    last_snapshot_age_s: float
    disk_full: bool = False  # snapshots find no room: applying goes on, nothing is stored meanwhile


class DiskHealth(msgspec.Struct, kw_only=True):
    path: str
    status: DiskStatus
    free_bytes: int | None = None
    total_bytes: int | None = None


class Health(msgspec.Struct, kw_only=True):
    status: Status  # ok; nats_unavailable or disk_full (running, degraded); starting, stopping, stopped
    disk_full: bool = False  # some partition's snapshots find no room (see PartitionHealth.disk_full)
    connected: bool  # to NATS
    nats: Literal["connected", "reconnecting", "closed"]
    ready: bool  # connected, and every partition has caught up with its backlog (what /readyz reports)
    pid: int
    started_at: str  # RFC 3339, UTC
    updated_at: str  # RFC 3339, UTC: when this report was made
    refresh_s: float  # how often it is remade while the router runs
    uptime_s: float
    unconfirmed_publishes: int
    disk: DiskHealth
    partitions: list[PartitionHealth]  # those this instance runs: none while it stands by
    instance: str = ""  # this router's id in the ownership records (<data>/instance.id)
    role: Literal["owner", "standby"] = "owner"  # a standby waits for the owner's leases to lapse
    owners: dict[str, str] = msgspec.field(default_factory=dict)  # partition -> owner last seen
    owned: list[int] = msgspec.field(default_factory=list)  # the partitions this instance owns now
    partition_count: int = 0  # [router] partitions
    # Every live instance and the partitions it owns (from the ownership records, read every second).
    instances: dict[str, list[int]] = msgspec.field(default_factory=dict)


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(Health)


def encode(health: Health) -> bytes:
    return _ENCODER.encode(health)


def decode(data: bytes) -> Health:
    """A report as written or sent; raises msgspec.DecodeError on anything else."""
    return _DECODER.decode(data)


def now_rfc3339() -> str:
    return rfc3339(time.time_ns() // 1000)


def disk_health(path: Path) -> DiskHealth:
    """Free space of the file system that holds `path`."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return DiskHealth(path=str(path), status="unknown")
    low = usage.free < LOW_DISK_BYTES or usage.free < usage.total * LOW_DISK_RATIO
    return DiskHealth(path=str(path), status="low" if low else "ok", free_bytes=usage.free, total_bytes=usage.total)


def file_path(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def write_file(data_dir: Path, health: Health) -> None:
    """Replace `<data>/health.json` at once (a reader never sees half a file)."""
    path = file_path(data_dir)
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.format(encode(health), indent=1))
    tmp.replace(path)


def read_file(data_dir: Path) -> Health | None:
    """The last report written in `data_dir`, or None when there is none (or not one of ours)."""
    try:
        return decode(file_path(data_dir).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs (on this machine): a zombie, dead and not yet reaped
    by its parent (a router killed with SIGKILL under a supervisor that reaps late), is gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists; /proc says whether it runs
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class Verdict(msgspec.Struct, frozen=True):
    running: bool
    healthy: bool  # running, connected and every partition caught up
    reason: str  # one line for people


def verdict(health: Health, *, now_us: int | None = None, alive: bool | None = None) -> Verdict:
    """What a report says about the router now. `alive` defaults to checking its pid here."""
    now_us = time.time_ns() // 1000 if now_us is None else now_us
    age_s = (now_us - to_us(dt.datetime.fromisoformat(health.updated_at))) / 1e6
    if health.status == "stopped":
        return Verdict(False, False, f"stopped (pid {health.pid}, at {health.updated_at})")
    if alive is None:
        alive = pid_alive(health.pid)
    if not alive:
        return Verdict(
            False,
            False,
            f"not running: pid {health.pid} is gone (it last reported {health.status} at {health.updated_at})",
        )
    stale_after = STALE_INTERVALS * max(health.refresh_s, 0.1)
    if age_s > stale_after:
        return Verdict(
            False,
            False,
            f"not running: its last report ({health.status}, at {health.updated_at}) is {age_s:.0f}s old, "
            f"more than {stale_after:g}s",
        )
    if health.status != "ok":
        return Verdict(True, False, f"running, {health.status} (nats {health.nats})")
    if not health.ready:
        lag = sum(p.lag for p in health.partitions)
        return Verdict(True, False, f"running, catching up ({lag:,} events to apply)")
    return Verdict(True, True, "running, ok")
