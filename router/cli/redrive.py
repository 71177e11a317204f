"""`router dlq redrive`: republish dead letters to their event's subject, once each.

Selection: dead-letter numbers (the #N of `router dlq list`), or `--error CODE` with
`--since T` and `--kind`. Each is republished with a JetStream publish on
`events.<kind>.<key>` (the kind and key of its `Router-Subject`), its bytes as dead-lettered
(the whole original from EVENTS when the dead letter was truncated) or, with `--set
FIELD=JSON`, the payload with those fields replaced. Before anything is published each is
checked with the router's own decoder (and the future-ts guard, against now): one that
would be dead-lettered again is reported and nothing is sent (`--skip-invalid` sends the
others, `--force` sends all). A dead letter is redriven at most once, recorded in a KV
bucket (`router.jetstream.deadletters.RedriveLedger`): a second redrive is refused, from
any machine and after the stream's duplicate window.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from contracts.config import Config, duration_us
from contracts.decode import DecodeError, decode_event, future_ts, parse_subject
from contracts.times import rfc3339, to_us
from router.cli.client import ClientError, ServerURL, connect
from router.cli.common import EXIT_FAILURE, EXIT_OK
from router.jetstream.deadletters import (
    AlreadyRedriven,
    RedriveLedger,
    Redriven,
    find_msg_id,
    msg_id,
    read_dead_letters,
)
from router.jetstream.streams import stored_subject_filter

# A pending record older than this, whose event is not in EVENTS, is a redrive that died
# before publishing: the next redrive takes it over (by compare-and-set).
PENDING_STALE_S = 60.0


def field_setting(text: str) -> tuple[list[str], Any]:
    """`--set FIELD=JSON`: (path, value); FIELD may be dotted for a nested object (`a.b`)."""
    name, sep, raw = text.partition("=")
    path = name.strip().split(".")
    if not sep or not all(path):
        raise argparse.ArgumentTypeError(f"--set {text!r}: use FIELD=JSON, e.g. qty=5 or location='\"BLR-DS-4\"'")
    try:
        value = json.loads(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: the value is not JSON (a string needs quotes: {name}='\"{raw}\"')"
        ) from None
    return path, value


def since_time(text: str) -> dt.datetime:
    """`--since`: an RFC 3339 time, or a duration back from now (`30m`, `2h`, `1d`)."""
    value = text.strip()
    try:
        back = duration_us(value)
    except Exception:
        back = None
    if back is not None:
        return dt.datetime.now(dt.UTC) - dt.timedelta(microseconds=back)
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: give a time (2026-03-01T09:00:00Z) or how long ago (30m, 2h, 1d)"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"--since {text!r}: the time needs an offset (Z or +05:30)")
    return when


class EditError(Exception):
    """--set cannot be applied to this payload."""


def edit_payload(data: bytes, sets: list[tuple[list[str], Any]]) -> bytes:
    """The payload with the fields replaced, as compact JSON.

    Read leniently so that a `malformed` payload can be fixed: a BOM is dropped and `NaN` or
    `Infinity` read (they must then be replaced, or the result is refused).
    """
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise EditError(f"the payload cannot be read as JSON ({exc}), so --set cannot edit it") from None
    if not isinstance(obj, dict):
        raise EditError(f"the payload is a JSON {type(obj).__name__}, not an object, so --set cannot edit it")
    for path, value in sets:
        target = obj
        for name in path[:-1]:
            inner = target.get(name)
            if not isinstance(inner, dict):
                inner = target[name] = {}
            target = inner
        target[path[-1]] = value
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise EditError(f"the edited payload is still not valid JSON ({exc}); --set the field that holds it") from None


def check_event(subject: str, data: bytes, max_skew_us: int, now_us: int) -> DecodeError | None:
    """Why the router would dead-letter this event if published now, or None."""
    try:
        _, _, event = decode_event(subject, data)
    except DecodeError as exc:
        return exc
    ts = getattr(event, "ts", None)
    if isinstance(ts, dt.datetime):
        detail = future_ts(to_us(ts), now_us, max_skew_us)
        if detail is not None:
            return DecodeError("invalid", detail)
    return None


@dataclass
class Candidate:
    number: int
    error: str = ""
    events_seq: int = 0
    target: str = ""
    data: bytes = b""
    problem: str = ""  # why it cannot be sent (not found, bad_subject, still invalid)
    invalid: bool = False  # the problem is that the router would dead-letter it again
    held: tuple[Redriven, int] | None = None
    changed: list[str] = field(default_factory=list)


def _already(rec: Redriven) -> str:
    where = f" from {rec.host}" if rec.host else ""
    return (
        f"dead letter #{rec.dead_letter} was already redriven{' at ' + rec.at if rec.at else ''}{where} "
        f"as EVENTS seq {rec.seq} ({rec.subject}); not sent again"
    )


async def _prepare(nc: Any, cfg: Config, msg: Any, number: int, args: argparse.Namespace) -> Candidate:
    from nats.js.errors import NotFoundError

    h = msg.headers or {}
    c = Candidate(number, error=h.get("Router-Error", "?"))
    try:
        c.events_seq = int(h.get("Router-Seq", "0"))
    except ValueError:
        c.events_seq = 0
    subject = h.get("Router-Subject", "")
    if c.error == "bad_subject" or not subject:
        c.problem = (
            f"its subject {subject!r} is not an event subject, and redrive keeps the subject: "
            "publish a corrected event with `router pub events.<kind>.<key> ...`"
        )
        return c
    try:
        kind, key = parse_subject(subject)
    except DecodeError as exc:
        c.problem = f"Router-Subject {subject!r}: {exc.detail}"
        return c
    c.target = f"events.{kind}.{key}"
    data = bytes(msg.data or b"")
    if "Router-Truncated" in h:
        try:
            original = await nc.jsm().get_msg(cfg.streams.events, c.events_seq)
        except NotFoundError:
            c.problem = (
                f"the dead letter holds {len(data)} of its {h['Router-Truncated']} bytes and "
                f"{cfg.streams.events} no longer has seq {c.events_seq}"
            )
            return c
        data = bytes(original.data or b"")
    if args.set:
        try:
            data = edit_payload(data, args.set)
        except EditError as exc:
            c.problem, c.invalid = str(exc), True
            return c
        c.changed = [".".join(path) for path, _ in args.set]
    c.data = data
    bad = check_event(c.target, data, duration_us(cfg.rules.max_future_skew), time.time_ns() // 1000)
    if bad is not None:
        c.problem, c.invalid = f"the router would dead-letter it again: {bad.code}: {bad.detail}", True
    return c


async def _select(nc: Any, cfg: Config, args: argparse.Namespace) -> list[tuple[int, Any | None]]:
    """(number, message or None when there is no such dead letter), in the order to send."""
    from nats.js.errors import NotFoundError

    stream = cfg.streams.deadletter
    out: list[tuple[int, Any | None]] = []
    if args.seq:
        for number in dict.fromkeys(args.seq):
            try:
                out.append((number, await nc.jsm().get_msg(stream, number)))
            except NotFoundError:
                out.append((number, None))
        return out
    subject = f"deadletter.{args.kind}" if args.kind else "deadletter.>"
    async for msg in read_dead_letters(nc, stream, subject=subject, since=args.since):
        if (msg.headers or {}).get("Router-Error") == args.error:
            out.append((int(msg.metadata.sequence.stream), msg))
    return out


async def _resolve_pending(nc: Any, cfg: Config, ledger: RedriveLedger, c: Candidate) -> str | None:
    """For a dead letter with a pending record: the refusal, or None when this redrive may take it over."""
    assert c.held is not None
    rec, revision = c.held
    filt = stored_subject_filter(c.target or rec.subject, cfg.router.partitions)
    seq = await find_msg_id(nc, cfg.streams.events, filt, msg_id(c.number), rec.events_last)
    if seq is not None:
        rec.state, rec.seq = "sent", seq
        with contextlib.suppress(AlreadyRedriven):
            await ledger.replace(rec, revision)
        return _already(rec)
    try:
        claimed = dt.datetime.fromisoformat(rec.at).timestamp() if rec.at else 0.0
    except ValueError:
        claimed = 0.0
    if time.time() - claimed < PENDING_STALE_S:
        return (
            f"a redrive of dead letter #{c.number} started at {rec.at} from {rec.host or '?'} and has not "
            f"recorded its EVENTS sequence yet; not sent (try again in a minute)"
        )
    return None


async def _send(nc: Any, cfg: Config, ledger: RedriveLedger, c: Candidate, host: str) -> Redriven:
    """Claim, publish, record; AlreadyRedriven when another redrive claimed it first."""
    info = await nc.jsm().stream_info(cfg.streams.events)
    rec = Redriven(
        dead_letter=c.number,
        events_seq=c.events_seq,
        subject=c.target,
        events_last=int(info.state.last_seq or 0),
        at=rfc3339(time.time_ns() // 1000),
        host=host,
        changed=c.changed,
    )
    revision = await ledger.replace(rec, c.held[1]) if c.held is not None else await ledger.claim(rec)
    try:
        ack = await nc.jetstream().publish(
            c.target, c.data, headers={"Nats-Msg-Id": msg_id(c.number)}, stream=cfg.streams.events, timeout=5
        )
    except Exception as exc:
        with contextlib.suppress(Exception):  # else left pending: the next redrive looks for it in EVENTS
            await ledger.release(c.number, revision)
        raise ClientError(f"dead letter #{c.number}: publishing on {c.target} failed: {exc}") from None
    rec.state, rec.seq = "sent", int(ack.seq)
    await ledger.replace(rec, revision)
    return rec


async def redrive(cfg: Config, server: ServerURL, args: argparse.Namespace) -> int:
    from nats.js.errors import NotFoundError

    async with connect(server, cfg=cfg) as nc:
        try:
            chosen = await _select(nc, cfg, args)
        except NotFoundError:
            raise ClientError(f"stream {cfg.streams.deadletter} not found on {server}: the router creates it") from None
        if not chosen:
            what = f"with Router-Error {args.error}" + (f" since {args.since.isoformat()}" if args.since else "")
            print(f"no dead letters {what}" + (f" for {args.kind}" if args.kind else ""))
            return EXIT_OK
        ledger = await RedriveLedger.open(nc, cfg.streams.deadletter, replicas=cfg.streams.replicas)
        explicit = bool(args.seq)
        candidates: list[Candidate] = []
        refused = 0
        for number, msg in chosen:
            if msg is None:
                print(f"#{number}: no such dead letter in {cfg.streams.deadletter}", file=sys.stderr)
                refused += 1
                continue
            c = await _prepare(nc, cfg, msg, number, args)
            c.held = await ledger.get(number)
            if c.held is not None and c.held[0].state == "sent":
                print(_already(c.held[0]), file=sys.stderr)
                refused += int(explicit)
                continue
            candidates.append(c)
        invalid = [c for c in candidates if c.problem]
        for c in invalid:
            print(f"#{c.number} ({c.error}, EVENTS seq {c.events_seq}): {c.problem}", file=sys.stderr)
        if invalid and not (args.force or args.skip_invalid):
            print(
                f"nothing sent: {len(invalid)} of {len(candidates)} would not be applied "
                "(fix them with --set FIELD=JSON; --skip-invalid sends the others, --force sends all)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        sendable = [c for c in candidates if not c.problem or (args.force and c.invalid and c.data)]
        refused += len(candidates) - len(sendable) if not args.skip_invalid else 0
        host = socket.gethostname()
        sent = 0
        for c in sendable:
            if args.dry_run:
                print(f"#{c.number} would go to {c.target}: {c.data.decode('utf-8', 'backslashreplace')}")
                continue
            if c.held is not None:
                reason = await _resolve_pending(nc, cfg, ledger, c)
                if reason is not None:
                    print(reason, file=sys.stderr)
                    refused += 1
                    continue
            try:
                rec = await _send(nc, cfg, ledger, c, host)
            except AlreadyRedriven as exc:
                print(_already(exc.record) if exc.record else f"#{c.number}: redriven meanwhile", file=sys.stderr)
                refused += 1
                continue
            sent += 1
            if args.json:
                print(json.dumps({
                    "dead_letter": c.number, "error": c.error, "events_seq": c.events_seq,
                    "subject": rec.subject, "seq": rec.seq, "changed": rec.changed,
                }))
            else:
                changed = f"  (with {', '.join(rec.changed)} set)" if rec.changed else ""
                print(f"#{c.number} ({c.error}) -> {rec.subject}  EVENTS seq {rec.seq}{changed}")
    if not args.dry_run and not args.json:
        print(f"redriven {sent} dead letter{'s' if sent != 1 else ''}", file=sys.stderr)
    return EXIT_FAILURE if refused else EXIT_OK
