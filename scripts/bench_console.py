"""The console's cost (issue 12): the load of the live page's users, as a child process of the benchmark.

`console-load --base URL --clients 20 --scrape-every 1` opens `--clients` server-sent-event
streams on `URL/feed` (reading everything, as a browser would) and scrapes `URL/metrics`
every `--scrape-every` seconds, until the parent says stop (a line on stdin). It says
`{"event": "ready"}` once every stream has its first tick, and at the end
`{"event": "stopped", ...}` with what it received. The feed clients read plain sockets and
only count (a browser parses in native code; an HTTP library in Python would take CPU from
the router on a small machine). It runs in a process of its own, so its
CPU is not the router's (on a 2-core machine it still competes for the CPUs, as a real
browser on the same machine would).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import anyio
import httpx


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def _feed(host: str, port: int, stats: dict[str, Any], on_first_tick: Any) -> None:
    """One feed client on a plain socket (no HTTP library: a browser parses in native code, and
    this process shares the CPUs with the router). Counts bytes and events; never slows down."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET /feed HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:80].decode(errors="replace"))
        tail = b""
        first = True
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise RuntimeError("the feed ended")
            stats["feed_bytes"] += len(chunk)
            # Events split across reads are counted once: search the last bytes of the previous read too.
            text = tail + chunk
            stats["raise_or_clear"] += text.count(b"event: raise\n") + text.count(b"event: clear\n")
            ticks = text.count(b"event: tick\n")
            stats["ticks"] += ticks
            tail = chunk[-16:]
            tail = tail[tail.rfind(b"\n") + 1:] if b"\n" in tail else tail
            if first and ticks:
                first = False
                on_first_tick()
    finally:
        writer.close()


async def console_load(base: str, clients: int, scrape_every: float) -> None:
    stats: dict[str, Any] = {"feed_bytes": 0, "raise_or_clear": 0, "ticks": 0, "scrapes": 0, "scrape_errors": 0,
                             "feed_errors": 0, "scrape_ms_max": 0.0}
    connected = 0
    all_connected = anyio.Event()
    host, port = base.removeprefix("http://").rstrip("/").rsplit(":", 1)

    def one_more() -> None:
        nonlocal connected
        connected += 1
        if connected == clients:
            all_connected.set()

    async def feed() -> None:
        try:
            await _feed(host, int(port), stats, one_more)
        except Exception as exc:
            stats["feed_errors"] += 1
            stats["feed_error"] = repr(exc)

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def scrape() -> None:
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
