"""`router settings import | show | export`: thresholds per entity as CSV rows (CONTRACT 2.4, 5).

The CSV has a header row and the columns `kind,key,location,field,value`; an empty `value`
resets the field. Each entity and location becomes one `settings` event, published with a
JetStream publish and a `Nats-Msg-Id` derived from the file's content and the entity, so
importing the same file again (within the stream's duplicate window) stores nothing new.
Every row is checked before anything is published.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import anyio

from contracts.decode import DecodeError, decode_payload
from contracts.events import KEY_RE, KINDS, SETTINGS_FIELDS
from router.cli.client import ClientError, connect
from router.cli.common import EXIT_OK, EXIT_USAGE, UsageError, err, run_async

COLUMNS: Final = ("kind", "key", "location", "field", "value")
_INTS: Final = frozenset({"low_stock_threshold", "return_spike_min_units"})
_STRINGS: Final = frozenset({"stall_after"})
# Publishes awaiting their PubAck at once.
_WINDOW: Final = 512
# Errors shown before "... and N more".
_SHOWN: Final = 50


@dataclass
class Group:
    """One entity (and for a SKU, optionally one location): one `settings` event."""

    kind: str
    key: str
    location: str
    lines: list[int] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    reset: list[str] = field(default_factory=list)
    line_of: dict[str, int] = field(default_factory=dict)

    def payload(self) -> bytes:
        body: dict[str, Any] = {"type": "settings"}
        if self.location:
            body["location"] = self.location
        body.update(self.values)
        if self.reset:
            body["reset"] = self.reset
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    def subject(self) -> str:
        return f"events.{self.kind}.{self.key}"


def _value(field_name: str, text: str) -> Any:
    """The JSON value of a cell; ValueError says what is wrong."""
    if field_name in _STRINGS:
        return text
    if field_name in _INTS:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{field_name} must be an integer, got {text!r}") from None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{field_name} must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{field_name} must be a finite number, got {text!r}")
    return value


def parse_rows(text: str) -> tuple[list[Group], list[str]]:
    """Groups in file order, and every error as `line N: ...` (nothing is published when there is one)."""
    errors: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return [], ["line 1: the file is empty; the first row must be kind,key,location,field,value"]
    except csv.Error as exc:
        return [], [f"line 1: {exc}"]
    names = [h.strip().lower() for h in header]
    if names and names[0].startswith("\ufeff"):
        names[0] = names[0][1:]
    if names != list(COLUMNS):
        return [], [f"line 1: the header must be {','.join(COLUMNS)}, got {','.join(header)}"]
    groups: dict[tuple[str, str, str], Group] = {}
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(f"line {reader.line_num}: {exc}")
            continue
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue  # a blank line
        if len(row) != len(COLUMNS):
            errors.append(f"line {line}: expected {len(COLUMNS)} columns ({','.join(COLUMNS)}), got {len(row)}")
            continue
        kind, key, location, field_name, value = (c.strip() for c in row)
        if kind not in KINDS:
            errors.append(f"line {line}: kind {kind!r} is not one of {', '.join(KINDS)}")
            continue
        if not KEY_RE.match(key):
            errors.append(f"line {line}: key {key!r} is not 1-128 characters of A-Z a-z 0-9 _ -")
            continue
        if location and kind != "sku":
            errors.append(f"line {line}: only a sku setting has a location ({kind} {key} has {location!r})")
            continue
        if field_name not in SETTINGS_FIELDS[kind]:
            errors.append(
                f"line {line}: {field_name!r} is not a {kind} setting (one of {', '.join(SETTINGS_FIELDS[kind])})"
            )
            continue
        g = groups.get((kind, key, location))
        if g is None:
            g = groups[(kind, key, location)] = Group(kind, key, location)
        if field_name in g.line_of:
            errors.append(f"line {line}: {kind} {key} {location or '(SKU-wide)'} {field_name} already on line {g.line_of[field_name]}")
            continue
        g.line_of[field_name] = line
        g.lines.append(line)
        if value == "":
            g.reset.append(field_name)
            continue
        try:
            g.values[field_name] = _value(field_name, value)
        except ValueError as exc:
            errors.append(f"line {line}: {exc}")
    # Each event exactly as the router will check it.
    for g in groups.values():
        if not g.lines:
            continue
        try:
            decode_payload(g.kind, g.payload())
        except DecodeError as exc:
            where = _line_for(g, exc.detail)
            errors.append(f"line {where}: {g.kind} {g.key}{' at ' + g.location if g.location else ''}: {exc.detail}")
    return [g for g in groups.values() if g.lines], errors


def _line_for(g: Group, detail: str) -> int:
    """The row a decode error is about: the field it names, else the group's first row."""
    for name, line in g.line_of.items():
        if f"$.{name}" in detail or f"`{name}`" in detail:
            return line
    return g.lines[0]


def msg_id(file_digest: str, g: Group) -> str:
    """`settings:<file>:<entity>`: the same file gives the same ids; another file, other ids."""
    entity = hashlib.sha256(f"{g.kind}\0{g.key}\0{g.location}".encode()).hexdigest()[:24]
    return f"settings:{file_digest[:24]}:{entity}"


class Progress:
    """A progress bar on a terminal; elsewhere a line every 10%."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.last_shown = -1.0
        self.last_decile = -1

    def show(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        rate = done / max(now - self.started, 1e-9)
        frac = done / self.total
        if self.tty:
            if not final and now - self.last_shown < 0.1:
                return
            self.last_shown = now
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            end = "\n" if final else ""
            self.stream.write(f"\r[{bar}] {done:,}/{self.total:,} events {frac:4.0%} {rate:,.0f}/s{end}")
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile > self.last_decile or final:
                self.last_decile = decile
                self.stream.write(f"{done:,}/{self.total:,} events ({frac:.0%})\n")
                self.stream.flush()


async def _publish_one(js: Any, acks: list[Any], i: int, g: Group, mid: str) -> None:
    acks[i] = await js.publish(g.subject(), g.payload(), timeout=10.0, headers={"Nats-Msg-Id": mid})


async def publish_groups(nc: Any, groups: list[Group], digest: str, progress: Progress | None) -> tuple[int, int]:
    """JetStream-publish one event per group, `_WINDOW` awaiting their PubAck at once: (stored, duplicates)."""
    js = nc.jetstream()
    stored = duplicates = 0
    done = 0
    for start in range(0, len(groups), _WINDOW):
        chunk = groups[start : start + _WINDOW]
        acks: list[Any] = [None] * len(chunk)
        async with anyio.create_task_group() as tg:
            for i, g in enumerate(chunk):
                tg.start_soon(_publish_one, js, acks, i, g, msg_id(digest, g))
        for ack in acks:
            if ack.duplicate:
                duplicates += 1
            else:
                stored += 1
        done += len(chunk)
        if progress is not None:
            progress.show(done)
    if progress is not None:
        progress.show(done, final=True)
    return stored, duplicates


def cmd_import(args: argparse.Namespace) -> int:
    from router.cli.commands import client_setup

    path = args.file
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 (byte {exc.start})") from None
    groups, errors = parse_rows(text)
    rows = sum(len(g.lines) for g in groups)
    if errors:
        err(f"{path}: {len(errors)} bad row{'s' if len(errors) != 1 else ''}; nothing was published")
        for line in errors[:_SHOWN]:
            print(f"  {line}", file=sys.stderr)
        if len(errors) > _SHOWN:
            print(f"  ... and {len(errors) - _SHOWN} more", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: {rows:,} rows, {len(groups):,} settings events", file=sys.stderr)
    if args.dry_run or not groups:
        return EXIT_OK
    digest = hashlib.sha256(raw).hexdigest()
    cfg, server = client_setup(args)

    async def go() -> tuple[int, int]:
        async with connect(server, cfg=cfg) as nc:
            return await publish_groups(nc, groups, digest, Progress(len(groups), sys.stderr))

    started = time.monotonic()
    try:
        stored, duplicates = run_async(go)
    except TimeoutError:
        raise ClientError("a publish was not acknowledged in time: is JetStream (the EVENTS stream) up?") from None
    took = time.monotonic() - started
    print(
        f"imported {path}: {stored:,} events stored, {duplicates:,} already stored "
        f"(same file within the duplicate window), {took:.1f}s"
    )
    return EXIT_OK


# --- show -------------------------------------------------------------------------------


def format_settings(reply: dict[str, Any]) -> str:
    """What is in effect for one entity and where each value comes from."""
    kind, key = reply.get("kind"), reply.get("key")
    state = reply.get("state")
    if state is None:
        return f"{kind} {key}: not seen by the router (no events applied); the config's thresholds apply"
    out = [f"{kind} {key} (seq {reply.get('seq')})"]
    effective = state.get("effective", {})
    for name, entry in effective.items():
        out.append(f"  {name:<24} {_show(entry.get('value')):<12} from {entry.get('from')}")
    if kind == "campaign":
        for name in ("cpa_limit", "budget"):
            if name not in effective:
                out.append(f"  {name:<24} {'none':<12} (not set)")
    if kind == "sku":
        locations = state.get("locations", {})
        if locations:
            out.append("  locations:")
            for name, loc in locations.items():
                out.append(
                    f"    {name:<22} low_stock_threshold {_show(loc.get('low_stock_threshold')):<8} "
                    f"from {loc.get('low_stock_threshold_from')}"
                )
        waiting = {
            n: v for n, v in state.get("settings", {}).get("locations", {}).items() if n not in locations
        }
        if waiting:
            out.append("  set for locations not seen yet:")
            for name, v in waiting.items():
                out.append(f"    {name:<22} low_stock_threshold {_show(v.get('low_stock_threshold'))}")
    return "\n".join(out)


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


async def request_state(nc: Any, kind: str, key: str, wait_s: float) -> dict[str, Any]:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError

    subject = f"router.state.{kind}.{key}"
    try:
        reply = await nc.request(subject, b"", timeout=wait_s)
    except NoRespondersError:
        raise ClientError(f"no responder on {subject}: is the router running?") from None
    except NatsTimeoutError:
        raise ClientError(f"no reply on {subject} within {wait_s:g}s: is the router busy or stopped?") from None
    body: dict[str, Any] = json.loads(reply.data)
    if "error" in body:
        raise ClientError(f"{subject}: {body['error']}")
    return body


def cmd_show(args: argparse.Namespace) -> int:
    from router.cli.commands import client_setup

    if not KEY_RE.match(args.key):
        raise UsageError(f"key {args.key!r} is not 1-128 characters of A-Z a-z 0-9 _ -")
    cfg, server = client_setup(args)

    async def go() -> dict[str, Any]:
        async with connect(server, cfg=cfg) as nc:
            return await request_state(nc, args.kind, args.key, args.timeout)

    reply = run_async(go)
    if args.json:
        state = reply.get("state") or {}
        print(json.dumps({"settings": state.get("settings", {}), "effective": state.get("effective", {})}, indent=2))
    else:
        print(format_settings(reply))
    return EXIT_OK


# --- export -----------------------------------------------------------------------------


def rows_of(kind: str, key: str, settings: dict[str, Any]) -> Iterator[tuple[str, str, str, str, str]]:
    """CSV rows of one entity's own settings (the `settings` object of its state reply)."""
    for name in SETTINGS_FIELDS[kind]:
        if name in settings:
            yield kind, key, "", name, _cell(settings[name])
    for location, values in settings.get("locations", {}).items():
        for name, value in values.items():
            yield kind, key, location, name, _cell(value)


def _cell(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(out: TextIO, rows: Iterable[tuple[str, str, str, str, str]]) -> int:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    n = 0
    for row in rows:
        w.writerow(row)
        n += 1
    return n


def register(sub: Any, client: argparse.ArgumentParser) -> None:
    """The `settings` command and its subcommands."""
    p = sub.add_parser(
        "settings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="thresholds per SKU, location, shipment and campaign: import, show, export",
        description=(
            "Thresholds per entity are `settings` events (CONTRACT 2.4). `import` publishes them from a CSV "
            "file (kind,key,location,field,value; an empty value resets the field), `show` prints what is "
            "in effect for one entity and where each value comes from, `export` writes every entity's own "
            "settings as the same CSV."
        ),
        epilog=(
            "Examples:\n"
            "  router settings import thresholds.csv\n"
            "  router settings show sku SERUM-VITC-30\n"
            "  router settings export > thresholds.csv"
        ),
    )
    ssub = p.add_subparsers(dest="settings_command", metavar="SUBCOMMAND", required=True)
    q = ssub.add_parser(
        "import",
        parents=[client],
        help="publish a CSV of settings (every row checked first)",
        description=(
            "Check every row, report bad rows with their line numbers (nothing is published then), and "
            "publish one settings event per entity and location with a JetStream publish. The Nats-Msg-Id "
            "comes from the file's content, so importing the same file again within the EVENTS stream's "
            "duplicate window stores nothing new."
        ),
    )
    q.add_argument("file", metavar="FILE.csv", help="the CSV file ('-' reads stdin)")
    q.add_argument("--dry-run", action="store_true", help="check the file only")
    q.set_defaults(func=cmd_import)
    q = ssub.add_parser("show", parents=[client], help="what is in effect for one entity, and from where")
    q.add_argument("kind", choices=KINDS, metavar="KIND", help=f"one of {', '.join(KINDS)}")
    q.add_argument("key", metavar="KEY")
    q.add_argument("--json", action="store_true", help="print settings and effective as JSON")
    q.add_argument("--timeout", type=float, default=2.0, metavar="S", help="seconds to wait for the reply (2)")
    q.set_defaults(func=cmd_show)
    q = ssub.add_parser(
        "export", parents=[client], help="every entity's own settings as CSV (the import format)"
    )
    q.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    q.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for each page (10)")
    q.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from router.cli.commands import client_setup

    cfg, server = client_setup(args)

    async def go() -> list[tuple[str, str, str, str, str]]:
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeoutError

        rows: list[tuple[str, str, str, str, str]] = []
        after: list[str] | None = None
        async with connect(server, cfg=cfg) as nc:
            while True:
                request = json.dumps({"after": after, "limit": 1000}).encode()
                try:
                    reply = await nc.request("router.settings.list", request, timeout=args.timeout)
                except NoRespondersError:
                    raise ClientError("no responder on router.settings.list: is the router running?") from None
                except NatsTimeoutError:
                    raise ClientError(f"no reply on router.settings.list within {args.timeout:g}s") from None
                body = json.loads(reply.data)
                if "error" in body:
                    raise ClientError(f"router.settings.list: {body['error']}")
                for item in body["settings"]:
                    rows.extend(rows_of(item["kind"], item["key"], item["settings"]))
                after = body.get("next")
                if after is None:
                    return rows

    rows = run_async(go)
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="") as f:
            n = write_csv(f, rows)
        print(f"wrote {n:,} rows to {args.out}", file=sys.stderr)
    else:
        write_csv(sys.stdout, rows)
    return EXIT_OK
