"""The console's cost (issue 12): the load of the live page's users, as a child process of the benchmark.

`console-load --base URL --clients 20 --scrape-every 1` opens `--clients` server-sent-event
streams on `URL/feed` (reading everything, as a browser would) and scrapes `URL/metrics`
every `--scrape-every` seconds, until the parent says stop (a line on stdin). It says
`{"event": "ready"}` once every stream has its first tick, and at the end
`{"event": "stopped", ...}` with what it received. It runs in a process of its own, so its
CPU is not the router's (on a 2-core machine it still competes for the CPUs, as a real
browser on the same machine would).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import httpx


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def console_load(base: str, clients: int, scrape_every: float) -> None:
    stats: dict[str, Any] = {"feed_bytes": 0, "raise_or_clear": 0, "ticks": 0, "scrapes": 0, "scrape_errors": 0,
                             "feed_errors": 0, "scrape_ms_max": 0.0}
    connected = 0
    all_connected = anyio.Event()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30, read=None), limits=limits) as client:

        async def feed() -> None:
            nonlocal connected
            first = True
            try:
                async with client.stream("GET", "/feed") as r:
                    r.raise_for_status()
                    async for chunk in r.aiter_raw():
                        stats["feed_bytes"] += len(chunk)
                        stats["raise_or_clear"] += chunk.count(b"event: raise\n") + chunk.count(b"event: clear\n")
                        ticks = chunk.count(b"event: tick\n")
                        stats["ticks"] += ticks
                        if first and ticks:
                            first = False
                            connected += 1
                            if connected == clients:
                                all_connected.set()
            except Exception as exc:
                stats["feed_errors"] += 1
                stats["feed_error"] = repr(exc)

        async def scrape() -> None:
            await all_connected.wait()
            next_at = time.monotonic()
            while True:
                t0 = time.monotonic()
                try:
                    r = await client.get("/metrics")
                    r.raise_for_status()
                    stats["scrapes"] += 1
                except Exception as exc:
                    stats["scrape_errors"] += 1
                    stats["scrape_error"] = repr(exc)
                stats["scrape_ms_max"] = max(stats["scrape_ms_max"], (time.monotonic() - t0) * 1000)
                next_at += scrape_every
                await anyio.sleep(max(0.0, next_at - time.monotonic()))

        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(feed)
            with anyio.fail_after(60):
                await all_connected.wait()
            emit(event="ready", clients=connected)
            tg.start_soon(scrape)
            await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            tg.cancel_scope.cancel()
    emit(event="stopped", **stats)


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--scrape-every", type=float, default=1.0)
    args = ap.parse_args(argv)
    anyio.run(console_load, args.base, args.clients, args.scrape_every, backend="asyncio")


if __name__ == "__main__":
    main(sys.argv[1:])
