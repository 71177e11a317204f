"""The `router` subcommands that talk to a running router or its streams: pub, state, watch, dlq, simulate."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Final

import anyio
import anyio.lowlevel

from contracts.config import Config, load_config
from contracts.decode import DecodeError, decode_event
from contracts.events import KEY_PATTERN, KINDS
from router.cli.client import ClientError, ServerURL, connect, resolve_server
from router.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    color,
    run_async,
    until_interrupted,
)
from router.jetstream.streams import stores

_KEY_RE: Final = re.compile(KEY_PATTERN)


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


# The subjects of the events stream (CONTRACT section 1): what the router creates and reads.
EVENTS_SUBJECTS: Final = ("events.>",)


def _outside_events(subject: str, patterns: Sequence[str], stream: str = "") -> str:
    """Why `subject` may not be published: no stream the router reads stores it."""
    hint = ""
    tokens = subject.split(".")
    if len(tokens) == 2 and tokens[0] in KINDS:
        hint = f"; did you mean events.{subject}?"
    return (
        f"{subject} is outside the events stream {stream}({', '.join(patterns)}): nothing the router reads stores "
        f"it, so the event would be lost; not published, with or without --force{hint}"
    )


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
        if not stores(EVENTS_SUBJECTS, subject):
            raise UsageError(_outside_events(subject, EVENTS_SUBJECTS))
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
            await _check_events_stream(nc, cfg, server, [m[0] for m in messages])
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


async def _check_events_stream(nc: Any, cfg: Config, server: ServerURL, subjects: list[str]) -> None:
    """Refuse subjects the events stream on this server does not store (or no such stream)."""
    from nats.errors import Error as NatsError
    from nats.js.errors import NotFoundError

    stream = cfg.streams.events
    try:
        info = await nc.jsm().stream_info(stream)
    except NotFoundError:
        raise ClientError(
            f"stream {stream} not found on {server.url}: nothing would store the event, so nothing was "
            "published; start the router (it creates the stream) or pass --config with its [streams] events"
        ) from None
    except (NatsError, TimeoutError):
        return  # no JetStream API for this user: the subject check above is all there is
    patterns = list(info.config.subjects or [])
    for subject in dict.fromkeys(subjects):
        if not stores(patterns, subject):
            raise ClientError(_outside_events(subject, patterns, f"{stream} "))


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
    use_color = color(sys.stdout)
    stream = cfg.streams.exceptions

    async def tail() -> None:
        from nats.js import api
        from nats.js.errors import APIError, NotFoundError

        # Pings every 5 s: a server that stops answering (not only one that closes the
        # connection) ends the watch within seconds rather than minutes.
        async with connect(server, cfg=cfg, ping_interval=5.0) as nc:
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
                            format_exception(payload, use_color) if isinstance(payload, dict) else repr(payload)
                        )
                    except ValueError:
                        line = f"{msg.subject}: {bytes(msg.data)!r}"
                    sys.stdout.write(line + "\n")
                sys.stdout.flush()
                seen += 1
                if args.count and seen >= args.count:
                    return
            # The messages end only when the subscription or the connection is gone: the
            # server stopped (a router with the embedded server stops it too) or dropped us.
            shown = f" after {seen} exception{'s' if seen != 1 else ''}" if seen else ""
            raise ClientError(
                f"lost the connection to {server.url}{shown}: the server went away; run `router watch` "
                "again once the router is back (--all replays the stream from the start)"
            )

    run_async(until_interrupted, tail)
    return EXIT_OK


def _preview(data: bytes, width: int = 100) -> str:
    text = data.decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[: width - 3] + "..."


def _when(value: Any) -> str:
    import datetime as dt

    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value) if value is not None else "?"


def dead_letter_number(text: str) -> int:
    """A dead letter's number as `router dlq list` shows it: `12` or `#12`."""
    try:
        value = int(text.strip().removeprefix("#"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a dead-letter number: {text!r} (the #N of `router dlq list`, e.g. 12 or #12)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"dead-letter numbers start at 1, not {value}")
    return value


def cmd_dlq(args: argparse.Namespace) -> int:
    if args.action == "show" and (args.seq is None) == (args.events_seq is None):
        raise UsageError(
            "dlq show needs one dead letter: its number as `router dlq list` shows it (router dlq show 12) "
            "or the EVENTS sequence of the event (router dlq show --events-seq 105)"
        )
    if args.action == "list" and (args.seq is not None or args.events_seq is not None):
        raise UsageError("dlq list takes no number (did you mean `router dlq show N`?)")
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    cfg, server = _client_setup(args)
    stream = cfg.streams.deadletter
    if args.action == "show":
        return int(run_async(_dlq_show, cfg, server, stream, args))
    return int(run_async(_dlq_list, cfg, server, stream, args))


async def _find_by_events_seq(nc: Any, stream: str, events_seq: int) -> int | None:
    """The number of the dead letter of EVENTS sequence `events_seq` (its Router-Seq header), or None.

    JetStream has no index on headers: this reads the stream's headers, newest last.
    """
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js import api

    info = await nc.jsm().stream_info(stream)
    if not info.state.messages:
        return None
    last = int(info.state.last_seq or 0)
    config = api.ConsumerConfig(headers_only=True, deliver_policy=api.DeliverPolicy.ALL)
    sub = await nc.jetstream().subscribe("deadletter.>", stream=stream, ordered_consumer=True, config=config)
    wanted = str(events_seq)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=10)
            except NatsTimeoutError:
                return None
            number = int(msg.metadata.sequence.stream)
            if (msg.headers or {}).get("Router-Seq") == wanted:
                return number
            if number >= last or msg.metadata.num_pending == 0:
                return None
    finally:
        await sub.unsubscribe()


async def _dlq_show(cfg: Config, server: ServerURL, stream: str, args: argparse.Namespace) -> int:
    from nats.js.errors import NotFoundError

    async with connect(server, cfg=cfg) as nc:
        number = args.seq
        if args.events_seq is not None:
            try:
                number = await _find_by_events_seq(nc, stream, args.events_seq)
            except NotFoundError:
                raise ClientError(
                    f"stream {stream} not found on {server.url}: the router creates it when it starts"
                ) from None
            if number is None:
                raise ClientError(
                    f"no dead letter of EVENTS sequence {args.events_seq} in {stream} on {server.url}"
                )
        try:
            msg = await nc.jsm().get_msg(stream, number)
        except NotFoundError:
            raise ClientError(
                f"no dead letter #{number} in stream {stream} on {server.url} "
                "(`router dlq list` shows the numbers)"
            ) from None
    data = bytes(msg.data or b"")
    if args.raw:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return EXIT_OK
    headers = msg.headers or {}
    print(
        f"dead letter #{msg.seq} ({stream} seq {msg.seq})  of EVENTS seq {headers.get('Router-Seq', '?')}  "
        f"subject {msg.subject}  stored {_when(msg.time)}"
    )
    for name, value in headers.items():
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
        number = msg.metadata.sequence.stream
        print(
            f"#{number:<6} {_when(msg.metadata.timestamp)}  {h.get('Router-Error', '?'):<12} "
            f"{h.get('Router-Subject', '?')}  (EVENTS seq {h.get('Router-Seq', '?')})"
        )
        print(f"        {h.get('Router-Detail', '')}")
        trunc = f" (truncated from {h['Router-Truncated']} bytes)" if "Router-Truncated" in h else ""
        print(f"        payload{trunc}: {_preview(bytes(msg.data))}")
    example = rows[-1]
    print(
        f"details: router dlq show #N (e.g. router dlq show {example.metadata.sequence.stream}), "
        f"or by the event: router dlq show --events-seq {(example.headers or {}).get('Router-Seq', 'SEQ')}",
        file=sys.stderr,
    )
    return EXIT_OK


def rate_arg(text: str) -> float:
    value = text.strip().removesuffix("/s")
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 200 or 200/s)") from None
    if not 0 < rate <= 1_000_000:
        raise argparse.ArgumentTypeError(f"rate {text!r} must be above 0 and at most 1000000/s")
    return rate


def share_arg(text: str) -> float:
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
    from router.workload import Tally, operations_day

    count = int(args.rate * args.duration) if args.duration else None
    now_us = time.time_ns() // 1000
    day = operations_day(
        args.seed,
        now_us=now_us,
        rate=args.rate,
        skus=args.skus,
        shipments=args.shipments,
        campaigns=args.campaigns,
        bad_share=args.bad_share,
        scenario=not args.no_scenario,
    )
    items = day.run(count)
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

            interrupted = await until_interrupted(publish)
            if not args.leave_open:
                # Close what the day opened (also after Ctrl-C): shipments under way are
                # delivered and campaigns ended, so no timer of the demo fires later.
                closing = day.finish()
                with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                    for subject, data in closing:
                        await nc.publish(subject, data)
                        tally.add(subject, data)
                    shipped = sum(1 for subject, _ in closing if subject.startswith("events.shipment."))
                    print(
                        f"closing the day: {shipped:,} shipments under way delivered, "
                        f"{len(closing) - shipped:,} campaigns ended (--leave-open keeps them open)",
                        file=sys.stderr,
                    )
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


