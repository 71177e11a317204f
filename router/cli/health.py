"""`router health`: is the router running and healthy? From `router.health`, else `<data>/health.json`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import msgspec

from contracts.config import Config, load_config
from router import health as model
from router.cli.client import ClientError, connect, resolve_server
from router.cli.common import EXIT_FAILURE, EXIT_OK, run_async


async def _ask(cfg: Config, server: str | None, wait_s: float) -> tuple[model.Health, str] | None:
    """The live `router.health` reply and the server's URL, or None when no router answers."""
    from nats.errors import Error as NatsError

    try:
        url = resolve_server(server, cfg)
        async with connect(url, cfg=cfg, connect_timeout=min(wait_s, 2.0)) as nc:
            reply = await nc.request("router.health", b"", timeout=wait_s)
    except (ClientError, NatsError, TimeoutError):
        return None
    try:
        return model.decode(bytes(reply.data)), str(url)
    except msgspec.DecodeError:
        return None


def last_report(cfg: Config) -> str:
    """What `<data>/health.json` says about the router, for an error message; "" when there is none."""
    found = model.read_file(cfg.data_dir)
    if found is None:
        return ""
    return f"the router is {model.verdict(found).reason} (per {model.file_path(cfg.data_dir)})"


def describe(report: model.Health) -> list[str]:
    """A few lines for people: connection, partitions, disk."""
    lines = [
        f"  status {report.status}, nats {report.nats}, ready {'yes' if report.ready else 'no'}, pid {report.pid}, "
        f"up {report.uptime_s:,.0f}s, reported {report.updated_at}",
    ]
    if report.partition_count:
        lines.append(
            f"  instance {report.instance or '?'} owns partitions {_ranges(report.owned)} of {report.partition_count}"
        )
        others = {i: ps for i, ps in report.instances.items() if i != report.instance}
        if others:
            lines.append("  other instances: " + "; ".join(f"{i} owns {_ranges(ps)}" for i, ps in others.items()))
    for p in report.partitions:
        lines.append(
            f"  partition {p.partition}: applied {p.applied_seq:,}, lag {p.lag:,}, resident {p.resident_actors:,}, "
            f"events {p.processed:,}, exceptions {p.exceptions:,}, dead letters {p.dead_lettered:,}, "
            f"last snapshot {p.last_snapshot_age_s:.0f}s ago"
        )
    d = report.disk
    free = f"{d.free_bytes / 2**30:,.1f} GiB free of {(d.total_bytes or 0) / 2**30:,.1f}" if d.free_bytes else "?"
    lines.append(f"  disk {d.status}: {free} ({d.path})")
    return lines


def _ranges(partitions: list[int]) -> str:
    """[0, 1, 2, 5] as "0-2, 5"; "none" for []."""
    out: list[str] = []
    for p in sorted(partitions):
        if out and "-" not in out[-1].split(",")[-1] and int(out[-1]) == p - 1:
            out[-1] = f"{out[-1]}-{p}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == p - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ", ".join(out) or "none"


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the router runs and is healthy, 1 otherwise (stopped, gone, stale, unhealthy)."""
    from router.logs import configure_logging

    cfg = load_config(args.config)
    configure_logging("warning", "auto")
    live = None if args.file else run_async(_ask, cfg, args.server, args.timeout)
    if live is not None:
        report, source = live[0], f"router.health on {live[1]}"
        verdict = model.verdict(report, alive=True)  # it answered just now: it runs, wherever it is
    else:
        path = model.file_path(cfg.data_dir)
        found = model.read_file(cfg.data_dir)
        if found is None:
            if args.json:
                print(json.dumps({"running": False, "healthy": False, "reason": "no report", "report": None}))
            else:
                print(f"router: not running: no router answered on router.health, and no report at {path}")
            return EXIT_FAILURE
        report, source = found, str(path)
        verdict = model.verdict(report)
    if args.json:
        doc: dict[str, Any] = {
            "source": source,
            "running": verdict.running,
            "healthy": verdict.healthy,
            "reason": verdict.reason,
            "report": msgspec.to_builtins(report),
        }
        print(json.dumps(doc, indent=1))
    else:
        print(f"router: {verdict.reason} (from {source})")
        if verdict.running:
            print("\n".join(describe(report)))
    sys.stdout.flush()
    return EXIT_OK if verdict.healthy else EXIT_FAILURE


def add_parser(sub: Any, client: argparse.ArgumentParser, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "health",
        parents=[client],
        formatter_class=formatter,
        help="is the router running and healthy? (exit 0 if so)",
        description=(
            "Ask the running router (request on router.health); when none answers, read the report it "
            "writes every second to <data>/health.json. A report is trusted only while its writer's pid "
            f"is alive and it is fresh (refreshed within {model.STALE_INTERVALS} refresh intervals); a "
            "graceful stop leaves `stopped`. Exit 0 when running, connected and caught up; 1 otherwise."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the verdict and the report as JSON")
    p.add_argument("--file", action="store_true", help="read only <data>/health.json, do not ask over NATS")
    p.add_argument("--timeout", type=float, default=1.0, metavar="S", help="seconds to wait for a reply (1)")
    p.set_defaults(func=cmd_health)
