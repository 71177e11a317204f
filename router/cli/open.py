"""`router open`: the exceptions in force now, from every partition (CONTRACT 5.1), as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Final

from contracts.events import KINDS
from contracts.rules import RULES
from router.cli.client import ClientError, connect
from router.cli.common import EXIT_OK, UsageError, run_async
from router.engine.open_gather import DEFAULT_WAIT_S, BadFilter, GatherError, gather_open
from router.engine.open_query import DEFAULT_LIMIT, MAX_LIMIT, SEVERITIES

_COLUMNS: Final = ("SEVERITY", "KIND", "KEY", "RULE", "LOCATION", "VALUE", "THRESHOLD", "DETECTED", "MESSAGE")


def add_parser(sub: Any, client: argparse.ArgumentParser, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "open",
        parents=[client],
        formatter_class=fmt,
        help="list the exceptions open now (every partition)",
        description=(
            "The exceptions in force now: raised, not cleared, of entities not finished (a delivered "
            "shipment's and an ended campaign's leave). Asked on router.exceptions.open and gathered "
            "from every router instance until every partition answered; sorted by kind, key, rule, "
            "location. Filters match exactly."
        ),
        epilog=(
            "Examples:\n  router open\n  router open --kind sku --severity critical\n"
            "  router open --rule stockout --location BLR-DS-4\n  router open --key SHP-1042 --json\n"
            "  router open --limit 0 --json > open.json      # everything, in one JSON reply"
        ),
    )
    p.add_argument("--kind", choices=KINDS, help="sku, shipment or campaign")
    p.add_argument("--rule", choices=[r.name for r in RULES], metavar="RULE", help="a rule, e.g. stockout")
    p.add_argument("--key", help="one entity's key")
    p.add_argument("--location", help="one location (location-scoped rules)")
    p.add_argument("--severity", choices=SEVERITIES, help="critical or warning")
    p.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
        help=f"show at most N ({DEFAULT_LIMIT}; 0 = all, fetched in pages of {MAX_LIMIT})",
    )
    p.add_argument("--after", metavar="CURSOR", help="page on after a previous reply's `next`")
    p.add_argument("--json", action="store_true", help="print the reply (CONTRACT 5.1) as JSON")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_WAIT_S, metavar="S",
        help=f"seconds to wait for every partition to answer ({DEFAULT_WAIT_S:g})",
    )
    p.set_defaults(func=cmd_open)


def cmd_open(args: argparse.Namespace) -> int:
    from router.cli.commands import client_setup

    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: give 0 (all) or a positive number")
    cfg, server = client_setup(args)
    filters = {k: getattr(args, k) for k in ("kind", "rule", "key", "location", "severity") if getattr(args, k)}

    async def ask() -> dict[str, Any]:
        async with connect(server, cfg=cfg) as nc:
            try:
                return await collect(nc, filters, args.limit, args.after, args.timeout)
            except BadFilter as exc:
                raise UsageError(str(exc)) from None
            except GatherError as exc:
                raise ClientError(str(exc)) from None

    reply = run_async(ask)
    if args.json:
        print(json.dumps(reply, ensure_ascii=False))
    else:
        print_table(reply, sys.stdout.isatty())
    return EXIT_OK


async def collect(nc: Any, filters: dict[str, str], limit: int, after: str | None, wait_s: float) -> dict[str, Any]:
    """Pages of up to MAX_LIMIT until `limit` entries (0: all) or the end, as one reply."""
    entries: list[dict[str, Any]] = []
    reply: dict[str, Any] = {}
    while True:
        want = MAX_LIMIT if limit == 0 else min(MAX_LIMIT, limit - len(entries))
        req: dict[str, Any] = dict(filters, limit=want)
        if after:
            req["after"] = after
        reply = await gather_open(nc, req, wait_s=wait_s)
        entries += reply["open"]
        after = reply["next"]
        if after is None or (limit and len(entries) >= limit):
            break
    return dict(reply, open=entries)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


def _seconds(ts: str) -> str:
    """An RFC 3339 time to the second (the table's width; --json keeps it whole)."""
    head, dot, _rest = ts.partition(".")
    return head + "Z" if dot else ts


def print_table(reply: dict[str, Any], color: bool = False) -> None:
    rows = [
        [
            e["severity"], e["kind"], e["key"], e["rule"], _cell(e["location"]), _cell(e["value"]),
            _cell(e["threshold"]), _seconds(e["detected_at"]), e["message"],
        ]
        for e in reply["open"]
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_COLUMNS[:-1])]
    print("  ".join(h.ljust(w) for h, w in zip(_COLUMNS, widths, strict=False)) + "  " + _COLUMNS[-1])
    for r in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
        if color and r[0] == "critical":
            line = f"\x1b[31;1m{line}\x1b[0m"
        print(line)
    parts = reply["partitions"]
    shown = len(rows)
    total = reply["total"]
    tail = f"{total} open" + (f", {shown} shown" if shown != total else "")
    count = reply["partition_count"]
    print(f"{tail} ({'partition' if count == 1 else 'partitions'} {_ranges(parts)}: all {count} answered)")
    if reply.get("next"):
        print(f"more: add --after {reply['next']}")


def _ranges(parts: list[int]) -> str:
    if not parts:
        return "none"
    out: list[str] = []
    start = prev = parts[0]
    for p in [*parts[1:], None]:
        if p is not None and p == prev + 1:
            prev = p
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if p is not None:
            start = prev = p
    return ",".join(out)
