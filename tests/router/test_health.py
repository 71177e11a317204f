"""The health model: its file, and what a reader concludes from a report (stale, gone, stopped, ok)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from contracts.times import rfc3339
from router import health as model

NOW_US = 1_790_000_000_000_000
S = 1_000_000


def report(
    status: model.Status = "ok", updated_us: int = NOW_US, pid: int = 0, lag: int = 0, **kw: object
) -> model.Health:
    part = model.PartitionHealth(
        partition=0, applied_seq=10, effects_confirmed_seq=10, snapshot_seq=8, lag=lag,
        caught_up=True, resident_actors=3, dirty_actors=1, timers_due_soon=0, processed=10, dead_lettered=1,
        exceptions=2, last_snapshot_age_s=0.5,
    )
    fields: dict[str, object] = {
        "status": status,
        "connected": status == "ok",
        "nats": "connected" if status == "ok" else "closed",
        "ready": True,
        "pid": pid or os.getpid(),
        "started_at": rfc3339(NOW_US - 60 * S),
        "updated_at": rfc3339(updated_us),
        "refresh_s": 1.0,
        "uptime_s": 60.0,
        "unconfirmed_publishes": 0,
        "disk": model.DiskHealth(path="/data", status="ok", free_bytes=10, total_bytes=20),
        "partitions": [part],
    }
    fields.update(kw)
    return msgspec.convert(fields, model.Health, from_attributes=True)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_file_round_trip_and_foreign_files(tmp_path: Path) -> None:
    h = report()
    model.write_file(tmp_path, h)
    assert model.read_file(tmp_path) == h
    assert msgspec.json.decode(model.file_path(tmp_path).read_bytes())["updated_at"] == rfc3339(NOW_US)
    assert [p.name for p in tmp_path.iterdir()] == ["health.json"]  # no temporary file left
    model.file_path(tmp_path).write_text('{"status": "ok", "nats": "connected"}')  # the old form: no timestamp
    assert model.read_file(tmp_path) is None
    assert model.read_file(tmp_path / "nowhere") is None


def test_a_fresh_report_of_a_live_pid_is_running() -> None:
    v = model.verdict(report(updated_us=NOW_US - 2 * S), now_us=NOW_US)
    assert (v.running, v.healthy, v.reason) == (True, True, "running, ok")


def test_a_stale_report_is_not_running_whatever_it_says() -> None:
    v = model.verdict(report(updated_us=NOW_US - 6 * S), now_us=NOW_US)
    assert not v.running
    assert not v.healthy
    assert v.reason.startswith("not running: its last report (ok, at ")
    assert "is 6s old, more than 5s" in v.reason


def test_a_report_of_a_dead_pid_is_not_running_even_when_fresh() -> None:
    pid = dead_pid()
    v = model.verdict(report(pid=pid), now_us=NOW_US)
    assert not v.running
    assert v.reason.startswith(f"not running: pid {pid} is gone (it last reported ok at ")


def test_a_report_of_a_killed_pid_not_yet_reaped_is_not_running() -> None:
    # SIGKILL leaves a zombie until the parent reaps it; kill(pid, 0) still succeeds on one.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        os.kill(child.pid, 0)  # the zombie is there
        assert not model.pid_alive(child.pid)
        v = model.verdict(report(pid=child.pid), now_us=NOW_US)
        assert not v.running
        assert v.reason.startswith(f"not running: pid {child.pid} is gone")
    finally:
        child.wait()
    assert model.pid_alive(os.getpid())


def test_stopped_and_unhealthy_states() -> None:
    v = model.verdict(report("stopped"), now_us=NOW_US)
    assert (v.running, v.healthy) == (False, False)
    assert v.reason.startswith("stopped (pid ")
    v = model.verdict(report("nats_unavailable"), now_us=NOW_US)
    assert (v.running, v.healthy, v.reason) == (True, False, "running, nats_unavailable (nats closed)")
    v = model.verdict(report(ready=False, lag=1234), now_us=NOW_US)
    assert (v.running, v.healthy, v.reason) == (True, False, "running, catching up (1,234 events to apply)")


def test_disk_health(tmp_path: Path) -> None:
    d = model.disk_health(tmp_path)
    assert d.status in ("ok", "low")
    assert d.free_bytes is not None
    assert d.total_bytes is not None
    assert 0 < d.free_bytes <= d.total_bytes
    assert model.disk_health(tmp_path / "missing").status == "unknown"
