"""`router.exceptions.open` (CONTRACT 5.1): the request, its cursor, and one instance's answer.

`parse_request` checks a request (empty, or a JSON object of filters) and is shared by the
handler and by `router.engine.open_gather`, so a client finds a bad filter before asking.
`answer` is one instance's reply for the partitions it runs now; `counts` the grouped counts
the page and the metrics show. Both read the stored open set (snapshots.open_index) with the
changes not yet stored laid over it (router.engine.open_index): no actor is loaded.

The cursor (`next`, `after`) is opaque to clients: the base64url of the JSON array of the
last entry's sort key [kind, key, rule, location or ""]. Every instance answers with the
entries after that key in the same order, so paging works across instances.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgspec

from contracts import KEY_RE
from contracts.rules import RULES, SEVERITY
from router.engine.open_index import View, effective
from snapshots import Store
from snapshots import open_index as stored

if TYPE_CHECKING:
    from router.engine.partition import Partition

SUBJECT: Final = "router.exceptions.open"
DEFAULT_LIMIT: Final = 200
MAX_LIMIT: Final = 1000
KINDS: Final = ("sku", "shipment", "campaign")
SEVERITIES: Final = ("critical", "warning")
FILTERS: Final = ("kind", "rule", "key", "location", "severity")
FIELDS: Final = (*FILTERS, "limit", "after")
# Groupings `counts` offers (the page's board, the metrics' gauge).
BOARD: Final = ("severity", "kind", "rule", "location")
BY_RULE: Final = ("kind", "rule")

SortKey = tuple[str, str, str, str]  # kind, key, rule, location ('' for none)
Row = tuple[str, str, str, str, str, str]  # kind, key, rule, location, severity, payload

_DECODE_OBJ: Final = msgspec.json.Decoder(dict[str, Any])
_CURSOR: Final = msgspec.json.Decoder(tuple[str, str, str, str])
_ENC: Final = msgspec.json.Encoder()


class BadRequest(ValueError):
    """A request the contract does not allow; its message is the reply's `error`."""


@dataclass(frozen=True, slots=True)
class Request:
    filters: dict[str, str] = field(default_factory=dict)
    limit: int = DEFAULT_LIMIT
    after: SortKey | None = None

    def as_json(self) -> dict[str, Any]:
        """The request as a client sends it (`after` as a cursor)."""
        out: dict[str, Any] = dict(self.filters)
        out["limit"] = self.limit
        if self.after is not None:
            out["after"] = encode_cursor(self.after)
        return out


def encode_cursor(key: SortKey) -> str:
    return base64.urlsafe_b64encode(_ENC.encode(list(key))).rstrip(b"=").decode()


def decode_cursor(text: str) -> SortKey:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return _CURSOR.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise BadRequest(f"`after`: {text[:40]!r} is not a cursor (the `next` of a previous reply)") from None


def sort_key(entry: Mapping[str, Any]) -> SortKey:
    """The reply order of an entry (a payload of CONTRACT 3.1): kind, key, rule, location (null first)."""
    return (entry["kind"], entry["key"], entry["rule"], entry.get("location") or "")


def _valid_location(text: str) -> bool:
    return 1 <= len(text) <= 128 and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def parse_request(data: bytes | str | Mapping[str, Any] | None) -> Request:
    """The request of `data` (empty, or a JSON object of filters); BadRequest saying what and where.

    A filter given as null is no filter (as in an event payload, null is the same as absent).
    """
    if data is None:
        return Request()
    if isinstance(data, Mapping):
        obj: Mapping[str, Any] = data
    else:
        text = data.encode() if isinstance(data, str) else bytes(data)
        if not text.strip():
            return Request()
        try:
            obj = _DECODE_OBJ.decode(text)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"expected empty or a JSON object of filters ({', '.join(FIELDS)}): {exc}") from None
    unknown = sorted(str(k) for k in obj if k not in FIELDS)
    if unknown:
        raise BadRequest(f"unknown filter {unknown[0]!r} (known: {', '.join(FIELDS)})")
    filters: dict[str, str] = {}
    for name in FILTERS:
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(f"`{name}`: expected a string, got {type(value).__name__} {value!r:.40}")
        if name == "kind" and value not in KINDS:
            raise BadRequest(f"`kind`: {value!r:.40} is not a kind (one of {', '.join(KINDS)})")
        if name == "rule" and value not in SEVERITY:
            raise BadRequest(f"`rule`: {value!r:.40} is not a rule (one of {', '.join(r.name for r in RULES)})")
        if name == "severity" and value not in SEVERITIES:
            raise BadRequest(f"`severity`: {value!r:.40} is not a severity (one of {', '.join(SEVERITIES)})")
        if name == "key" and KEY_RE.match(value) is None:
            raise BadRequest(f"`key`: {value!r:.40} is not a key (1-128 of A-Z a-z 0-9 _ -)")
        if name == "location" and not _valid_location(value):
            raise BadRequest(f"`location`: {value!r:.40} is not a location (1-128 characters, no control characters)")
        filters[name] = value
    limit = obj.get("limit")
    if limit is None:
        limit = DEFAULT_LIMIT
    elif isinstance(limit, bool) or not isinstance(limit, int):
        raise BadRequest(f"`limit`: expected an integer 1-{MAX_LIMIT}, got {limit!r:.40}")
    elif not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"`limit`: {limit} is outside 1-{MAX_LIMIT}")
    after = obj.get("after")
    if after is not None and not isinstance(after, str):
        raise BadRequest(f"`after`: expected a cursor string (the `next` of a previous reply), got {after!r:.40}")
    return Request(filters, limit, decode_cursor(after) if after else None)


def _matches(row: Sequence[str], filters: Mapping[str, str]) -> bool:
    # row: kind, key, rule, location, severity, payload
    return all(row[stored.COLUMNS.index(name)] == value for name, value in filters.items())


async def _views(partitions: Sequence[Partition], store: Store) -> list[View]:
    """Every partition's changes at one moment (no await in between), and which of the stored
    entities that can finish did finish since they were written."""
    finishing = await stored.finishing_keys(store, [p.index for p in partitions])
    return [p.snapshots.open_view(finishing[p.index]) for p in partitions]


async def answer(partitions: Sequence[Partition], store: Store, partition_count: int, req: Request) -> bytes:
    """The reply (encoded) for `partitions`, the ones this instance runs now.

    The stored rows of the keys with changes not stored yet are left out of the stored page and
    replaced by the keys' entries now (`effective`); the stored count is corrected the same way."""
    owned = sorted(p.index for p in partitions)
    views = await _views(partitions, store)
    keys = [k for v in views for k in v.keys]
    after = req.after
    # Enough stored rows to fill the page whatever the keys' own entries turn out to be.
    rows, of_keys, stored_total = await stored.page(store, owned, req.filters, after, req.limit + 1, keys)
    overlay = [e for e in effective(views, of_keys) if _matches(e, req.filters)]
    total = stored_total - sum(1 for r in of_keys if _matches(r, req.filters)) + len(overlay)
    found: list[Row] = [tuple(r) for r in rows]  # type: ignore[misc]
    found += [e for e in overlay if after is None or (e[0], e[1], e[2], e[3]) > after]
    found.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    more = len(found) > req.limit
    page = found[: req.limit]
    nxt = encode_cursor((page[-1][0], page[-1][1], page[-1][2], page[-1][3])) if more and page else None
    reply = {
        "open": [msgspec.Raw(e[5].encode()) for e in page],
        "total": total,
        "next": nxt,
        "partitions": owned,
        "partition_count": partition_count,
    }
    return _ENC.encode(reply)


async def counts(
    partitions: Sequence[Partition], store: Store, by: Sequence[str] = BOARD
) -> dict[tuple[str | None, ...], int]:
    """Open exceptions of `partitions` counted by the columns `by` (any of kind, key, rule,
    location, severity, in any order; location None for rules without one), from the stored
    open set and the changes not stored yet: {(values...): count}, zero counts left out."""
    views = await _views(partitions, store)
    keys = [k for v in views for k in v.keys]
    found, of_keys = await stored.groups(store, sorted(p.index for p in partitions), by, keys)
    loc = by.index("location") if "location" in by else -1
    out: dict[tuple[str | None, ...], int] = {}
    for values, n in found:
        out[_group(values, loc)] = n
    idx = [stored.COLUMNS.index(c) for c in by]
    for sign, entries in ((-1, of_keys), (1, effective(views, of_keys))):
        for e in entries:
            g = _group(tuple(e[i] for i in idx), loc)
            n = out.get(g, 0) + sign
            if n:
                out[g] = n
            else:
                out.pop(g, None)
    return out


def _group(values: tuple[str, ...], loc: int) -> tuple[str | None, ...]:
    if loc < 0 or values[loc]:
        return values
    return (*values[:loc], None, *values[loc + 1 :])
