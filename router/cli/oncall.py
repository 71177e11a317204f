"""`router oncall`: run the on-call sink, or show what it sent, what is pending and what failed."""

from __future__ import annotations

import argparse
import json
from typing import Any

from contracts.config import load_config
from router.cli.common import EXIT_FAILURE, EXIT_OK, run_async, single_exception, until_interrupted


def cmd_oncall(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _status(args)
    import structlog

    from router.errors import FatalError
    from router.logs import configure_logging
    from router.oncall.sink import run_sink
    from router.secrets import resolve_all

    cfg = load_config(args.config)
    resolve_all(cfg)
    configure_logging(args.log_level or cfg.log.level, args.log_format or cfg.log.format)

    async def main() -> None:
        await until_interrupted(lambda: run_sink(cfg))

    try:
        run_async(main)
    except BaseException as exc:
        failure = single_exception(exc)
        if isinstance(failure, FatalError):
            structlog.get_logger().error("oncall_failed", error=str(failure))
            return EXIT_FAILURE
        raise
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from router.cli.client import ClientError, connect, resolve_server
    from router.oncall.status import STATUS_SUBJECT, format_status, read_status

    cfg = load_config(args.config)
    data: dict[str, Any] | None = None
    source = ""
    try:

        async def ask() -> dict[str, Any] | None:
            async with connect(resolve_server(args.server, cfg)) as nc:
                reply = await nc.request(STATUS_SUBJECT, b"", timeout=2.0)
                answer = json.loads(reply.data)
                return answer if isinstance(answer, dict) else None

        data = run_async(ask)
        source = STATUS_SUBJECT
    except (ClientError, Exception):
        data = None
    if data is None:
        data = read_status(cfg)
        source = "the status file (no sink answered)"
    if data is None:
        print("no on-call sink answered and none has written a status file: is `router oncall` running?")
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"# from {source}")
        print(format_status(data))
    return EXIT_OK


def add_parser(sub: Any, client: argparse.ArgumentParser, formatter: Any) -> None:
    p = sub.add_parser(
        "oncall",
        parents=[client],
        formatter_class=formatter,
        help="run the on-call sink (Alertmanager, PagerDuty, webhook) or show its status",
        description=(
            "Run the on-call sink: durable consumers on EXCEPTIONS turn raises and clears into alerts "
            "in Alertmanager, PagerDuty incidents and signed webhook posts, as [oncall] in the config "
            "says (it also runs inside `router run` when [oncall] names a target and in_router is "
            "true). `status` shows what each target was sent, what is pending and what failed."
        ),
        epilog="Examples:\n  router oncall --config config.toml\n  router oncall status --config config.toml",
    )
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run", help="run (default) or status")
    p.add_argument("--json", action="store_true", help="status: print the JSON")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides [log] level")
    p.add_argument("--log-format", choices=["auto", "console", "json"], help="overrides [log] format")
    p.set_defaults(func=cmd_oncall)
