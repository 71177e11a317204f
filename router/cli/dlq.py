"""`router dlq`: list dead letters (by #N, their DEADLETTER sequence, and the EVENTS sequence) and show one."""

from __future__ import annotations

import argparse
import sys
from collections import deque
from typing import Any

from contracts.config import Config
from router.cli.client import ClientError, ServerURL, connect
from router.cli.commands import client_setup
from router.cli.common import EXIT_OK, UsageError, run_async


def _preview(data: bytes, width: int = 100) -> str:
    text = data.decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[: width - 3] + "..."


def _when(value: Any) -> str:
    import datetime as dt

    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value) if value is not None else "?"


def _origin(h: dict[str, str]) -> str:
    """Where a dead letter came from: an EVENTS sequence, or a partner payload never stored there."""
    if "Router-Seq" not in h and h.get("Router-Error") == "unmapped":
        return "(a partner payload to POST /sources/<name>, not in EVENTS)"
    return f"(EVENTS seq {h.get('Router-Seq', '?')})"


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
    numbers: list[int] = list(args.seq or [])
    if args.action != "redrive":
        used = [flag for flag, on in (
            ("--error", args.error), ("--since", args.since), ("--set", args.set), ("--dry-run", args.dry_run),
            ("--skip-invalid", args.skip_invalid), ("--force", args.force), ("--json", args.json),
        ) if on]
        if used:
            raise UsageError(f"{used[0]} is for `router dlq redrive`")
    if args.action == "show":
        if len(numbers) > 1:
            raise UsageError("dlq show shows one dead letter (router dlq show 12)")
        args.seq = numbers[0] if numbers else None
        if (args.seq is None) == (args.events_seq is None):
            raise UsageError(
                "dlq show needs one dead letter: its number as `router dlq list` shows it (router dlq show 12) "
                "or the EVENTS sequence of the event (router dlq show --events-seq 105)"
            )
    if args.action == "list" and (numbers or args.events_seq is not None):
        raise UsageError("dlq list takes no number (did you mean `router dlq show N`?)")
    if args.action == "redrive":
        if args.events_seq is not None or args.raw:
            raise UsageError("dlq redrive takes dead-letter numbers (#N of `router dlq list`) or --error CODE")
        if bool(numbers) == bool(args.error):
            raise UsageError(
                "dlq redrive needs the dead letters: their numbers (router dlq redrive 12 13) "
                "or a reason (router dlq redrive --error invalid [--since 2h])"
            )
        if args.since is not None and not args.error:
            raise UsageError("--since selects with --error (router dlq redrive --error invalid --since 2h)")
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    cfg, server = client_setup(args)
    stream = cfg.streams.deadletter
    if args.action == "redrive":
        from router.cli.redrive import redrive

        return int(run_async(redrive, cfg, server, args))
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
                    f"stream {stream} not found on {server}: the router creates it when it starts"
                ) from None
            if number is None:
                raise ClientError(
                    f"no dead letter of EVENTS sequence {args.events_seq} in {stream} on {server}"
                )
        try:
            msg = await nc.jsm().get_msg(stream, number)
        except NotFoundError:
            raise ClientError(
                f"no dead letter #{number} in stream {stream} on {server} "
                "(`router dlq list` shows the numbers)"
            ) from None
    data = bytes(msg.data or b"")
    if args.raw:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return EXIT_OK
    headers = msg.headers or {}
    print(
        f"dead letter #{msg.seq} ({stream} seq {msg.seq})  "
        f"{'of ' + _origin(headers).strip('()') if 'Router-Seq' in headers else _origin(headers).strip('()')}  "
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
                f"stream {stream} not found on {server}: the router creates it when it starts"
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
            f"{h.get('Router-Subject', '?')}  {_origin(h)}"
        )
        print(f"        {h.get('Router-Detail', '')}")
        trunc = f" (truncated from {h['Router-Truncated']} bytes)" if "Router-Truncated" in h else ""
        print(f"        payload{trunc}: {_preview(bytes(msg.data))}")
    example = rows[-1]
    print(
        f"details: router dlq show N, the #N above (e.g. router dlq show {example.metadata.sequence.stream}), "
        f"or by the event: router dlq show --events-seq {(example.headers or {}).get('Router-Seq', 'SEQ')}",
        file=sys.stderr,
    )
    return EXIT_OK
