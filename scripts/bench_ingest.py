"""The HTTP ingestion benchmark: `POST /events` against core-NATS publishes in the same run.

`scripts/bench --only ingest` runs it as a scenario of the benchmark (scripts/bench.py); it
also runs alone: `.venv/bin/python scripts/bench_ingest.py [--runs 3] [--events 4000]`.

One `router run` process (the real CLI path, HTTP on a free loopback port) on a nats-server
of its own. Per run, the same count of a brand's realistic events (bench_lib.brand_day) is
stored four ways, each timed from the first send until the last event is stored:

- baseline: core publishes into EVENTS as `router pub` (and `nats pub`) send them, no headers
  (at least 40,000 events, so that the fastest way lasts long enough to time);
- HTTP sequential: one keep-alive connection, one `POST /events/<kind>/<key>` at a time;
- HTTP concurrent: 32 keep-alive connections posting at once;
- HTTP batch: `POST /events` with NDJSON of `batch` lines, one request at a time.

Each event over HTTP carries an `Idempotency-Key` (so the KV record is part of the cost). The
client is a minimal HTTP/1.1 writer on raw sockets, so that the client's own CPU (it shares the
machine's cores with the router and nats-server) costs as little as it can. Figures: events/s
and the ratio to the baseline of the same run; latency p50/p99 per request (a batch request
for the batch form). The router applies every event meanwhile, as it would in production.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import ROOT, Server, brand_day, publish_core, stream_last_seq

CLIENTS = 32
KEYS = True  # every event with an Idempotency-Key (--no-keys: none, to see what the record costs)


def _key_header(tag: str, i: int) -> bytes:
    return b"Idempotency-Key: %s-%d\r\n" % (tag.encode(), i) if KEYS else b""
Progress = Callable[[str], None]


def router_exe() -> str:
    exe = Path(sys.executable).with_name("router")
    return str(exe) if exe.exists() else "router"


class Conn:
    """One keep-alive HTTP/1.1 connection: send a POST, read the status and body."""

    def __init__(self, stream: SocketStream, host: str) -> None:
        self.stream = stream
        self.rx = BufferedByteReceiveStream(stream)
        self.host = host.encode()

    @classmethod
    async def open(cls, base: str) -> Conn:
        hostport = base.split("://", 1)[1]
        host, port = hostport.rsplit(":", 1)
        return cls(await anyio.connect_tcp(host, int(port)), hostport)

    async def post(self, path: str, body: bytes, headers: bytes = b"") -> tuple[int, bytes]:
        await self.stream.send(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), self.host, len(body), headers, body)
        )
        head = await self.rx.receive_until(b"\r\n\r\n", 65536)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.rx.receive_exactly(length) if length else b""

    async def aclose(self) -> None:
        await self.stream.aclose()


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def wait_stored(url: str, target: int, within: float = 300) -> None:
    with anyio.fail_after(within):
        while await stream_last_seq(url) < target:  # noqa: ASYNC110 (polls the server)
            await anyio.sleep(0.01)


def _path(subject: str) -> str:
    _, kind, key = subject.split(".", 2)
    return f"/events/{kind}/{key}"


async def http_sequential(base: str, events: list[tuple[str, bytes]], tag: str) -> list[float]:
    conn = await Conn.open(base)
    lat = []
    try:
        for i, (subject, data) in enumerate(events):
            t = time.perf_counter()
            status, body = await conn.post(_path(subject), data, _key_header(tag, i))
            lat.append(time.perf_counter() - t)
            if status != 202:
                raise RuntimeError(f"POST {subject}: {status} {body[:200]!r}")
    finally:
        await conn.aclose()
    return lat


async def http_concurrent(base: str, events: list[tuple[str, bytes]], tag: str, clients: int) -> list[float]:
    lat: list[float] = []
    conns = [await Conn.open(base) for _ in range(clients)]

    async def worker(c: int) -> None:
        conn = conns[c]
        for i in range(c, len(events), clients):
            subject, data = events[i]
            t = time.perf_counter()
            status, body = await conn.post(_path(subject), data, _key_header(tag, i))
            lat.append(time.perf_counter() - t)
            if status != 202:
                raise RuntimeError(f"POST {subject}: {status} {body[:200]!r}")

    try:
        async with anyio.create_task_group() as tg:
            for c in range(clients):
                tg.start_soon(worker, c)
    finally:
        for conn in conns:
            await conn.aclose()
    return lat


async def http_batch(base: str, events: list[tuple[str, bytes]], tag: str, size: int) -> list[float]:
    conn = await Conn.open(base)
    lat = []
    try:
        for start in range(0, len(events), size):
            lines = []
            for i in range(start, min(start + size, len(events))):
                subject, data = events[i]
                _, kind, key = subject.split(".", 2)
                idem = b'"idempotency_key":"%s-%d",' % (tag.encode(), i) if KEYS else b""
                lines.append(b'{"kind":"%s","key":"%s",%s"event":%s}' % (kind.encode(), key.encode(), idem, data))
            t = time.perf_counter()
            status, body = await conn.post("/events", b"\n".join(lines))
            lat.append(time.perf_counter() - t)
            if status != 200 or body.count(b'"status":202') != len(lines):
                raise RuntimeError(f"POST /events: {status} {body[:300]!r}")
    finally:
        await conn.aclose()
    return lat


async def measure(url: str, base: str, n: int, batch: int, run: int, progress: Progress) -> dict[str, float]:
    """One run: the four ways, each over `n` fresh events; events/s, ratios and latencies (ms)."""
    out: dict[str, float] = {}
    t0_us = time.time_ns() // 1000 - 3_600_000_000

    def fresh(seed: int) -> list[tuple[str, bytes]]:
        return list(brand_day(n, skus=2_000, shipments=1_000, campaigns=20, seed=seed, t0_us=t0_us))

    start = await stream_last_seq(url)
    # The baseline is two orders of magnitude faster: more events, so that it lasts long enough to time.
    evs = list(brand_day(max(n, 40_000), skus=2_000, shipments=1_000, campaigns=20, seed=1000 + run, t0_us=t0_us))
    t = time.perf_counter()
    last = await publish_core(url, evs, chunk=2_000)
    await wait_stored(url, start + len(evs))
    out["baseline"] = len(evs) / (time.perf_counter() - t)
    progress(f"  run {run + 1}: core publishes {out['baseline']:,.0f} events/s (stored through {last})")

    ways: list[tuple[str, Callable[[list[tuple[str, bytes]], str], Any]]] = [
        ("sequential", lambda e, tag: http_sequential(base, e, tag)),
        ("concurrent", lambda e, tag: http_concurrent(base, e, tag, CLIENTS)),
        ("batch", lambda e, tag: http_batch(base, e, tag, batch)),
    ]
    for k, (name, way) in enumerate(ways):
        evs = fresh(2000 + 10 * run + k)
        start = await stream_last_seq(url)
        t = time.perf_counter()
        lat = await way(evs, f"r{run}{name[0]}")
        await wait_stored(url, start + len(evs))
        out[name] = len(evs) / (time.perf_counter() - t)
        out[f"{name}_p50_ms"] = pct(lat, 0.50) * 1000
        out[f"{name}_p99_ms"] = pct(lat, 0.99) * 1000
        progress(f"  run {run + 1}: HTTP {name} {out[name]:,.0f} events/s "
                 f"({out[name] / out['baseline']:.3f} of core), p50 {out[f'{name}_p50_ms']:.2f} ms, "
                 f"p99 {out[f'{name}_p99_ms']:.2f} ms")
    return out


def start_router(work: Path, url: str) -> subprocess.Popen[bytes]:
    """`router run` with HTTP on a free loopback port; its log in `work`."""
    config = work / "config.toml"
    config.write_text(
        f'[nats]\nurl = "{url}"\n[snapshots]\npath = "{work / "router.db"}"\n'
        '[log]\nlevel = "warning"\nformat = "json"\n[http]\nlisten = "127.0.0.1:0"\n'
    )
    with open(work / "router.log", "ab") as log:
        return subprocess.Popen([router_exe(), "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(work))


@contextlib.asynccontextmanager
async def running_router(work: Path, url: str) -> AsyncIterator[str]:
    proc = start_router(work, url)
    try:
        url_file = work / "http.url"
        with anyio.fail_after(60):
            while not url_file.exists() or not url_file.read_text().strip():
                if proc.poll() is not None:
                    raise RuntimeError(f"router exited: {(work / 'router.log').read_text()[-2000:]}")
                await anyio.sleep(0.05)
        yield url_file.read_text().strip()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def run_ingest(runs: int, n: int, batch: int, progress: Progress, work: Path | None = None) -> list[dict[str, float]]:
    """`runs` runs of `measure` on one nats-server and one router; the per-run figures."""
    own = work is None
    work = work or Path(tempfile.mkdtemp(prefix="ops-router-bench-ingest-"))
    results = []
    try:
        with Server() as srv:
            async with running_router(work, srv.url) as base:
                progress(f"router serving HTTP at {base}; {n} events per way, batches of {batch}, {CLIENTS} clients")
                await http_sequential(base, list(brand_day(200, seed=7)), "warm")  # first requests, KV bucket
                for run in range(runs):
                    results.append(await measure(srv.url, base, n, batch, run, progress))
    finally:
        if own:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return results


def summarize(results: list[dict[str, float]]) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    ratios = {w: statistics.median(r[w] / r["baseline"] for r in results) for w in ("sequential", "concurrent", "batch")}
    return {"median": med, "ratio": ratios, "runs": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench_ingest.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=4000, help="events per way and run (default 4000)")
    ap.add_argument("--batch", type=int, default=500, help="lines per batch request (default 500)")
    ap.add_argument("--no-keys", action="store_true", help="send no Idempotency-Key (the record's cost)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args(argv)

    def progress(text: str) -> None:
        print(f"[load {os.getloadavg()[0]:4.2f}] {text}", flush=True)

    global KEYS
    KEYS = not args.no_keys
    results = anyio.run(run_ingest, args.runs, args.events, args.batch, progress, backend="asyncio",
                        backend_options={"use_uvloop": True})
    s = summarize(results)
    med, ratio = s["median"], s["ratio"]
    keys = "with" if KEYS else "without"
    print(f"\nHTTP ingestion, medians of {args.runs} runs ({args.events} events per way and run, {keys} "
          "Idempotency-Key):")
    print(f"  core publishes (router pub): {med['baseline']:>9,.0f} events/s")
    for w, label in (("sequential", "HTTP sequential"), ("concurrent", f"HTTP {CLIENTS} clients"),
                     ("batch", f"HTTP batch of {args.batch}")):
        print(f"  {label:<27} {med[w]:>9,.0f} events/s  ratio {ratio[w]:.3f}  "
              f"p50 {med[w + '_p50_ms']:.2f} ms  p99 {med[w + '_p99_ms']:.2f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ingest-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps({"args": vars(args), "load": os.getloadavg(), **s}, indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
