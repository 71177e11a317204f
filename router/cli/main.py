"""The `router` command: run the daemon, check a config, and talk to a running router.

Exit codes: 0 done, 1 runtime failure (no server, no responder, the daemon failed),
2 bad usage or config (`config error: <key.path>: ...` on stderr), 130 interrupted while
starting. The subcommands that talk to a running router are in `router.cli.commands`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from contracts.config import Config, ConfigError, load_config
from contracts.events import KINDS, json_schema
from contracts.secrets import redact
from router import __version__
from router.cli.client import ClientError
from router.cli.commands import cmd_pub, cmd_simulate, cmd_state, cmd_watch, rate_arg, share_arg
from router.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    err,
    run_async,
    single_exception,
)
from router.cli.dlq import cmd_dlq, dead_letter_number
from router.cli.health import add_parser as add_health_parser
from router.cli.oncall import add_parser as add_oncall_parser
from router.cli.open import add_parser as add_open_parser
from router.cli.redrive import field_setting, since_time
from router.cli.repartition import add_parser as add_repartition_parser
from router.cli.store import add_store_commands

# --- run, check-config, schema ---------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from router.engine.daemon import Service, run, wall_clock_us
    from router.http.server import http_service
    from router.jetstream.embedded import EmbeddedServerError
    from router.logs import configure_logging
    from router.oncall.sink import oncall_service
    from router.secrets import resolve_all

    cfg = load_config(args.config)
    resolve_all(cfg)  # a secret's file or variable missing: a config error now, not at connect
    configure_logging(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    # Beside the engine, composed here (the engine imports none of them).
    services: list[Service] = [s for s in (http_service(cfg), oncall_service(cfg)) if s is not None]
    try:
        return int(run_async(run, cfg, wall_clock_us, services))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:
        failure = single_exception(exc)
        if isinstance(failure, EmbeddedServerError):
            structlog.get_logger().error("router_failed", error=str(failure))
            return EXIT_FAILURE
        raise




def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (a [[...]] entry inside a list)
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def effective_config(cfg: Config) -> dict[str, Any]:
    """The config as plain data, defaults filled in, secrets masked (`contracts.secrets.redact`)."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    data.pop("__base_dir__", None)
    shown: dict[str, Any] = redact(data)
    return shown


def config_toml(cfg: Config) -> str:
    """TOML text of the effective config (unset optional keys shown as comments)."""
    lines: list[str] = []

    def section(name: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{name}]")
            for k, v in scalars.items():
                lines.append(f"# {k} (not set)" if v is None else f"{k} = {_toml_value(v)}")
            lines.append("")
        for k, v in table.items():
            if isinstance(v, dict):
                section(f"{name}.{k}", v)

    for name, table in effective_config(cfg).items():
        section(name, table)
    return "\n".join(lines).rstrip() + "\n"


def cmd_check_config(args: argparse.Namespace) -> int:
    from router.secrets import resolve_all

    cfg = load_config(args.config)
    resolve_all(cfg)  # every `_file` and `_env` secret can be read (and is not shown)
    source = args.config or ("config.toml" if os.path.exists("config.toml") else "(built-in defaults)")
    if args.json:
        print(json.dumps(effective_config(cfg), indent=2))
    else:
        print(f"# effective config: {source}, defaults filled in")
        print(f"# snapshots: {cfg.snapshot_path}  data folder: {cfg.data_dir}")
        print(config_toml(cfg), end="")
    print(f"config ok: {source}", file=sys.stderr)
    return EXIT_OK


def _reachable_defs(schema: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The `$defs` entries that `schema` refers to, transitively."""
    out: dict[str, Any] = {}
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name not in out and name in defs:
                    out[name] = defs[name]
                    todo.append(defs[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return dict(sorted(out.items()))


def cmd_schema(args: argparse.Namespace) -> int:
    full = json_schema()
    if args.kind is None:
        doc = full
    else:
        part = full["properties"][args.kind]
        doc = {
            "$schema": full["$schema"],
            "title": f"ops-router {args.kind} events",
            "description": f"Payload of events.{args.kind}.<key>.",
            **part,
            "$defs": _reachable_defs(part, full["$defs"]),
        }
    print(json.dumps(doc, indent=2))
    return EXIT_OK


# --- the parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "ops-router: NATS JetStream events -> per-entity state -> exceptions the moment a "
            "threshold is crossed."
        ),
        epilog=(
            "Try it:\n"
            "  router run                         # embedded nats-server, state in ./data\n"
            "  router watch                       # in a second terminal: exceptions as they fire\n"
            "  router simulate                    # in a third terminal: a brand's day at 200/s\n"
            "  router state sku SERUM-VITC-30     # one entity's live state\n"
            "  router open --severity critical    # what is wrong right now\n"
            "\n"
            "Exit codes: 0 done, 1 runtime failure, 2 bad usage or config."
        ),
    )
    parser.add_argument("--version", action="version", version=f"router (ops-router) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config_opt = argparse.ArgumentParser(add_help=False)
    config_opt.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: ./config.toml when present, else built-in defaults)",
    )
    client = argparse.ArgumentParser(add_help=False, parents=[config_opt])
    client.add_argument(
        "--server",
        metavar="URL",
        help="NATS server URL (default: $NATS_URL, else [nats] url, else the URL a running "
        "router with the embedded server wrote to <data>/nats.url)",
    )

    p = sub.add_parser(
        "run",
        parents=[config_opt],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the router daemon until SIGTERM or Ctrl-C",
        description=(
            "Run the router: consume events.>, keep per-entity state, publish exceptions and dead "
            'letters, answer router.state.<kind>.<key>. With [nats] url = "embedded" it starts the '
            "bundled nats-server on loopback and writes its URL to <data>/nats.url. SIGTERM or "
            "Ctrl-C stops it gracefully (in-flight work finished, final snapshot written)."
        ),
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides [log] level")
    p.add_argument("--log-format", choices=["auto", "console", "json"], help="overrides [log] format")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check-config",
        parents=[config_opt],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="validate a config and print the effective settings",
        description=(
            "Validate a config file without starting anything and print the effective config "
            "(defaults filled in, secrets masked). Exit 0 when valid, 2 with "
            "`config error: <key.path>: ...` when not."
        ),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "pub",
        parents=[client],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="publish an event (validated against the contract first)",
        description=(
            "Publish one event like `nats pub` does (a core publish: payload bytes, no headers unless "
            "given). The payload is checked against the contract first; an event the router would "
            "dead-letter is not sent (exit 2) unless --force."
        ),
        epilog=(
            "Examples:\n"
            '  router pub events.sku.SKU-1 \'{"type":"received","location":"BLR-DS-4","qty":20}\'\n'
            '  router pub events.sku.SKU-{{i}} \'{"type":"counted","location":"DEL-WH-1","on_hand":{{i}}}\' --count 5\n'
            '  echo \'{"type":"delivered"}\' | router pub events.shipment.SHP-9 -'
        ),
    )
    p.add_argument("subject", metavar="SUBJECT", help="events.<kind>.<key>")
    p.add_argument("payload", metavar="JSON", nargs="?", help="the event as JSON ('-' or absent: read stdin)")
    p.add_argument(
        "--header", "-H", metavar="K:V", action="append", default=[], help="add a header (repeatable)"
    )
    p.add_argument(
        "--msg-id", metavar="ID", help="Nats-Msg-Id header (the stream's duplicate window drops repeats)"
    )
    p.add_argument(
        "--count",
        type=int,
        default=1,
        metavar="N",
        help="publish N messages; {{i}} in the subject, payload, headers and msg id becomes 1..N",
    )
    p.add_argument(
        "--force", action="store_true", help="publish even when the event is not valid (to test dead letters)"
    )
    p.add_argument(
        "--js", action="store_true", help="JetStream publish: wait for the stream's ack and print its seq"
    )
    p.set_defaults(func=cmd_pub)

    p = sub.add_parser(
        "state",
        parents=[client],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="show one entity's live state",
        description="Ask the running router for one entity's state (request on router.state.<kind>.<key>).",
    )
    p.add_argument("kind", choices=KINDS, metavar="KIND", help=f"one of {', '.join(KINDS)}")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--raw", action="store_true", help="print the reply exactly as received")
    p.add_argument(
        "--timeout", type=float, default=2.0, metavar="S", help="seconds to wait for the reply (2)"
    )
    p.set_defaults(func=cmd_state)

    p = sub.add_parser(
        "watch",
        parents=[client],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="tail exceptions as they fire",
        description=(
            "Tail the EXCEPTIONS stream, one line per exception: time, severity, status, rule, "
            "entity, location, message. New ones only, unless --all."
        ),
        epilog="FILTER is a subject such as exceptions.sku.> or exceptions.*.stockout.>, or a kind (sku).",
    )
    p.add_argument("filter", metavar="FILTER", nargs="?", default="exceptions.>", help="default exceptions.>")
    p.add_argument("--all", action="store_true", help="replay from the start of the stream, then follow")
    p.add_argument("--json", action="store_true", help="print the raw JSON payloads, one per line")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N exceptions")
    p.set_defaults(func=cmd_watch)

    from router.cli.settings import register as register_settings

    register_settings(sub, client)

    p = sub.add_parser(
        "dlq",
        parents=[client],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="list, show or redrive dead letters (bad input)",
        description=(
            "Dead letters are events the router could not apply, kept in the DEADLETTER stream with "
            "Router-Error, Router-Detail, Router-Subject and Router-Seq headers. `list` shows the "
            "latest, each with its number (#N, its DEADLETTER sequence) and the EVENTS sequence of the "
            "event; `show N` shows one with its headers and full payload (`show --events-seq SEQ` finds "
            "it by the EVENTS sequence, as in the router's log). `redrive N...` (or `redrive --error CODE "
            "[--since T]`) republishes dead letters to their event's subject, as they were or with "
            "--set FIELD=JSON, after checking that the router would apply them; each at most once "
            "(recorded in the KV bucket <deadletter stream>_redriven)."
        ),
        epilog=(
            "Examples:\n  router dlq\n  router dlq list --limit 50 --kind sku\n  router dlq show 12\n"
            "  router dlq show --events-seq 105\n  router dlq redrive 12 13\n"
            "  router dlq redrive 12 --set qty=5\n  router dlq redrive --error unknown_type --since 2h --dry-run"
        ),
    )
    p.add_argument(
        "action", nargs="?", choices=["list", "show", "redrive"], default="list",
        help="list (default), show or redrive",
    )
    p.add_argument(
        "seq", nargs="*", type=dead_letter_number, metavar="N",
        help="for show: the #N that list shows; for redrive: one or more",
    )
    p.add_argument(
        "--events-seq", type=int, metavar="SEQ", help="for show: the dead letter of this EVENTS sequence"
    )
    p.add_argument("--limit", type=int, default=20, metavar="N", help="how many of the latest to list (20)")
    p.add_argument("--kind", choices=[*KINDS, "unknown"], help="only dead letters of this kind")
    p.add_argument("--raw", action="store_true", help="show: write only the payload's exact bytes")
    p.add_argument("--error", metavar="CODE", help="redrive: the dead letters of this Router-Error (e.g. invalid)")
    p.add_argument(
        "--since", type=since_time, metavar="T",
        help="redrive --error: only those dead-lettered since T (a time with offset, or 30m, 2h, 1d ago)",
    )
    p.add_argument(
        "--set", action="append", type=field_setting, default=[], metavar="FIELD=JSON",
        help="redrive: replace FIELD (dotted for nested) of the JSON payload with the JSON value (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="redrive: show what would be sent, send nothing")
    p.add_argument(
        "--skip-invalid", action="store_true", help="redrive: send the valid ones when some would be dead-lettered again"
    )
    p.add_argument(
        "--force", action="store_true", help="redrive: send even those the router would dead-letter again"
    )
    p.add_argument("--json", action="store_true", help="redrive: one JSON line per dead letter sent")
    p.set_defaults(func=cmd_dlq)

    add_health_parser(sub, client, argparse.RawDescriptionHelpFormatter)
    add_oncall_parser(sub, client, argparse.RawDescriptionHelpFormatter)
    add_open_parser(sub, client, argparse.RawDescriptionHelpFormatter)

    p = sub.add_parser(
        "schema",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print the JSON Schema of event payloads",
        description="Print the JSON Schema of the event payloads, of every kind or of one.",
    )
    p.add_argument("kind", nargs="?", choices=KINDS, metavar="KIND", help=f"one of {', '.join(KINDS)}")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "simulate",
        parents=[client],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="publish a realistic, seeded stream of a brand's operations",
        description=(
            "Publish a seeded stream of a D2C brand's operations (stock at warehouses and dark "
            "stores, orders, shipments, campaigns) with wall-clock times, as plain core publishes on "
            "events.<kind>.<key>. The first minute is scripted so that exceptions fire: a hot SKU sells "
            "out while a campaign promotes it, a campaign overshoots its CPA, a flash sale exhausts "
            "its budget, shipments get delayed, too warm, or miss their promise. At the end it closes "
            "what it opened (shipments delivered, campaigns ended) and says what it sent."
        ),
    )
    p.add_argument("--rate", type=rate_arg, default=200.0, metavar="N/s", help="events per second (200)")
    p.add_argument(
        "--duration", type=float, default=60.0, metavar="S", help="seconds to run (60; 0 = until Ctrl-C)"
    )
    p.add_argument(
        "--seed", type=int, default=1, metavar="N", help="random seed (1): the same seed sends the same day"
    )
    p.add_argument(
        "--bad-share", type=share_arg, default=0.02, metavar="F", help="share of bad input (0.02 = 2%%)"
    )
    p.add_argument("--skus", type=int, default=60, metavar="N", help="SKUs (60)")
    p.add_argument(
        "--shipments", type=int, default=2000, metavar="N", help="shipments under way at most (2000)"
    )
    p.add_argument("--campaigns", type=int, default=8, metavar="N", help="campaigns running (8)")
    p.add_argument(
        "--no-scenario", action="store_true", help="skip the scripted incidents of the first minute"
    )
    p.add_argument(
        "--leave-open",
        action="store_true",
        help="at the end, leave shipments under way and campaigns running (by default they are "
        "delivered and ended, so no timer fires after the demo)",
    )
    p.add_argument(
        "--progress",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between progress lines (5; 0 = none)",
    )
    p.add_argument("--linger", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_simulate)

    add_store_commands(sub, config_opt)
    add_repartition_parser(sub, config_opt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse prints it)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        parser.prog = f"router {args.command}"
        err(str(exc))
        return EXIT_USAGE
    except ClientError as exc:
        err(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `router watch | head`
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
