"""The cluster scenario of scripts/bench (`scripts/bench --only cluster`): router instances on a
3-node loopback nats-server cluster with R3 streams.

- Catch-up, one instance against two: the instances start on empty streams and share the
  partitions (8), are frozen (SIGSTOP; the lease is long enough to outlast it), the events are
  stored, the instances resumed: the rate is the events over the time from the resume until
  every partition's consumer has delivered all and had all acknowledged (an event is
  acknowledged once its effects are confirmed). CPU per event is the routers' CPU (user +
  system, all threads, every instance) over the same span divided by the events; the three
  servers' CPU is reported beside it.
- Failover: two instances with the default lease (10 s, renewed every 3 s) hold `actors`
  actors (one event each, SKU-<i>), applied and snapshotted; one is SIGKILLed; a probe
  publishes one event per second to every partition the dead one owned; the failover time is
  from the SIGKILL until every one of those partitions has applied (acknowledged) a probe
  published after the kill, on the other instance. The takeover time (the other's
  `ownership_taken`) is reported beside it. The other instance is cold for those partitions:
  it replays their history from the stream.

Every process is started here and stopped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_lib import brand_day, distinct_keys, free_port, publish_core  # noqa: E402

from contracts.config import config_from_dict  # noqa: E402
from router.jetstream.embedded import find_nats_server  # noqa: E402
from router.jetstream.streams import consumer_name, partition_of  # noqa: E402

PARTITIONS = 8
SNAPSHOTS_EXTRA = ""  # --no-copy: "cluster_copy = false\n"
ONLY: str | None = None
FAILOVER_LEASE = ("10s", "3s")  # --lease, --renew
CFG = config_from_dict({"router": {"partitions": PARTITIONS}})
CLK_TCK = os.sysconf("SC_CLK_TCK")


async def _quiet(*_args: Any) -> None:
    """nats-py's connection callbacks: a node not up yet is expected while waiting for it."""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Cluster:
    """Three nats-server nodes routed to each other on loopback, temporary stores."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ports = [free_port() for _ in range(3)]
        self.routes = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    @property
    def first(self) -> str:
        return f"nats://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for i in range(3):
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for j, p in enumerate(self.routes) if j != i)
            conf = self.base / f"n{i}.conf"
            conf.write_text(
                f'server_name: "n{i}"\nlisten: "127.0.0.1:{self.ports[i]}"\n'
                f'jetstream {{ store_dir: "{self.base / f"n{i}"}" }}\n'
                f'cluster {{ name: bench, listen: "127.0.0.1:{self.routes[i]}", routes: [{routes}] }}\n'
            )
            log = open(self.base / f"n{i}.log", "ab")  # noqa: SIM115 (kept open for the child)
            self.procs.append(subprocess.Popen([find_nats_server(), "-c", str(conf)], stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    async def wait_ready(self, within: float = 60) -> None:
        with anyio.fail_after(within):
            while True:
                with contextlib.suppress(Exception):
                    nc = await nats.connect(self.first, connect_timeout=1, max_reconnect_attempts=0, error_cb=_quiet)
                    try:
                        await nc.jsm().account_info()
                        return
                    finally:
                        await nc.close()
                await anyio.sleep(0.2)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(10)


class Router:
    """`router run` in a process of its own, its data folder under `d`."""

    def __init__(self, d: Path, url: str, lease: str, renew: str) -> None:
        self.d = d
        d.mkdir(parents=True, exist_ok=True)
        self.config = d / "config.toml"
        self.config.write_text(
            f'[nats]\nurl = "{url}"\n[streams]\nreplicas = 3\n[snapshots]\npath = "{d / "data" / "router.db"}"\n{SNAPSHOTS_EXTRA}'
            f'[router]\npartitions = {PARTITIONS}\nlease = "{lease}"\nlease_renew_every = "{renew}"\n'
            '[log]\nlevel = "info"\nformat = "json"\n[http]\nlisten = "off"\n'
        )
        self.log = d / "router.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = Path(sys.executable).parent / "router"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "run", "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=self.d)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def instance(self) -> str:
        return (self.d / "data" / "instance.id").read_text().strip()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, within: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    e = json.loads(line)
                    if e.get("event") == name:
                        out.append(e)
        return out


@contextlib.contextmanager
def routers(base: Path, url: str, count: int, lease: str, renew: str) -> Iterator[list[Router]]:
    rs = [Router(base / f"r{i}", url, lease, renew) for i in range(count)]
    try:
        yield rs
    finally:
        for r in rs:
            r.stop()


async def owned(nc: Any, r: Router) -> list[int] | None:
    try:
        reply = await nc.request(f"router.health.{r.instance}", b"", timeout=1.0)
        return list(json.loads(reply.data).get("owned", []))
    except Exception:
        return None


async def wait_split(url: str, rs: list[Router], within: float = 90) -> dict[str, list[int]]:
    """Until the instances own every partition between them, in equal shares."""
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(within):
            while True:
                got = {}
                for r in rs:
                    if r.proc is not None and r.proc.poll() is not None:
                        tail = r.log.read_text(errors="replace").splitlines()[-5:]
                        raise RuntimeError(f"router {r.d.name} exited with {r.proc.returncode}: {tail}")
                    o = await owned(nc, r) if (r.d / "data" / "instance.id").exists() else None
                    if o is None:
                        break
                    got[r.instance] = o
                else:
                    parts = sorted(p for o in got.values() for p in o)
                    if parts == list(range(PARTITIONS)) and all(len(o) == PARTITIONS // len(rs) for o in got.values()):
                        return got
                await anyio.sleep(0.2)
    finally:
        await nc.close()


async def drained(jsm: Any, partitions: list[int]) -> bool:
    """Every partition's consumer delivered all and had all acknowledged (a consumer being made
    again by its router, or not made yet, is not)."""
    for p in partitions:
        try:
            info = await jsm.consumer_info("EVENTS", consumer_name_for(p))
        except Exception:
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return True


def consumer_name_for(p: int) -> str:
    return consumer_name(CFG, p)


async def replicated(url: str, within: float = 300) -> None:
    """Until every replica of EVENTS is current: the followers catching up on what was just
    published would otherwise count as the servers' CPU of the catch-up."""
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(within):
            while True:
                info = await nc.jsm().stream_info("EVENTS")
                peers = (info.cluster.replicas or []) if info.cluster is not None else []
                if peers and all(p.current and not p.lag for p in peers):
                    return
                await anyio.sleep(0.1)
    finally:
        await nc.close()


async def reset(url: str) -> None:
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        # Every stream: the three, the ownership bucket and the cluster copy of the state (a copy
        # whose marks are past a new, empty EVENTS would stop the next run's routers).
        for info in await jsm.streams_info():
            with contextlib.suppress(Exception):
                await jsm.delete_stream(info.config.name)
    finally:
        await nc.close()


async def catchup_run(c: Cluster, base: Path, instances: int, msgs: list[tuple[str, bytes]]) -> dict[str, float]:
    await reset(c.first)
    n = len(msgs)
    with routers(base, c.url, instances, "120s", "3s") as rs:
        for r in rs:
            r.start()
            await anyio.sleep(0.5)
        await wait_split(c.first, rs)
        for r in rs:
            r.signal(signal.SIGSTOP)
        await publish_core(c.first, msgs)
        await replicated(c.first)
        nc = await nats.connect(c.first)
        try:
            jsm = nc.jsm()
            r0 = [cpu_s(r.pid) for r in rs]
            s0 = [cpu_s(p) for p in c.pids()]
            t0 = time.monotonic()
            for r in rs:
                r.signal(signal.SIGCONT)
            with anyio.fail_after(max(300, n / 1000)):
                while not await drained(jsm, list(range(PARTITIONS))):  # noqa: ASYNC110 (polled: the server's view)
                    await anyio.sleep(0.05)
            t1 = time.monotonic()
            r1 = [cpu_s(r.pid) for r in rs]
            s1 = [cpu_s(p) for p in c.pids()]
        finally:
            await nc.close()
    return {
        "rate": n / (t1 - t0),
        "router_cpu_us": (sum(r1) - sum(r0)) / n * 1e6,
        "server_cpu_us": (sum(s1) - sum(s0)) / n * 1e6,
        "seconds": t1 - t0,
    }


async def failover_run(c: Cluster, base: Path, actors: int) -> dict[str, float]:
    await reset(c.first)
    with routers(base, c.url, 2, *FAILOVER_LEASE) as rs:
        for r in rs:
            r.start()
            await anyio.sleep(0.5)
        split = await wait_split(c.first, rs)
        await publish_core(c.first, distinct_keys(actors), chunk=5_000)
        nc = await nats.connect(c.first)
        try:
            jsm = nc.jsm()
            js = nc.jetstream()
            with anyio.fail_after(max(300, actors / 500)):
                while not await drained(jsm, list(range(PARTITIONS))):  # noqa: ASYNC110 (polled: the server's view)
                    await anyio.sleep(0.2)
            await anyio.sleep(6)  # a snapshot or more written ([snapshots] every = 5 s)
            victim, survivor = rs[0], rs[1]
            lost = split[victim.instance]
            probes: dict[int, str] = {}
            i = 0
            while len(probes) < len(lost):
                key = f"PROBE-{i}"
                p = partition_of(key, PARTITIONS)
                if p in lost and p not in probes:
                    probes[p] = key
                i += 1
            victim.signal(signal.SIGKILL)
            killed = time.monotonic()
            killed_wall = time.time()
            first_after: dict[int, int] = {}
            done: dict[int, float] = {}
            with anyio.fail_after(600):
                while len(done) < len(lost):
                    for p, key in probes.items():
                        with contextlib.suppress(Exception):
                            ack = await js.publish(f"events.sku.{key}",
                                                   b'{"type":"received","location":"DEL-WH-1","qty":1}', timeout=2)
                            first_after.setdefault(p, ack.seq)
                    for p in lost:
                        if p in done or p not in first_after:
                            continue
                        with contextlib.suppress(Exception):
                            info = await jsm.consumer_info("EVENTS", consumer_name_for(p))
                            if (info.ack_floor.stream_seq or 0) >= first_after[p]:
                                done[p] = time.monotonic() - killed
                    await anyio.sleep(0.1)
            taken = [e for e in survivor.events("ownership_taken") if e.get("reason") == "lapsed"]
            takeover = min(_wall(e) for e in taken) - killed_wall if taken else float("nan")
        finally:
            await nc.close()
    return {"failover_s": max(done.values()), "takeover_s": takeover, "partitions": len(lost)}


def _wall(event: dict[str, Any]) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def run(events: int, actors: int, runs: int, progress: Any) -> dict[str, Any]:
    """The scenario: medians of `runs` runs each; every figure with its runs."""
    base = Path(tempfile.mkdtemp(prefix="ops-router-bench-cluster-"))
    c = Cluster(base / "nats")
    (base / "nats").mkdir(parents=True)
    out: dict[str, Any] = {"events": events, "actors": actors, "partitions": PARTITIONS, "runs": runs}
    try:
        c.start()
        await c.wait_ready()
        msgs = list(brand_day(events))
        for instances in (1, 2) if ONLY in (None, "catchup") else ():
            got = []
            for run_no in range(runs):
                r = await catchup_run(c, base / f"c{instances}-{run_no}", instances, msgs)
                progress(f"cluster catch-up, {instances} instance(s), run {run_no + 1}/{runs}: {r['rate']:,.0f} "
                         f"events/s, router CPU {r['router_cpu_us']:.1f} us/event, servers "
                         f"{r['server_cpu_us']:.1f} us/event")
                got.append(r)
            out[f"catchup_{instances}"] = {
                k: statistics.median(g[k] for g in got) for k in got[0]
            } | {"all": got}
        got = []
        for run_no in range(runs if ONLY in (None, "failover") else 0):
            r = await failover_run(c, base / f"f-{run_no}", actors)
            progress(f"cluster failover, {actors:,} actors, run {run_no + 1}/{runs}: partitions applying again "
                     f"{r['failover_s']:.2f} s after the SIGKILL (taken over after {r['takeover_s']:.2f} s)")
            got.append(r)
        if got:
            out["failover"] = {k: statistics.median(g[k] for g in got) for k in got[0]} | {"all": got}
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)
    return out


async def scenario(results: Any, events: int, actors: int, runs: int, progress: Any) -> None:
    """The rows of scripts/bench's table (`results`: its Results); the 2-instance rows carry the
    1-instance figure as their baseline, so the ratio column reads as scaling."""
    scen = "cluster"
    one, two = "1 instance", "2 instances"
    rate = f"cluster catch-up {events // 1000}k, 8 partitions, R3 on 3 nodes: events/s"
    rcpu = "cluster catch-up: router CPU per event (all instances)"
    scpu = "cluster catch-up: 3 servers' CPU per event"
    for who in (one, two):
        results.define(scen, f"{rate}, {who}", "events/s", "report (2 vs 1 instance)" if who == two else "-")
        results.define(scen, f"{rcpu}, {who}", "us")
        results.define(scen, f"{scpu}, {who}", "us")
    fail = f"failover, {actors // 1000}k actors: SIGKILL to its partitions applying elsewhere"
    take = "failover: SIGKILL to ownership_taken (lease 10 s)"
    results.define(scen, fail, "s", "<= 10 s", lambda r, b, x: r <= 10)
    results.define(scen, take, "s")
    out = await run(events, actors, runs, progress)
    for i, who in ((1, one), (2, two)):
        for r1, r in zip(out["catchup_1"]["all"], out[f"catchup_{i}"]["all"], strict=True):
            base = r1 if i == 2 else None
            results.add(scen, f"{rate}, {who}", r["rate"], base["rate"] if base else None)
            results.add(scen, f"{rcpu}, {who}", r["router_cpu_us"], base["router_cpu_us"] if base else None)
            results.add(scen, f"{scpu}, {who}", r["server_cpu_us"], base["server_cpu_us"] if base else None)
    for r in out["failover"]["all"]:
        results.add(scen, fail, r["failover_s"])
        results.add(scen, take, r["takeover_s"])


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="scripts/bench_cluster.py")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--actors", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-copy", action="store_true", help="[snapshots] cluster_copy = false in every router")
    ap.add_argument("--only", choices=("catchup", "failover"), help="one half of the scenario")
    ap.add_argument("--lease", default="10s", help="failover: [router] lease (default 10s)")
    ap.add_argument("--renew", default="3s", help="failover: [router] lease_renew_every (default 3s)")
    args = ap.parse_args()
    # SIGTERM as Ctrl-C: the servers and routers started here are stopped on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    global SNAPSHOTS_EXTRA, ONLY, FAILOVER_LEASE
    SNAPSHOTS_EXTRA = "cluster_copy = false\n" if args.no_copy else ""
    ONLY = args.only
    FAILOVER_LEASE = (args.lease, args.renew)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result = anyio.run(run, args.events, args.actors, args.runs, progress)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
