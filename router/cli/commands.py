"""The `router` subcommands that talk to a running router or its streams: pub, state, watch, dlq, simulate."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

import anyio
import anyio.lowlevel

from contracts.config import Config, load_config
from contracts.decode import DecodeError, decode_event
from contracts.events import KEY_RE, KINDS
from router.cli.client import ClientError, ServerURL, connect, resolve_server
from router.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    color,
    run_async,
    until_interrupted,
)
from router.cli.health import last_report
from router.jetstream.streams import stores

# --- client commands -------------------------------------------------------------------


def client_setup(args: argparse.Namespace) -> tuple[Config, ServerURL]:
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
    cfg, server = client_setup(args)

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
                            f"no stream stores {subject} on {server} (the router creates "
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
            f"stream {stream} not found on {server}: nothing would store the event, so nothing was "
            "published; start the router (it creates the stream) or pass --config with its [streams] events"
        ) from None
    except (NatsError, TimeoutError):
        return  # no JetStream API for this user: the subject check above is all there is
    patterns = list(info.config.subjects or [])
    for subject in dict.fromkeys(subjects):
        if not stores(patterns, subject):
            raise ClientError(_outside_events(subject, patterns, f"{stream} "))


def _check_key(key: str) -> None:
    if not KEY_RE.match(key):
        raise UsageError(f"key {key!r} is not 1-128 characters of A-Z a-z 0-9 _ -")


def cmd_state(args: argparse.Namespace) -> int:
    _check_key(args.key)
    cfg, server = client_setup(args)
    subject = f"router.state.{args.kind}.{args.key}"

    async def query() -> bytes:
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeoutError

        async with connect(server, cfg=cfg) as nc:
            try:
                reply = await nc.request(subject, b"", timeout=args.timeout)
            except NoRespondersError:
                raise ClientError(
                    f"no responder on {subject} at {server}: {last_report(cfg) or 'is the router running?'}"
                ) from None
            except NatsTimeoutError:
                raise ClientError(
                    f"no reply on {subject} within {args.timeout:g}s: "
                    f"{last_report(cfg) or 'is the router busy or stopped?'}"
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
    cfg, server = client_setup(args)
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
                    f"stream {stream} not found on {server}: the router creates it when it starts"
                ) from None
            except APIError as exc:
                raise ClientError(f"cannot watch {subject} in {stream}: {exc.description or exc}") from None
            if not args.json:
                which = "from the start" if args.all else "new ones"
                print(
                    f"watching {subject} in {stream} on {server} ({which}); Ctrl-C to stop",
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
                f"lost the connection to {server}{shown}: the server went away; run `router watch` "
                "again once the router is back (--all replays the stream from the start)"
            )

    run_async(until_interrupted, tail)
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
    cfg, server = client_setup(args)
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
                    f"warning: stream {cfg.streams.events} does not exist on {server}: nothing stores "
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
                f"{server}; watch the exceptions with `router watch` in another terminal",
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


