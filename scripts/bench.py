"""The issue-4 benchmark: the router against raw baselines measured in the same run.

Run it with `scripts/bench` (see docs/benchmark.md). Scenarios: catchup, alerts, latency,
keys, restart, snapshot, console. Each figure is the median over `--runs` runs; a ratio is the median
of the per-run ratios router/baseline. The table is printed at the end and written as JSON
to bench-results/<timestamp>.json. It is a benchmark, not a test: it fails (exit 1) only
when a scenario could not run, never because a target was missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import (
    ROOT,
    LatencyMix,
    Server,
    alert_heavy,
    brand_day,
    distinct_keys,
    nats_server_version,
    publish_core,
    received_qty,
    reset_streams,
    stream_last_seq,
)

# The router's CPU split: all threads (SQLite's included) against the event loop's own.
LOOP_CPU = "CPU per event in the event loop's thread"
SCENARIOS = ("catchup", "alerts", "latency", "keys", "restart", "snapshot", "ingest", "copy", "console")
# Run only when asked for (--only cluster): three servers and two routers, several minutes.
EXTRA_SCENARIOS = ("cluster",)
LIB = str(Path(__file__).resolve().parent / "bench_lib.py")
CONSOLE_CLIENTS = 20  # the console scenario's live-page users
T_START = time.monotonic()


def load1() -> float:
    """The 1-minute load average: other busy processes make every figure here low and noisy."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


LOADS: list[float] = []  # the load average at each progress line


def progress(text: str) -> None:
    load = load1()
    LOADS.append(load)
    print(f"[{time.monotonic() - T_START:7.1f}s load {load:4.2f}] {text}", flush=True)


# ---------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    runs: int
    catchup_events: int
    mix: dict[str, int]  # brand_day's skus / shipments / campaigns
    rate: int  # latency: events per second
    latency_s: float  # latency window (after the warm-up)
    warmup_s: float
    keys: int  # keys scenario: distinct keys touched
    cap: int  # resident_actors
    sample: int  # evicted keys checked after reload
    restart_events: int
    dirty: int  # snapshot scenario: dirty actors
    snapshot_window_s: float


FULL = Sizes(runs=3, catchup_events=200_000, mix={"skus": 20_000, "shipments": 10_000, "campaigns": 200},
             rate=5_000, latency_s=30.0, warmup_s=1.0, keys=1_000_000, cap=200_000, sample=100,
             restart_events=200_000, dirty=100_000, snapshot_window_s=10.0)
QUICK = Sizes(runs=1, catchup_events=50_000, mix={"skus": 5_000, "shipments": 2_500, "campaigns": 50},
              rate=5_000, latency_s=4.0, warmup_s=1.0, keys=150_000, cap=30_000, sample=50,
              restart_events=50_000, dirty=20_000, snapshot_window_s=5.0)


# ---------------------------------------------------------------------------- results


@dataclass
class Metric:
    """One row of the table; `router` and `baseline` hold one value per run."""

    scenario: str
    name: str
    unit: str
    target: str = "-"
    check: Callable[[float, float | None, float | None], bool] | None = None  # (router, baseline, ratio)
    router: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    pairs: list[tuple[float, float]] = field(default_factory=list)  # (router, baseline) of one run

    def ratios(self) -> list[float]:
        return [r / b for r, b in self.pairs if b]

    def summary(self) -> dict[str, Any]:
        r = statistics.median(self.router) if self.router else None
        b = statistics.median(self.baseline) if self.baseline else None
        ratios = self.ratios()
        ratio = statistics.median(ratios) if ratios else None
        met: bool | None = None
        if self.check is not None and r is not None:
            met = bool(self.check(r, b, ratio))
        return {
            "scenario": self.scenario,
            "metric": self.name,
            "unit": self.unit,
            "router": r,
            "baseline": b,
            "ratio": ratio,
            "target": self.target,
            "met": met,
            "runs": {"router": self.router, "baseline": self.baseline, "ratio": ratios},
        }


class Results:
    def __init__(self) -> None:
        self.metrics: dict[tuple[str, str], Metric] = {}
        self.errors: list[dict[str, str]] = []
        self.notes: list[str] = []

    def define(self, scenario: str, name: str, unit: str, target: str = "-",
               check: Callable[[float, float | None, float | None], bool] | None = None) -> Metric:
        key = (scenario, name)
        if key not in self.metrics:
            self.metrics[key] = Metric(scenario, name, unit, target, check)
        return self.metrics[key]

    def add(self, scenario: str, name: str, router: float | None, baseline: float | None = None) -> None:
        m = self.metrics[(scenario, name)]
        if router is not None:
            m.router.append(router)
        if baseline is not None:
            m.baseline.append(baseline)
            if router is not None:
                m.pairs.append((router, baseline))


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("events/s", "B", "actors", "keys"):
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "MiB":
        return f"{value:,.1f}"
    if unit == "%":
        return f"{value:.1f}"
    if unit == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    if unit == "s":
        return f"{value:.2f}"
    if unit == "us":
        return f"{value:.1f}"
    return f"{value:g}"


def render_table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "metric", "router", "baseline", "ratio", "target", "met"]
    body = []
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        metric = f"{r['metric']} ({r['unit']})" if r["unit"] else r["metric"]
        body.append([r["scenario"], metric, fmt(r["router"], r["unit"]), fmt(r["baseline"], r["unit"]),
                     "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["target"], met])
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    right = {2, 3, 4}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(b) for b in body)])


# ---------------------------------------------------------------------------- child processes

CHILDREN: set[int] = set()  # pids, killed at exit if still running
SERVERS: list[Server] = []  # stopped at exit if still running


@contextlib.contextmanager
def nats_server() -> Iterator[Server]:
    srv = Server()
    SERVERS.append(srv)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        SERVERS.remove(srv)


class ChildError(RuntimeError):
    pass


class Child:
    """A child process of bench_lib.py that speaks JSON lines; its stderr goes to a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.args = [sys.executable, LIB, *args]
        self.log_path = log_path
        self.proc: Process | None = None
        self.out: BufferedByteReceiveStream | None = None
        self.spawned_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: ASYNC230, SIM115 (a moment; handed to the child)
        try:
            self.spawned_at = time.monotonic()
            self.proc = await anyio.open_process(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                                 cwd=str(ROOT))
        finally:
            log.close()
        CHILDREN.add(self.proc.pid)
        assert self.proc.stdout is not None
        self.out = BufferedByteReceiveStream(self.proc.stdout)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def recv(self, within: float = 60) -> dict[str, Any]:
        assert self.out is not None
        try:
            with anyio.fail_after(within):
                line = await self.out.receive_until(b"\n", 1 << 24)
        except TimeoutError:
            raise ChildError(f"{self.name}: no answer within {within:.0f}s; log {self.log_path}:\n{self.log_tail()}") from None
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            raise ChildError(f"{self.name} exited; log {self.log_path}:\n{self.log_tail()}") from None
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise ChildError(f"{self.name}: {msg}")
        return msg

    async def send(self, **cmd: Any) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        await self.proc.stdin.send((json.dumps(cmd) + "\n").encode())

    async def call(self, within: float = 60, **cmd: Any) -> dict[str, Any]:
        await self.send(**cmd)
        return await self.recv(within)

    async def stop(self, within: float = 60) -> dict[str, Any] | None:
        """Ask it to stop and wait for its last word; kill it when it does not go in time."""
        if self.proc is None:
            return None
        last: dict[str, Any] | None = None
        try:
            if self.proc.returncode is None:
                with anyio.move_on_after(within):
                    try:
                        await self.send(cmd="stop")
                        while True:
                            msg = await self.recv(within)
                            if msg.get("event") == "stopped":
                                last = msg
                                break
                    except (ChildError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    await self.proc.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await kill(self.proc)
                CHILDREN.discard(self.proc.pid)
                self.proc = None
        return last


async def kill(proc: Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        with anyio.move_on_after(10):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            await stream.aclose()


# ---------------------------------------------------------------------------- the router and the raw consumers


class Workdir:
    """Temporary files of one benchmark: configs, snapshot stores, child logs."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="ops-router-bench-work-"))
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        d = self.path / f"{self.n:03d}-{name}"
        d.mkdir()
        return d


def write_config(d: Path, url: str, **sections: dict[str, Any]) -> Path:
    """A config.toml for the router under test: this server, a store in `d`, info logs."""
    cfg: dict[str, dict[str, Any]] = {
        "nats": {"url": url},
        "snapshots": {"path": str(d / "router.db")},
        "log": {"level": "info", "format": "json"},
        # The console as `router run` serves it, on a free port (never a fixed one: see the console scenario).
        "http": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    lines = []
    for name, values in cfg.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        lines.append("")
    path = d / "config.toml"
    path.write_text("\n".join(lines))
    return path


TRACE_STALLS_MS = float(os.environ.get("BENCH_TRACE_STALLS_MS", "0"))  # diagnostics: see docs/benchmark.md


async def start_router(d: Path, config: Path, marks: Iterable[int] = ()) -> tuple[Child, dict[str, Any]]:
    args = ["host", "--config", str(config)]
    if TRACE_STALLS_MS:
        args += ["--trace-stalls", str(TRACE_STALLS_MS)]
    for m in marks:
        args += ["--mark", str(m)]
    child = Child("router", args, d / "router.log")
    await child.start()
    try:
        await child.recv(60)  # imported
        serving = await child.recv(120)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await child.stop(10)
        raise
    return child, serving


async def start_raw_echo(d: Path, url: str) -> Child:
    child = Child("raw-echo", ["raw-echo", "--url", url], d / "raw-echo.log")
    await child.start()
    try:
        await child.recv(60)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await child.stop(10)
        raise
    return child


async def raw_catchup(d: Path, url: str, count: int, start_seq: int = 1) -> tuple[float, float]:
    """(events/s, CPU seconds) of the baseline over `count` events from `start_seq`."""
    child = Child("raw-catchup", ["raw-catchup", "--url", url, "--count", str(count), "--start-seq", str(start_seq)],
                  d / "raw-catchup.log")
    await child.start()
    try:
        msg = await child.recv(max(120, count / 5_000))
        return float(msg["rate"]), float(msg["cpu"])
    finally:
        with anyio.CancelScope(shield=True):
            await child.stop(10)


# ---------------------------------------------------------------------------- latency windows


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user and system, all threads) a process has used so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _ExcTs(msgspec.Struct):
    event_ts: str | None = None


def ts_us(text: str) -> int:
    t = dt.datetime.fromisoformat(text)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


@dataclass
class Window:
    samples: list[tuple[int, int]]  # (publish wall time us, latency us) per exception received
    sent: int
    alerts: int
    start_us: int  # wall time of the first publish

    def latencies_ms(self, since_us: int | None = None, until_us: int | None = None) -> list[float]:
        lo = since_us if since_us is not None else -1
        hi = until_us if until_us is not None else 1 << 62
        return sorted(lat / 1000 for ts, lat in self.samples if lo <= ts <= hi)


def pct(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 1)) - 1))
    return sorted_values[k]


async def latency_window(url: str, seconds: float, rate: int, mix: LatencyMix, expect_per_alert: int | None) -> Window:
    """Publish `rate` events/s for `seconds` on a precise schedule (core publishes, each stamped with
    its wall-clock publish time in `ts`) and collect, for every message on `exceptions.>`, how long
    after its event's publish it arrived. `expect_per_alert` None: every event is answered."""
    samples: list[tuple[int, int]] = []
    decode = msgspec.json.Decoder(_ExcTs).decode

    async def on_exception(msg: Any) -> None:
        now = time.time_ns() // 1000
        ev = decode(msg.data).event_ts
        if ev:
            t = ts_us(ev)
            samples.append((t, now - t))

    sub_nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    pub_nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    try:
        await sub_nc.subscribe("exceptions.>", cb=on_exception, pending_msgs_limit=0, pending_bytes_limit=0)
        await sub_nc.flush()
        total = int(seconds * rate)
        alerts = 0
        gc.collect()
        gc.freeze()
        start = time.perf_counter() + 0.01
        start_us = time.time_ns() // 1000 + 10_000
        i = 0
        while i < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while i < due:
                subject, data, is_alert = mix.next()
                alerts += is_alert
                await pub_nc.publish(subject, data)
                i += 1
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
        await pub_nc.flush()
        expected = total if expect_per_alert is None else alerts * expect_per_alert
        with anyio.move_on_after(5):
            while len(samples) < expected:  # noqa: ASYNC110 (callbacks append)
                await anyio.sleep(0.02)
        await anyio.sleep(0.1)
        return Window(list(samples), total, alerts, start_us)
    finally:
        gc.unfreeze()
        await pub_nc.close()
        await sub_nc.close()


async def prewarm(url: str, child: Child, mix: LatencyMix) -> None:
    """Create the window's keys before it starts, and wait until the consumer has handled them."""
    last = await publish_core(url, mix.prewarm())
    if child.name == "router":
        await child.call(300, cmd="wait", seq=last)
    else:
        await child.call(300, cmd="wait", count=last)


def describe(w: Window, since_us: int) -> str:
    lat = w.latencies_ms(since_us)
    p50, p99 = pct(lat, 0.50), pct(lat, 0.99)
    return (f"{w.sent:,} events ({w.alerts:,} alert), {len(w.samples):,} answers; "
            f"p50 {p50 or 0:.2f} ms, p99 {p99 or 0:.2f} ms, max {lat[-1] if lat else 0:.2f} ms")


# ---------------------------------------------------------------------------- scenarios


def cpu_busy(seconds: float = 1.0) -> float:
    """The share of all CPUs that was busy over `seconds` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return 0, 0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 0.0 if total1 == total0 else 1 - (idle1 - idle0) / (total1 - total0)


class Bench:
    def __init__(self, sizes: Sizes, results: Results, work: Workdir, wait_idle: float = 0) -> None:
        self.s = sizes
        self.res = results
        self.work = work
        self.wait_idle = wait_idle

    async def quiet(self, what: str) -> None:
        """With --wait-idle: before a measurement, wait (up to that long) for a second in which
        other processes keep less than a quarter of the CPUs busy (ours are idle meanwhile)."""
        if not self.wait_idle:
            return
        deadline = time.monotonic() + self.wait_idle
        busy = await anyio.to_thread.run_sync(cpu_busy)
        if busy < 0.25:
            return
        progress(f"{what}: waiting for other processes to quiet down (CPUs {busy:.0%} busy)")
        while busy >= 0.25 and time.monotonic() < deadline:
            busy = await anyio.to_thread.run_sync(cpu_busy)
        progress(f"{what}: {'starting' if busy < 0.25 else 'starting anyway'} (CPUs {busy:.0%} busy)")

    # -- catch-up --------------------------------------------------------------------

    async def catchup(self, alert: bool) -> None:
        s, res = self.s, self.res
        scen = "alerts" if alert else "catchup"
        n = s.catchup_events
        if alert:
            name = f"catch-up {n // 1000}k, alert-heavy: half the events raise"
            res.define(scen, name, "events/s", "report (no target)")
        else:
            name = f"catch-up {n // 1000}k, realistic mix"
            res.define(scen, name, "events/s", ">= 0.75x baseline", lambda r, b, x: x is not None and x >= 0.75)
        cpu = "CPU per event (all threads)"
        with_startup = f"{name}, counting the router's start-up"
        res.define(scen, with_startup, "events/s")
        res.define(scen, cpu, "us")
        res.define(scen, LOOP_CPU, "us")
        res.define(scen, "exceptions per 100 events", "%")
        msgs = list(alert_heavy(n, **s.mix) if alert else brand_day(n, **s.mix))
        with nats_server() as srv:
            for run in range(s.runs):
                await reset_streams(srv.url)
                await publish_core(srv.url, msgs)
                d = self.work.fresh(scen)
                base = rate = base_cpu = router_cpu = loop_cpu = 0.0
                stats: dict[str, Any] = {}
                for who in (("baseline", "router") if run % 2 == 0 else ("router", "baseline")):
                    await self.quiet(f"{scen} run {run + 1} {who}")
                    if who == "baseline":
                        base, base_cpu = await raw_catchup(d, srv.url, n)
                    else:
                        rate, router_cpu, loop_cpu, stats = await self._router_catchup(d, srv.url, n)
                res.add(scen, name, rate, base)
                res.add(scen, with_startup, stats.get("rate_with_startup"), base)
                res.add(scen, cpu, router_cpu / n * 1e6, base_cpu / n * 1e6)
                res.add(scen, LOOP_CPU, loop_cpu / n * 1e6)
                res.add(scen, "exceptions per 100 events", 100 * (stats.get("exceptions") or 0) / n)
                progress(f"{scen} run {run + 1}/{s.runs}: router {rate:,.0f} events/s, baseline {base:,.0f} events/s, "
                         f"ratio {rate / base:.2f}; CPU per event {router_cpu / n * 1e6:.1f} us vs "
                         f"{base_cpu / n * 1e6:.1f} us ({loop_cpu / n * 1e6:.1f} us in the loop's thread); "
                         f"{stats.get('exceptions')} exceptions")

    async def copy(self) -> None:
        """The cluster copy of the state ([snapshots] cluster_copy) on against off: catch-up of the
        realistic mix, CPU per event and bytes written to the cluster copy per event, alternating."""
        s, res = self.s, self.res
        scen = "copy"
        n = s.catchup_events
        name = f"catch-up {n // 1000}k with the cluster copy (baseline: copy off)"
        cpu = "CPU per event, copy on (baseline: off)"
        res.define(scen, name, "events/s", "report")
        res.define(scen, cpu, "us", "<= 1.15x baseline", lambda r, b, x: x is not None and x <= 1.15)
        res.define(scen, "bytes written to the cluster copy per event", "B")
        res.define(scen, "actor writes to the cluster copy per event", "n")
        msgs = list(brand_day(n, **s.mix))
        with nats_server() as srv:
            for run in range(s.runs):
                got: dict[bool, tuple[float, float, dict[str, Any]]] = {}
                for on in ((False, True) if run % 2 == 0 else (True, False)):
                    await reset_streams(srv.url)
                    await publish_core(srv.url, msgs)
                    d = self.work.fresh(f"copy-{'on' if on else 'off'}")
                    await self.quiet(f"{scen} run {run + 1} copy {'on' if on else 'off'}")
                    # A snapshot every tenth of the run (both ways), so the copy's writes fall
                    # within the measured span (the default 100k events / 5 s would write none).
                    rate, router_cpu, _loop, stats = await self._router_catchup(
                        d, srv.url, n, snapshots={"cluster_copy": on, "every_events": n // 10})
                    got[on] = (rate, router_cpu, stats)
                (r_on, c_on, st_on), (r_off, c_off, _st) = got[True], got[False]
                res.add(scen, name, r_on, r_off)
                res.add(scen, cpu, c_on / n * 1e6, c_off / n * 1e6)
                res.add(scen, "bytes written to the cluster copy per event", st_on.get("copy_bytes", 0) / n)
                res.add(scen, "actor writes to the cluster copy per event", st_on.get("copy_actors", 0) / n)
                progress(f"{scen} run {run + 1}/{s.runs}: copy on {r_on:,.0f} events/s, {c_on / n * 1e6:.1f} us/event; "
                         f"off {r_off:,.0f} events/s, {c_off / n * 1e6:.1f} us/event; "
                         f"{st_on.get('copy_bytes', 0) / n:.1f} B and {st_on.get('copy_actors', 0) / n:.3f} actor "
                         f"writes per event to the copy")

    async def _router_catchup(
        self, d: Path, url: str, n: int, **sections: dict[str, Any]
    ) -> tuple[float, float, float, dict[str, Any]]:
        """(events/s from serving to event `n` applied, CPU seconds over the same span (all threads,
        the event loop's thread), stats)."""
        child, serving = await start_router(d, write_config(d, url, **sections), marks=[n])
        try:
            reached = await child.call(max(120, n / 2_000), cmd="wait", seq=n)
            # The actor messages it appended after `n` (and their exceptions) too, for the count:
            # until the stream stops growing (the last ones may still be on their way when asked).
            last = -1
            while (now := await stream_last_seq(url)) != last:
                last = now
                await child.call(60, cmd="wait", seq=last)
                await anyio.sleep(0.3)
            stats = await child.call(cmd="stats")
        finally:
            await child.stop()
        # From serving: like the baseline's clock, which starts once its consumer exists. The time
        # before (store, key filter, consumer) is reported apart, as start-up.
        stats["rate_with_startup"] = n / (reached["t"] - serving["t0"])
        return (n / (reached["t"] - serving["t"]), reached["cpu"] - serving["cpu"],
                reached["loop_cpu"] - serving["loop_cpu"], stats)

    # -- latency ---------------------------------------------------------------------

    async def latency(self) -> None:
        s, res = self.s, self.res
        scen = "latency"
        p50 = f"publish -> exception p50 @ {s.rate:,}/s"
        p99 = f"publish -> exception p99 @ {s.rate:,}/s"
        res.define(scen, p50, "ms", "<= 2 ms", lambda r, b, x: r <= 2.0)
        res.define(scen, p99, "ms", "<= 10 ms and <= 3x baseline",
                   lambda r, b, x: r <= 10.0 and x is not None and x <= 3.0)
        res.define(scen, "exceptions received / expected", "x", "1.00", lambda r, b, x: r >= 0.999)
        with nats_server() as srv:
            for run in range(s.runs):
                out: dict[str, Window] = {}
                for who in (("baseline", "router") if run % 2 == 0 else ("router", "baseline")):
                    await reset_streams(srv.url, exceptions=who == "baseline")
                    d = self.work.fresh(f"latency-{who}")
                    mix = LatencyMix(seed=run)
                    await self.quiet(f"latency run {run + 1} {who}")
                    if who == "router":
                        child, _ = await start_router(d, write_config(d, srv.url))
                    else:
                        child = await start_raw_echo(d, srv.url)
                    try:
                        await prewarm(srv.url, child, mix)
                        out[who] = await latency_window(srv.url, s.warmup_s + s.latency_s, s.rate, mix,
                                                        LatencyMix.EXCEPTIONS_PER_ALERT if who == "router" else None)
                    finally:
                        await child.stop()
                    since = out[who].start_us + int(s.warmup_s * 1e6)
                    progress(f"latency run {run + 1}/{s.runs} {who}: {describe(out[who], since)}")
                r, b = out["router"], out["baseline"]
                rl = r.latencies_ms(r.start_us + int(s.warmup_s * 1e6))
                bl = b.latencies_ms(b.start_us + int(s.warmup_s * 1e6))
                res.add(scen, p50, pct(rl, 0.5), pct(bl, 0.5))
                res.add(scen, p99, pct(rl, 0.99), pct(bl, 0.99))
                res.add(scen, "exceptions received / expected",
                        len(r.samples) / max(1, r.alerts * LatencyMix.EXCEPTIONS_PER_ALERT))

    # -- console ---------------------------------------------------------------------

    async def console(self) -> None:
        """The latency scenario twice per run, the router alone: `[http] listen = "off"`, and with
        the console serving CONSOLE_CLIENTS feed streams and a /metrics scrape every second (the
        clients in a process of their own). Same workload, order alternating between runs."""
        s, res = self.s, self.res
        scen = "console"
        p99 = f"p99 @ {s.rate:,}/s, {CONSOLE_CLIENTS} feed clients + /metrics every 1 s vs console off"
        p50 = f"p50 @ {s.rate:,}/s, {CONSOLE_CLIENTS} feed clients + /metrics every 1 s vs console off"
        res.define(scen, p99, "ms", "<= 1.10x console off", lambda r, b, x: x is not None and x <= 1.10)
        res.define(scen, p50, "ms")
        cpu = "router CPU per event in the window (all threads)"
        res.define(scen, cpu, "us")
        res.define(scen, "feed events per client / exceptions", "x", "1.00", lambda r, b, x: r >= 0.999)
        with nats_server() as srv:
            for run in range(s.runs):
                out: dict[str, Window] = {}
                used: dict[str, float] = {}
                delivered = 0.0
                for who in (("off", "on") if run % 2 == 0 else ("on", "off")):
                    await reset_streams(srv.url)
                    d = self.work.fresh(f"console-{who}")
                    mix = LatencyMix(seed=run)
                    await self.quiet(f"console run {run + 1} {who}")
                    listen = "127.0.0.1:0" if who == "on" else "off"
                    child, _ = await start_router(d, write_config(d, srv.url, http={"listen": listen}))
                    load: Child | None = None
                    try:
                        await prewarm(srv.url, child, mix)
                        if who == "on":
                            base = (d / "http.url").read_text().strip()
                            load = Child("console-load", ["console-load", "--base", base, "--clients",
                                                          str(CONSOLE_CLIENTS), "--scrape-every", "1"],
                                         d / "console-load.log")
                            await load.start()
                            await load.recv(60)  # every stream has its first tick
                        cpu0 = proc_cpu_s(child.pid)
                        out[who] = await latency_window(srv.url, s.warmup_s + s.latency_s, s.rate, mix,
                                                        LatencyMix.EXCEPTIONS_PER_ALERT)
                        used[who] = (proc_cpu_s(child.pid) - cpu0) / out[who].sent
                        if load is not None:
                            last = await load.stop(30)
                            load = None
                            if last is None or last.get("feed_errors") or last.get("scrape_errors"):
                                raise ChildError(f"console-load: {last}")
                            delivered = last["raise_or_clear"] / CONSOLE_CLIENTS / max(1, len(out[who].samples))
                            progress(f"console run {run + 1}/{s.runs} load: {last['scrapes']} scrapes "
                                     f"(slowest {last['scrape_ms_max']:.1f} ms), "
                                     f"{last['feed_bytes'] / CONSOLE_CLIENTS / 1024:.0f} KiB per feed client")
                    finally:
                        if load is not None:
                            await load.stop(10)
                        await child.stop()
                    since = out[who].start_us + int(s.warmup_s * 1e6)
                    progress(f"console run {run + 1}/{s.runs} console {who}: {describe(out[who], since)}")
                on, off = out["on"], out["off"]
                on_l = on.latencies_ms(on.start_us + int(s.warmup_s * 1e6))
                off_l = off.latencies_ms(off.start_us + int(s.warmup_s * 1e6))
                res.add(scen, p99, pct(on_l, 0.99), pct(off_l, 0.99))
                res.add(scen, p50, pct(on_l, 0.5), pct(off_l, 0.5))
                res.add(scen, cpu, used["on"] * 1e6, used["off"] * 1e6)
                res.add(scen, "feed events per client / exceptions", delivered)

    # -- keys and restart ------------------------------------------------------------

    async def keys(self, restart: bool) -> None:
        s, res = self.s, self.res
        n, cap = s.keys, s.cap
        k = "keys"
        res.define(k, f"apply rate, {n:,} new keys", "events/s")
        res.define(k, "RSS at start", "MiB")
        res.define(k, f"RSS after {n:,} keys", "MiB")
        res.define(k, "RSS peak", "MiB")
        res.define(k, "RSS growth per resident actor", "B")
        res.define(k, "resident actors", "actors", f"<= {cap:,} (cap)", lambda r, b, x: r <= cap)
        res.define(k, "actors in the store", "actors", f"== {n:,}", lambda r, b, x: r == n)
        res.define(k, f"evicted keys correct after one more event (of {s.sample})", "keys", f"{s.sample}",
                   lambda r, b, x: r == s.sample)
        if restart:
            res.define("restart", "process start -> serving", "s")
            res.define("restart", "process start -> first new event applied", "s", "<= 2 s", lambda r, b, x: r <= 2.0)
            res.define("restart", f"catch-up {s.restart_events // 1000}k after restart, {n:,} stored", "events/s",
                       ">= 0.75x baseline", lambda r, b, x: x is not None and x >= 0.75)
            res.define("restart", "the same, counting the router's start-up", "events/s")
            res.define("restart", "CPU per event after restart (all threads)", "us")
            res.define("restart", LOOP_CPU, "us")
        with nats_server() as srv:
            for run in range(s.runs):
                await reset_streams(srv.url)
                d = self.work.fresh("keys")
                config = write_config(d, srv.url, snapshots={"resident_actors": cap})
                await self.quiet(f"keys run {run + 1}")
                await self._keys_run(srv.url, d, config, run)
                if restart:
                    await self._restart_run(srv.url, d, config, run)

    async def _keys_run(self, url: str, d: Path, config: Path, run: int) -> None:
        s, res, k = self.s, self.res, "keys"
        n = s.keys
        child, serving = await start_router(d, config, marks=[n])
        try:
            rss0 = serving["rss_kib"] / 1024
            t_pub = time.monotonic()
            await publish_core(url, distinct_keys(n))
            progress(f"keys run {run + 1}/{s.runs}: {n:,} events published in {time.monotonic() - t_pub:.1f}s")
            reached = await child.call(max(300, n / 1_000), cmd="wait", seq=n)
            rate = n / (reached["t"] - t_pub)
            settled = await child.call(300, cmd="settle")
            if not settled["settled"]:
                res.notes.append(f"keys run {run + 1}: not everything written back within 300 s: {settled}")
            count = (await child.call(300, cmd="count"))["actors"]
            rss = settled["rss_kib"] / 1024
            resident = settled["resident"]
            per_actor = (rss - rss0) * 1024 * 1024 / max(1, resident)
            # Keys that were evicted (now only in the store), spread over the whole range.
            candidates = [["sku", f"SKU-{i}"] for i in range(0, n, max(1, n // (20 * s.sample)))]
            gone = (await child.call(cmd="not_resident", keys=candidates))["keys"]
            sample = [int(key[4:]) for _, key in gone[:: max(1, len(gone) // s.sample)][: s.sample]]
            correct = await self._touch_and_check(url, child, sample)
            res.add(k, f"apply rate, {n:,} new keys", rate)
            res.add(k, "RSS at start", rss0)
            res.add(k, f"RSS after {n:,} keys", rss)
            res.add(k, "RSS peak", settled["hwm_kib"] / 1024)
            res.add(k, "RSS growth per resident actor", per_actor)
            res.add(k, "resident actors", resident)
            res.add(k, "actors in the store", count)
            res.add(k, f"evicted keys correct after one more event (of {s.sample})", correct)
            progress(f"keys run {run + 1}/{s.runs}: applied at {rate:,.0f} events/s; resident {resident:,} "
                     f"(dirty {settled['dirty']}), store {count:,}; RSS {rss0:.0f} -> {rss:.0f} MiB "
                     f"(peak {settled['hwm_kib'] / 1024:.0f}), {per_actor:,.0f} B per resident actor; "
                     f"{len(gone):,} of {len(candidates):,} probed keys evicted; {correct} of {len(sample)} sampled evicted "
                     f"keys correct after one more event")
        finally:
            t = time.monotonic()
            await child.stop(120)
            progress(f"keys run {run + 1}/{s.runs}: router stopped in {time.monotonic() - t:.1f}s")

    async def _touch_and_check(self, url: str, child: Child, sample: list[int]) -> int:
        """One more `received` (qty 7) for each sampled key; then its state must be the stored one plus 7."""
        base = await stream_last_seq(url)
        await publish_core(url, [(f"events.sku.SKU-{i}", b'{"type":"received","location":"DEL-WH-1","qty":7}')
                                 for i in sample])
        await child.call(120, cmd="wait", seq=base + len(sample))
        nc = await nats.connect(url)
        correct = 0
        try:
            for j, i in enumerate(sample):
                reply = json.loads((await nc.request(f"router.state.sku.SKU-{i}", b"", timeout=10)).data)
                loc = ((reply.get("state") or {}).get("locations") or {}).get("DEL-WH-1") or {}
                if reply.get("seq") == base + 1 + j and loc.get("on_hand") == received_qty(i) + 7:
                    correct += 1
                elif correct == j:  # say what the first wrong one looked like
                    progress(f"  SKU-{i}: expected seq {base + 1 + j}, on_hand {received_qty(i) + 7}; got {reply}")
        finally:
            await nc.close()
        return correct

    async def _restart_run(self, url: str, d: Path, config: Path, run: int) -> None:
        s, res = self.s, self.res
        m = s.restart_events
        base = await stream_last_seq(url)
        marker = base + 1
        msgs = [("events.sku.SKU-0", b'{"type":"received","location":"DEL-WH-1","qty":1}'),
                *brand_day(m, seed=2, **s.mix)]
        last = await publish_core(url, msgs)
        await self.quiet(f"restart run {run + 1}")
        baseline, baseline_cpu = await raw_catchup(d, url, m, start_seq=marker + 1)
        child, serving = await start_router(d, config, marks=[marker, last])
        try:
            first = (await child.call(60, cmd="wait", seq=marker))["t"]
            reached = await child.call(max(120, m / 2_000), cmd="wait", seq=last)
            done = reached["t"]
            nc = await nats.connect(url)
            try:
                reply = json.loads((await nc.request("router.state.sku.SKU-0", b"", timeout=10)).data)
            finally:
                await nc.close()
            if int(reply.get("seq") or 0) < marker:
                res.notes.append(f"restart run {run + 1}: router.state.sku.SKU-0 does not reflect seq {marker}: {reply}")
        finally:
            await child.stop(120)
        ready_s = serving["t"] - child.spawned_at
        first_s = first - child.spawned_at
        rate = (last - marker + 1) / (done - serving["t"])  # from serving, as in catch-up
        rate_all = (last - marker + 1) / (done - serving["t0"])
        res.add("restart", "process start -> serving", ready_s)
        res.add("restart", "process start -> first new event applied", first_s)
        res.add("restart", f"catch-up {m // 1000}k after restart, {s.keys:,} stored", rate, baseline)
        res.add("restart", "the same, counting the router's start-up", rate_all, baseline)
        cpu_us = (reached["cpu"] - serving["cpu"]) / (last - marker + 1) * 1e6
        loop_us = (reached["loop_cpu"] - serving["loop_cpu"]) / (last - marker + 1) * 1e6
        res.add("restart", "CPU per event after restart (all threads)", cpu_us, baseline_cpu / m * 1e6)
        res.add("restart", LOOP_CPU, loop_us)
        progress(f"restart run {run + 1}/{s.runs}: serving after {ready_s:.2f}s, first new event applied after "
                 f"{first_s:.2f}s; catch-up {rate:,.0f} events/s vs baseline {baseline:,.0f} "
                 f"(ratio {rate / baseline:.2f}; {rate_all / baseline:.2f} counting start-up); CPU per event "
                 f"{cpu_us:.1f} us vs {baseline_cpu / m * 1e6:.1f} us ({loop_us:.1f} us in the loop's thread)")

    # -- snapshots under load --------------------------------------------------------

    async def snapshot(self) -> None:
        s, res = self.s, self.res
        scen = "snapshot"
        nd = s.dirty
        during = "exception p99 while they are snapshotted"
        whole = "exception p99, whole window"
        target = "<= 10 ms and <= 3x baseline"
        ok: Callable[[float, float | None, float | None], bool] = lambda r, b, x: r <= 10.0 and x is not None and x <= 3.0  # noqa: E731
        res.define(scen, f"actors in the snapshot ({nd:,} touched)", "actors", f">= {nd:,}", lambda r, b, x: r >= nd)
        res.define(scen, "snapshot duration", "ms")
        res.define(scen, during, "ms", target, ok)
        res.define(scen, whole, "ms", target, ok)
        res.define(scen, "longest router event-loop stall in the snapshot", "ms")
        # The snapshot starts after `trigger` events of the window: every_events = dirty + trigger.
        trigger = int(s.rate * (s.warmup_s + 1.0))
        offset_us = time.time_ns() // 1000 - int(time.monotonic() * 1e6)  # wall = monotonic + offset
        with nats_server() as srv:
            for run in range(s.runs):
                out: dict[str, Window] = {}
                snap: dict[str, Any] | None = None
                for who in (("baseline", "router") if run % 2 == 0 else ("router", "baseline")):
                    await reset_streams(srv.url, exceptions=who == "baseline")
                    d = self.work.fresh(f"snapshot-{who}")
                    await self.quiet(f"snapshot run {run + 1} {who}")
                    # Few keys, so that the big snapshot holds little besides the touched ones.
                    mix = LatencyMix(seed=100 + run, prefix="SNAPLAT", alert_keys=500, skus=2_000, shipments=1_000,
                                     campaigns=100)
                    if who == "baseline":
                        child = await start_raw_echo(d, srv.url)
                        try:
                            await prewarm(srv.url, child, mix)
                            out[who] = await latency_window(srv.url, s.warmup_s + s.snapshot_window_s, s.rate, mix, None)
                        finally:
                            await child.stop()
                    else:
                        snap, out[who] = await self._snapshot_router(srv.url, d, nd, trigger, mix)
                    progress(f"snapshot run {run + 1}/{s.runs} {who}: "
                             f"{describe(out[who], out[who].start_us + int(s.warmup_s * 1e6))}")
                r, b = out["router"], out["baseline"]
                bl = b.latencies_ms(b.start_us + int(s.warmup_s * 1e6))
                rl = r.latencies_ms(r.start_us + int(s.warmup_s * 1e6))
                res.add(scen, whole, pct(rl, 0.99), pct(bl, 0.99))
                if snap is None or snap.get("end") is None:
                    res.notes.append(f"snapshot run {run + 1}: no complete snapshot of {nd:,} actors in the window")
                    progress(f"snapshot run {run + 1}/{s.runs}: no complete snapshot in the window")
                    continue
                lo = int(snap["start"] * 1e6) + offset_us
                hi = int(snap["end"] * 1e6) + offset_us
                in_snap = r.latencies_ms(lo, hi)
                res.add(scen, f"actors in the snapshot ({nd:,} touched)", snap["actors"])
                res.add(scen, "snapshot duration", (snap["end"] - snap["start"]) * 1000)
                res.add(scen, during, pct(in_snap, 0.99), pct(bl, 0.99))
                res.add(scen, "longest router event-loop stall in the snapshot", snap["max_lag_ms"])
                progress(f"snapshot run {run + 1}/{s.runs}: {snap['actors']:,} actors written in "
                         f"{(snap['end'] - snap['start']) * 1000:.0f} ms, starting {(lo - r.start_us) / 1e6:.1f}s into "
                         f"the window; {len(in_snap)} exceptions from events published meanwhile: "
                         f"p99 {pct(in_snap, 0.99) or 0:.2f} ms, max {in_snap[-1] if in_snap else 0:.2f} ms; "
                         f"longest loop stall {snap['max_lag_ms']:.1f} ms")

    async def _snapshot_router(self, url: str, d: Path, nd: int, trigger: int,
                               mix: LatencyMix) -> tuple[dict[str, Any] | None, Window]:
        s = self.s
        warm = mix.prewarm()
        config = write_config(
            d, url,
            snapshots={"every_events": len(warm) + nd + trigger, "every": "1h", "resident_actors": max(200_000, 2 * nd)},
            # The horizon refresh forces a snapshot every timer_horizon/2: keep it out of the window.
            router={"timer_horizon": "1h"},
        )
        child, _ = await start_router(d, config)
        try:
            await publish_core(url, warm)
            last = await publish_core(url, distinct_keys(nd))
            await child.call(300, cmd="wait", seq=last)
            before = await child.call(cmd="stats")
            if before["dirty"] < nd:
                self.res.notes.append(f"snapshot: only {before['dirty']:,} dirty actors before the window")
            await child.call(cmd="monitor", on=True)
            window = await latency_window(url, s.warmup_s + s.snapshot_window_s, s.rate, mix,
                                          LatencyMix.EXCEPTIONS_PER_ALERT)
            stats = await child.call(cmd="stats")
        finally:
            await child.stop(120)
        big = [x for x in stats["snapshots"] if x["actors"] >= nd]
        return (big[0] if big else None), window


# ---------------------------------------------------------------------------- main


def git_describe() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    # The work tree's changes as a hash: the router is imported from it when each process starts.
    diff = run("diff", "HEAD", "--", "actors", "contracts", "router", "snapshots")
    return {"commit": run("rev-parse", "HEAD"),
            "changes": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


async def run_all(args: argparse.Namespace, sizes: Sizes, results: Results) -> None:
    work = Workdir()
    bench = Bench(sizes, results, work, args.wait_idle)
    steps: list[tuple[str, Callable[[], Any]]] = []
    only = set(args.only or SCENARIOS)
    if "catchup" in only:
        steps.append(("catchup", lambda: bench.catchup(alert=False)))
    if "alerts" in only:
        steps.append(("alerts", lambda: bench.catchup(alert=True)))
    if "latency" in only:
        steps.append(("latency", bench.latency))
    if "keys" in only or "restart" in only:
        steps.append(("keys+restart" if "restart" in only else "keys", lambda: bench.keys(restart="restart" in only)))
    if "snapshot" in only:
        steps.append(("snapshot", bench.snapshot))
    if "ingest" in only:
        steps.append(("ingest", lambda: ingest_scenario(sizes, results, work)))
    if "copy" in only:
        steps.append(("copy", bench.copy))
    if "console" in only:
        steps.append(("console", bench.console))
    if "cluster" in only:
        from bench_cluster import scenario as cluster_scenario

        actors = args.actors or (20_000 if sizes is QUICK else 100_000)
        steps.append(("cluster", lambda: cluster_scenario(results, sizes.catchup_events, actors, sizes.runs, progress)))
    failed = False
    try:
        for name, step in steps:
            progress(f"== {name}")
            try:
                await step()
            except Exception as exc:
                failed = True
                progress(f"{name} FAILED: {exc!r}")
                traceback.print_exc()
                results.errors.append({"scenario": name, "error": repr(exc)})
    finally:
        if failed or args.keep:
            progress(f"configs, stores and logs of the router kept in {work.path}")
        else:
            shutil.rmtree(work.path, ignore_errors=True)


async def ingest_scenario(sizes: Sizes, results: Results, work: Workdir) -> None:
    """HTTP ingestion against core publishes in the same run (scripts/bench_ingest.py)."""
    from bench_ingest import CLIENTS, run_ingest

    n = 1_000 if sizes is QUICK else 4_000
    runs = await run_ingest(sizes.runs, n, 500, progress, work.fresh("ingest"))
    ways = (("sequential", "HTTP sequential"), ("concurrent", f"HTTP {CLIENTS} clients"), ("batch", "HTTP batch of 500"))
    for way, label in ways:
        results.define("ingest", label, "events/s")
        results.define("ingest", f"{label} p50 per request", "ms")
        results.define("ingest", f"{label} p99 per request", "ms")
        for r in runs:
            results.add("ingest", label, r[way], r["baseline"])
            results.add("ingest", f"{label} p50 per request", r[f"{way}_p50_ms"])
            results.add("ingest", f"{label} p99 per request", r[f"{way}_p99_ms"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark the router against raw baselines (issue 4). See docs/benchmark.md.",
    )
    ap.add_argument("--quick", action="store_true", help="a smaller smoke version (about a minute, 1 run)")
    ap.add_argument("--runs", type=int, help="runs per scenario; figures are medians (default 3, --quick 1)")
    ap.add_argument("--only", action="append", choices=SCENARIOS + EXTRA_SCENARIOS, metavar="SCENARIO",
                    help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}; and, only when "
                    f"named: {', '.join(EXTRA_SCENARIOS)}")
    ap.add_argument("--actors", type=int, help="cluster scenario: actors stored before the failover "
                    "(default 100k, --quick 20k)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"), help="folder for the JSON results (bench-results)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each measurement wait up to S seconds for other processes to quiet down")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (configs, stores, router logs)")
    args = ap.parse_args(argv)
    # Ctrl-C, or SIGTERM, cancels the run: every process started is stopped on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        if args.runs < 1:
            ap.error("--runs must be at least 1")
        sizes.runs = args.runs
    started = dt.datetime.now(dt.UTC)
    git_at_start = git_describe()
    results = Results()
    progress(f"ops-router benchmark ({'quick' if args.quick else 'full'}, {sizes.runs} run(s) per scenario) on "
             f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    if load1() > 1.0 and not args.wait_idle:
        progress("warning: other processes keep this machine busy (load average above 1): the figures will be "
                 "low and noisy (--wait-idle S waits for quiet moments)")
    try:
        import uvloop  # noqa: F401

        opts = {"use_uvloop": True}
    except ImportError:
        opts = {}
    interrupted = False
    try:
        anyio.run(run_all, args, sizes, results, backend="asyncio", backend_options=opts)
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: the table holds what was measured so far")
    finally:
        for pid in list(CHILDREN):  # interrupted: nothing is left running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for srv in list(SERVERS):
            srv.stop()
    git_at_end = git_describe()
    if git_at_end != git_at_start:
        results.notes.append(f"the code changed during the run (git {git_at_start} -> {git_at_end}): "
                             "router processes started later ran the newer code")
    rows = [m.summary() for m in results.metrics.values()]
    print()
    print(render_table(rows))
    for note in results.notes:
        print(f"note: {note}")
    for err in results.errors:
        print(f"error: {err['scenario']}: {err['error']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc = {
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
        "mode": "quick" if args.quick else "full",
        "interrupted": interrupted,
        "sizes": sizes.__dict__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "nats_server": nats_server_version()},
        "git": {"start": git_at_start, "end": git_at_end},
        "load_average": {"min": min(LOADS, default=0.0), "max": max(LOADS, default=0.0),
                         "median": statistics.median(LOADS) if LOADS else 0.0},
        "rows": rows,
        "notes": results.notes,
        "errors": results.errors,
    }
    path.write_text(json.dumps(doc, indent=1))
    print(f"\nresults: {path}")
    return 130 if interrupted else (1 if results.errors else 0)


if __name__ == "__main__":
    sys.exit(main())
