"""The `router` command: run the daemon, check a config, and talk to a running router.

Exit codes: 0 done, 1 runtime failure (no server, no responder, the daemon failed),
2 bad usage or config (`config error: <key.path>: ...` on stderr), 130 interrupted while
starting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TextIO

import anyio
import anyio.lowlevel
import msgspec

from contracts.config import Config, ConfigError, load_config
from contracts.decode import DecodeError, decode_event
from contracts.events import KEY_PATTERN, KINDS, json_schema
from router import __version__
from router.client import ClientError, ServerURL, connect, resolve_server

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

_KEY_RE: Final = re.compile(KEY_PATTERN)


class UsageError(Exception):
    """Bad arguments that argparse cannot see (exit 2)."""


# --- running async code ----------------------------------------------------------------


def _backend_options() -> dict[str, Any]:
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def run_async(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """anyio on asyncio, with uvloop when installed."""
    return anyio.run(fn, *args, backend="asyncio", backend_options=_backend_options())


async def _until_interrupted(body: Callable[[], Awaitable[None]]) -> bool:
    """Run `body` until it returns or SIGINT/SIGTERM arrives; True when interrupted."""
    try:
        return await _body_or_signal(body)
    except BaseExceptionGroup as group:
        # One task failed (for example a ClientError): report that, not the group.
        inner = _single(group)
        if inner is not group:
            raise inner from None
        raise


async def _body_or_signal(body: Callable[[], Awaitable[None]]) -> bool:
    interrupted = False
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            nonlocal interrupted
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    interrupted = True
                    tg.cancel_scope.cancel()
                    return

        async def main() -> None:
            await body()
            tg.cancel_scope.cancel()

        tg.start_soon(on_signal)
        tg.start_soon(main)
    return interrupted


def _err(message: str) -> None:
    print(f"router: {message}", file=sys.stderr)


def _color(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) and "NO_COLOR" not in os.environ


# --- run, check-config, schema ---------------------------------------------------------


def _daemon_run() -> Callable[[Config], Awaitable[int]]:
    """`router.daemon.run` (or `router.runtime.run`), imported only when `router run` starts."""
    name = "router.daemon" if importlib.util.find_spec("router.daemon") is not None else "router.runtime"
    module = importlib.import_module(name)
    return module.run  # type: ignore[no-any-return]


def cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from router.embedded import EmbeddedServerError
    from router.logs import configure_logging

    cfg = load_config(args.config)
    configure_logging(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    run = _daemon_run()
    try:
        return int(run_async(run, cfg))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as exc:
        failure = _single(exc)
        if isinstance(failure, EmbeddedServerError):
            structlog.get_logger().error("router_failed", error=str(failure))
            return EXIT_FAILURE
        raise


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else `exc`."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


_SECRET_KEYS: Final = {"password", "token"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def effective_config(cfg: Config) -> dict[str, Any]:
    """The config as plain data, defaults filled in, secrets masked."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    data.pop("__base_dir__", None)
    nats = data.get("nats", {})
    for key in _SECRET_KEYS:
        if nats.get(key) is not None:
            nats[key] = "***"
    return data


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
    cfg = load_config(args.config)
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


# --- client commands -------------------------------------------------------------------


def _client_setup(args: argparse.Namespace) -> tuple[Config, ServerURL]:
    from router.logs import configure_logging

    cfg = load_config(args.config)
    configure_logging("warning", "auto")
    return cfg, resolve_server(args.server, cfg)


def _parse_headers(items: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header {item!r}: use NAME:VALUE")
        headers[name.strip()] = value.strip()
    return headers


def cmd_pub(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.payload is None or args.payload == "-":
        template = sys.stdin.buffer.read()
    else:
        template = os.fsencode(args.payload)  # the exact bytes given, even invalid UTF-8
    headers = _parse_headers(args.header)
    messages: list[tuple[str, bytes, dict[str, str]]] = []
    for i in range(1, args.count + 1):
        subject = args.subject.replace("{{i}}", str(i))
        data = template.replace(b"{{i}}", str(i).encode())
        hdrs = {k: v.replace("{{i}}", str(i)) for k, v in headers.items()}
        if args.msg_id:
            hdrs["Nats-Msg-Id"] = args.msg_id.replace("{{i}}", str(i))
        if not args.force:
            try:
                decode_event(subject, data)
            except DecodeError as exc:
                which = f" (message {i})" if args.count > 1 else ""
                print(f"invalid event{which}: {exc.code}: {exc.detail}", file=sys.stderr)
                print(
                    f"nothing published: the router would dead-letter it with Router-Error: {exc.code} "
                    "(use --force to send it anyway)",
                    file=sys.stderr,
                )
                return EXIT_USAGE
        messages.append((subject, data, hdrs))
    cfg, server = _client_setup(args)

    async def publish() -> None:
        async with connect(server, cfg=cfg) as nc:
            if args.js:
                from nats.errors import NoRespondersError
                from nats.errors import TimeoutError as NatsTimeoutError

                js = nc.jetstream()
                for subject, data, hdrs in messages:
                    try:
                        ack = await js.publish(subject, data, headers=hdrs or None, timeout=5)
                    except (NoRespondersError, NatsTimeoutError):
                        raise ClientError(
                            f"no stream stores {subject} on {server.url} (the router creates "
                            f"{cfg.streams.events} when it starts)"
                        ) from None
                    dup = " (duplicate, dropped by the stream)" if ack.duplicate else ""
                    print(f"stored {subject} in {ack.stream} at seq {ack.seq}{dup}")
            else:
                from nats.errors import Error as NatsError

                for subject, data, hdrs in messages:
                    try:
                        await nc.publish(subject, data, headers=hdrs or None)
                    except NatsError as exc:
                        raise ClientError(f"cannot publish on {subject!r}: {exc}") from None
                await nc.flush(timeout=5)
                if len(messages) == 1:
                    print(f"published {len(messages[0][1])} bytes on {messages[0][0]}")
                else:
                    print(f"published {len(messages)} messages")

    run_async(publish)
    return EXIT_OK


def _check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise UsageError(f"key {key!r} is not 1-128 characters of A-Z a-z 0-9 _ -")


def cmd_state(args: argparse.Namespace) -> int:
    _check_key(args.key)
    cfg, server = _client_setup(args)
    subject = f"router.state.{args.kind}.{args.key}"

    async def query() -> bytes:
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeoutError

        async with connect(server, cfg=cfg) as nc:
            try:
                reply = await nc.request(subject, b"", timeout=args.timeout)
            except NoRespondersError:
                raise ClientError(
                    f"no responder on {subject} at {server.url}: is the router running?"
                ) from None
            except NatsTimeoutError:
                raise ClientError(
                    f"no reply on {subject} within {args.timeout:g}s: is the router busy or stopped?"
                ) from None
            return bytes(reply.data)

    data = run_async(query)
    if args.raw:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.flush()
    else:
        try:
            print(json.dumps(json.loads(data), indent=2, ensure_ascii=False))
        except ValueError:
            print(data.decode("utf-8", "backslashreplace"))
    return EXIT_OK


_SEVERITY_COLOR: Final = {"critical": "\x1b[31;1m", "warning": "\x1b[33m"}
_CLEARED_COLOR: Final = "\x1b[32m"
_RESET: Final = "\x1b[0m"


def format_exception(payload: dict[str, Any], color: bool = False) -> str:
    """One readable line: time, severity, status, rule, key, location, message."""
    severity = str(payload.get("severity", "?"))
    status = str(payload.get("status", "?"))
    where = f"{payload.get('kind', '?')}:{payload.get('key', '?')}"
    if payload.get("location"):
        where += f" @ {payload['location']}"
    line = (
        f"{payload.get('detected_at', '?')}  {severity.upper():<8} {status:<7} "
        f"{payload.get('rule', '?'):<22} {where:<32} {payload.get('message', '')}"
    )
    if color:
        tint = _CLEARED_COLOR if status == "cleared" else _SEVERITY_COLOR.get(severity, "")
        line = f"{tint}{line}{_RESET}" if tint else line
    return line


def _watch_filter(arg: str) -> str:
    if arg in KINDS:
        return f"exceptions.{arg}.>"
    return arg


def cmd_watch(args: argparse.Namespace) -> int:
    subject = _watch_filter(args.filter)
    if not (subject == "exceptions.>" or subject.startswith("exceptions.") or subject in (">", "*.>")):
        raise UsageError(f"filter {args.filter!r} is not under exceptions. (e.g. exceptions.sku.> or sku)")
    cfg, server = _client_setup(args)
    color = _color(sys.stdout)
    stream = cfg.streams.exceptions

    async def tail() -> None:
        from nats.js import api
        from nats.js.errors import APIError, NotFoundError

        async with connect(server, cfg=cfg) as nc:
            js = nc.jetstream()
            policy = api.DeliverPolicy.ALL if args.all else api.DeliverPolicy.NEW
            try:
                sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=policy)
            except NotFoundError:
                raise ClientError(
                    f"stream {stream} not found on {server.url}: the router creates it when it starts"
                ) from None
            except APIError as exc:
                raise ClientError(f"cannot watch {subject} in {stream}: {exc.description or exc}") from None
            if not args.json:
                which = "from the start" if args.all else "new ones"
                print(
                    f"watching {subject} in {stream} on {server.url} ({which}); Ctrl-C to stop",
                    file=sys.stderr,
                )
            seen = 0
            async for msg in sub.messages:
                if args.json:
                    sys.stdout.buffer.write(bytes(msg.data) + b"\n")
                else:
                    try:
                        payload = json.loads(msg.data)
                        line = (
                            format_exception(payload, color) if isinstance(payload, dict) else repr(payload)
                        )
                    except ValueError:
                        line = f"{msg.subject}: {bytes(msg.data)!r}"
                    sys.stdout.write(line + "\n")
                sys.stdout.flush()
                seen += 1
                if args.count and seen >= args.count:
                    return

    run_async(_until_interrupted, tail)
    return EXIT_OK


def _preview(data: bytes, width: int = 100) -> str:
    text = data.decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[: width - 3] + "..."


def _when(value: Any) -> str:
    import datetime as dt

    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value) if value is not None else "?"


def cmd_dlq(args: argparse.Namespace) -> int:
    if args.action == "show" and args.seq is None:
        raise UsageError("dlq show needs the DEADLETTER sequence: router dlq show SEQ")
    if args.action == "list" and args.seq is not None:
        raise UsageError("dlq list takes no sequence (did you mean `router dlq show SEQ`?)")
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    cfg, server = _client_setup(args)
    stream = cfg.streams.deadletter
    if args.action == "show":
        return int(run_async(_dlq_show, cfg, server, stream, args))
    return int(run_async(_dlq_list, cfg, server, stream, args))


async def _dlq_show(cfg: Config, server: ServerURL, stream: str, args: argparse.Namespace) -> int:
    from nats.js.errors import NotFoundError

    async with connect(server, cfg=cfg) as nc:
        try:
            msg = await nc.jsm().get_msg(stream, args.seq)
        except NotFoundError:
            raise ClientError(f"no message at seq {args.seq} in stream {stream} on {server.url}") from None
    data = bytes(msg.data or b"")
    if args.raw:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return EXIT_OK
    print(f"{stream} seq {msg.seq}  subject {msg.subject}  stored {_when(msg.time)}")
    for name, value in (msg.headers or {}).items():
        print(f"{name}: {value}")
    print(f"payload ({len(data)} bytes):")
    try:
        print(data.decode("utf-8"))
    except UnicodeDecodeError:
        print(data.decode("utf-8", "backslashreplace"))
        print("(not valid UTF-8: shown with \\x escapes; --raw writes the exact bytes)")
    return EXIT_OK


async def _dlq_list(cfg: Config, server: ServerURL, stream: str, args: argparse.Namespace) -> int:
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js import api
    from nats.js.errors import NotFoundError

    subject = f"deadletter.{args.kind}" if args.kind else "deadletter.>"
    async with connect(server, cfg=cfg) as nc:
        jsm = nc.jsm()
        try:
            info = await jsm.stream_info(stream, subjects_filter=subject if args.kind else None)
        except NotFoundError:
            raise ClientError(
                f"stream {stream} not found on {server.url}: the router creates it when it starts"
            ) from None
        first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
        total = sum((info.state.subjects or {}).values()) if args.kind else int(info.state.messages or 0)
        if total == 0 or last == 0:
            print(f"no dead letters in {stream}" + (f" for {args.kind}" if args.kind else ""))
            return EXIT_OK
        start = max(first, last - args.limit + 1) if not args.kind else first
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        sub = await nc.jetstream().subscribe(subject, stream=stream, ordered_consumer=True, config=config)
        rows: deque[Any] = deque(maxlen=args.limit)
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                rows.append(msg)
                md = msg.metadata
                if md.num_pending == 0 or md.sequence.stream >= last:
                    break
        except NatsTimeoutError:
            if not rows:
                raise ClientError(f"no dead letters arrived from {stream} within 10s") from None
        finally:
            await sub.unsubscribe()
    shown = len(rows)
    what = f"{total} dead letter{'s' if total != 1 else ''}" + (f" for {args.kind}" if args.kind else "")
    print(f"{stream}: {what}; showing the last {shown}" + (" (--limit N for more)" if shown < total else ""))
    for msg in rows:
        h = msg.headers or {}
        seq = msg.metadata.sequence.stream
        print(
            f"#{seq:<6} {_when(msg.metadata.timestamp)}  {h.get('Router-Error', '?'):<12} "
            f"{h.get('Router-Subject', '?')}  (seq {h.get('Router-Seq', '?')})"
        )
        print(f"        {h.get('Router-Detail', '')}")
        trunc = f" (truncated from {h['Router-Truncated']} bytes)" if "Router-Truncated" in h else ""
        print(f"        payload{trunc}: {_preview(bytes(msg.data))}")
    print("details: router dlq show SEQ", file=sys.stderr)
    return EXIT_OK


def _rate(text: str) -> float:
    value = text.strip().removesuffix("/s")
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 200 or 200/s)") from None
    if not 0 < rate <= 1_000_000:
        raise argparse.ArgumentTypeError(f"rate {text!r} must be above 0 and at most 1000000/s")
    return rate


def _share(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%")) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a share: {text!r} (e.g. 0.02 or 2%)") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"share {text!r} must be in [0, 1)")
    return value


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.duration < 0:
        raise UsageError("--duration must be 0 (until Ctrl-C) or more seconds")
    for name in ("skus", "shipments", "campaigns"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must not be negative")
    cfg, server = _client_setup(args)
    from router.simulate import Tally, workload

    count = int(args.rate * args.duration) if args.duration else None
    now_us = time.time_ns() // 1000
    items = workload(
        args.seed,
        now_us=now_us,
        count=count,
        rate=args.rate,
        skus=args.skus,
        shipments=args.shipments,
        campaigns=args.campaigns,
        bad_share=args.bad_share,
        scenario=not args.no_scenario,
    )
    tally = Tally()
    seen: Counter[tuple[str, str]] = Counter()
    started = time.monotonic()
    finished = [started]

    async def simulate() -> bool:
        from nats.js.errors import NotFoundError

        async with connect(server, cfg=cfg, name="router-simulate") as nc:
            try:
                await nc.jsm().stream_info(cfg.streams.events)
            except NotFoundError:
                print(
                    f"warning: stream {cfg.streams.events} does not exist on {server.url}: nothing stores "
                    "these events until a router runs (router run)",
                    file=sys.stderr,
                )

            async def on_exception(msg: Any) -> None:
                try:
                    e = json.loads(msg.data)
                    seen[(str(e.get("status")), str(e.get("rule")))] += 1
                except (ValueError, AttributeError):
                    pass

            sub = await nc.subscribe("exceptions.>", cb=on_exception)
            span = f"for {args.duration:g}s" if args.duration else "until Ctrl-C"
            print(
                f"simulating a D2C brand's operations at {args.rate:g}/s {span} (seed {args.seed}) on "
                f"{server.url}; see the exceptions with `router watch`",
                file=sys.stderr,
            )

            async def publish() -> None:
                next_report = args.progress
                for sent, (subject, data) in enumerate(items, 1):
                    due = (sent - 1) / args.rate - (time.monotonic() - started)
                    if due > 0.002:
                        await anyio.sleep(due)
                    await nc.publish(subject, data)
                    tally.add(subject, data)
                    elapsed = time.monotonic() - started
                    if args.progress and elapsed >= next_report:
                        next_report += args.progress
                        raised = sum(n for (status, _), n in seen.items() if status == "raised")
                        print(
                            f"  {elapsed:5.0f}s  {sent:>9,} sent ({sent / elapsed:,.0f}/s)  "
                            f"bad {sum(tally.bad.values()):,}  exceptions raised {raised:,}",
                            file=sys.stderr,
                        )
                    if sent % 512 == 0:
                        await anyio.lowlevel.checkpoint()
                await nc.flush(timeout=10)

            interrupted = await _until_interrupted(publish)
            finished[0] = time.monotonic()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await nc.flush(timeout=10)
                await anyio.sleep(min(2.0, args.linger))  # let the router's answers arrive
                await sub.unsubscribe()
            return interrupted

    interrupted = run_async(simulate)
    elapsed = max(finished[0] - started, 1e-9)
    total = tally.total
    good = sum(tally.good.values())
    bad = sum(tally.bad.values())
    print(
        f"sent {total:,} events in {elapsed:.1f}s ({total / elapsed:,.0f}/s): {good:,} valid, {bad:,} bad input"
        + (" (interrupted)" if interrupted else "")
    )
    for line in tally.lines():
        print(line)
    raised = {rule: n for (status, rule), n in seen.items() if status == "raised"}
    cleared = sum(n for (status, _), n in seen.items() if status == "cleared")
    if raised or cleared:
        detail = ", ".join(f"{rule} {n}" for rule, n in sorted(raised.items(), key=lambda kv: -kv[1]))
        print(f"exceptions seen: {sum(raised.values())} raised ({detail}), {cleared} cleared")
    else:
        print("exceptions seen: none yet (is the router running? start it with `router run`)")
    return EXIT_OK


# --- the parser ------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router",
        formatter_class=_Formatter,
        description=(
            "ops-router: NATS JetStream events -> per-entity state -> exceptions the moment a "
            "threshold is crossed."
        ),
        epilog=(
            "Try it:\n"
            "  router run                         # embedded nats-server, state in ./data\n"
            "  router simulate                    # in another terminal: a brand's day at 200/s\n"
            "  router watch                       # exceptions as they fire\n"
            "  router state sku SERUM-VITC-30     # one entity's live state\n"
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
        formatter_class=_Formatter,
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
        formatter_class=_Formatter,
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
        formatter_class=_Formatter,
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
        formatter_class=_Formatter,
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
        formatter_class=_Formatter,
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

    p = sub.add_parser(
        "dlq",
        parents=[client],
        formatter_class=_Formatter,
        help="list or show dead letters (bad input)",
        description=(
            "Dead letters are events the router could not apply, kept in the DEADLETTER stream with "
            "Router-Error, Router-Detail, Router-Subject and Router-Seq headers. `list` shows the "
            "latest; `show SEQ` one of them with its headers and full payload."
        ),
        epilog="Examples:\n  router dlq\n  router dlq list --limit 50 --kind sku\n  router dlq show 12",
    )
    p.add_argument(
        "action", nargs="?", choices=["list", "show"], default="list", help="list (default) or show"
    )
    p.add_argument("seq", nargs="?", type=int, metavar="SEQ", help="DEADLETTER sequence, for show")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="how many of the latest to list (20)")
    p.add_argument("--kind", choices=[*KINDS, "unknown"], help="only dead letters of this kind")
    p.add_argument("--raw", action="store_true", help="show: write only the payload's exact bytes")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser(
        "schema",
        formatter_class=_Formatter,
        help="print the JSON Schema of event payloads",
        description="Print the JSON Schema of the event payloads, of every kind or of one.",
    )
    p.add_argument("kind", nargs="?", choices=KINDS, metavar="KIND", help=f"one of {', '.join(KINDS)}")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "simulate",
        parents=[client],
        formatter_class=_Formatter,
        help="publish a realistic, seeded stream of a brand's operations",
        description=(
            "Publish a seeded stream of a D2C brand's operations (stock at warehouses and dark "
            "stores, orders, shipments, campaigns) with wall-clock times, as plain core publishes on "
            "events.<kind>.<key>. The first minute is scripted so that exceptions fire: a hot SKU sells "
            "out while a campaign promotes it, a campaign overshoots its CPA, a flash sale exhausts "
            "its budget, shipments get delayed, too warm, or miss their promise. Says what it sent."
        ),
    )
    p.add_argument("--rate", type=_rate, default=200.0, metavar="N/s", help="events per second (200)")
    p.add_argument(
        "--duration", type=float, default=60.0, metavar="S", help="seconds to run (60; 0 = until Ctrl-C)"
    )
    p.add_argument(
        "--seed", type=int, default=1, metavar="N", help="random seed (1): the same seed sends the same day"
    )
    p.add_argument(
        "--bad-share", type=_share, default=0.02, metavar="F", help="share of bad input (0.02 = 2%%)"
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
        "--progress",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between progress lines (5; 0 = none)",
    )
    p.add_argument("--linger", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_simulate)
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
        _err(str(exc))
        return EXIT_USAGE
    except ClientError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `router watch | head`
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
