"""`router check-store`, `router backup` and `router restore`: the snapshot store as a file.

None of them talks to the router: `check-store` and `backup` open the file on connections of
their own (a running router goes on meanwhile), `restore` refuses while the router runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from contracts.config import load_config
from router.cli.common import EXIT_FAILURE, EXIT_OK, UsageError, err, run_async
from snapshots import Store, StoreDamagedError, StoreError
from snapshots.backup import Copied, backup, restore


def _mib(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


def _marks_line(marks: dict[int, tuple[int, int]]) -> str:
    if not marks:
        return "partitions: none yet (nothing applied)"
    return "; ".join(f"partition {p}: applied through {a:,}, effects through {e:,}" for p, (a, e) in marks.items())


async def _check(path: Path) -> tuple[list[str], dict[str, Any]]:
    try:
        store = await Store.open(path)
    except StoreDamagedError as exc:
        return [exc.reason], {}
    try:
        problems = await store.integrity_check()
        stats = await store.stats()
    finally:
        await store.close()
    return problems, {
        "actors": stats.actors,
        "timers": stats.timers,
        "partitions": {p: (m.applied_seq, m.effects_seq) for p, m in stats.partitions.items()},
        "file_bytes": stats.file_bytes,
        "wal_bytes": stats.wal_bytes,
    }


def cmd_check_store(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else load_config(args.config).snapshot_path
    if not path.is_file():
        raise UsageError(f"no snapshot store at {path}")
    try:
        problems, stats = run_async(_check, path)
    except StoreError as exc:
        err(str(exc))
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({"path": str(path), "ok": not problems, "problems": problems, **stats}, indent=2))
    else:
        print(f"store: {path}")
        if stats:
            print(f"size: {_mib(stats['file_bytes'])} (write-ahead log {_mib(stats['wal_bytes'])})")
            print(f"rows: {stats['actors']:,} actors, {stats['timers']:,} timers")
            print(_marks_line(stats["partitions"]))
        print("integrity: ok" if not problems else f"integrity: DAMAGED ({len(problems)} problems)")
        for line in problems:
            print(f"  {line}")
    return EXIT_OK if not problems else EXIT_FAILURE


def _print_copy(what: str, copied: Copied) -> None:
    print(f"{what}: {copied.path} ({_mib(copied.bytes)}, {copied.actors:,} actors, {copied.timers:,} timers)")
    print(_marks_line(copied.marks))


def cmd_backup(args: argparse.Namespace) -> int:
    source = Path(args.store) if args.store else load_config(args.config).snapshot_path
    dest = Path(args.path)
    try:
        copied = backup(source, dest)
    except StoreError as exc:
        err(str(exc))
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(msgspec.to_builtins(copied), indent=2))
    else:
        _print_copy("backup", copied)
        print(f"took {copied.seconds:.2f} s; restore with: router restore {dest}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    target = Path(args.store) if args.store else cfg.snapshot_path
    try:
        copied, replaced = restore(Path(args.backup), target)
    except StoreError as exc:
        err(str(exc))
        return EXIT_FAILURE
    _print_copy("restored", copied)
    if replaced is not None:
        print(f"the store it replaced: {replaced}")
    first = min((a for a, _e in copied.marks.values()), default=0) + 1
    print(f"start the router: it replays {cfg.streams.events} from sequence {first:,} on", file=sys.stderr)
    return EXIT_OK


def add_store_commands(sub: Any, config_opt: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "check-store",
        parents=[config_opt],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="check the snapshot store file and print what it holds",
        description=(
            "Run SQLite's integrity check and the store's own checks on the snapshot store (or the "
            "store or backup at PATH) and print its size, rows and the partitions' marks. Safe while "
            "the router runs (it reads on connections of its own). Exit 0 when sound, 1 when damaged."
        ),
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="a store or backup (default: [snapshots] path)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_check_store)

    p = sub.add_parser(
        "backup",
        parents=[config_opt],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="copy the snapshot store, consistently, while the router runs",
        description=(
            "Write a consistent copy of the snapshot store to PATH (SQLite's VACUUM INTO on a read-only "
            "connection of its own: one committed snapshot of actors, timers and marks) while the router "
            "runs, check it and move it into place. PATH must not exist. Once EVENTS has dropped old "
            "events (retention), a backup is the only way back from a lost store."
        ),
        epilog="Example:\n  router backup /var/backups/router-$(date -u +%Y%m%dT%H%M%SZ).db",
    )
    p.add_argument("path", metavar="PATH", help="where to write the copy (must not exist)")
    p.add_argument("--store", metavar="STORE", help="the store to copy (default: [snapshots] path)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "restore",
        parents=[config_opt],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="put a backup in place of the snapshot store (the router stopped)",
        description=(
            "Check BACKUP, move the current store (with its -wal and -shm) aside to "
            "<name>.replaced-<time>, and put BACKUP in its place. Refuses while the router runs. "
            "The next `router run` resumes from the backup's marks and replays EVENTS from there, "
            "if EVENTS still holds those events (else it says so and does not start)."
        ),
    )
    p.add_argument("backup", metavar="BACKUP", help="a file written by `router backup`")
    p.add_argument("--store", metavar="STORE", help="the store to replace (default: [snapshots] path)")
    p.set_defaults(func=cmd_restore)
