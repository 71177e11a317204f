"""Subject parsing and event decoding, with the dead-letter reasons of CONTRACT.md section 4."""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from contracts.events import DECODERS, EVENT_TYPES, KEY_RE, KINDS
from contracts.times import skew_text, to_us

BAD_SUBJECT: Final = "bad_subject"
MALFORMED: Final = "malformed"
INVALID: Final = "invalid"
UNKNOWN_TYPE: Final = "unknown_type"
ACTOR_ERROR: Final = "actor_error"

_PARTITION_RE: Final = re.compile(r"[0-9]+\Z")
_KINDS: Final = frozenset(KINDS)


class DecodeError(Exception):
    """An event the router cannot apply: `code` is the Router-Error header, `detail` one line."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.subject = ""


def parse_subject(subject: str) -> tuple[str, str]:
    """(kind, key) of `events.<kind>.<key>` or `events.<partition>.<kind>.<key>`."""
    tokens = subject.split(".")
    n = len(tokens)
    if tokens[0] == "events" and (
        n == 3 or (n == 4 and _PARTITION_RE.match(tokens[1]) is not None)
    ):
        kind, key = tokens[-2], tokens[-1]
        if kind in _KINDS and KEY_RE.match(key) is not None:
            return kind, key
        if kind not in _KINDS:
            raise DecodeError(BAD_SUBJECT, f"unknown kind {kind!r} in subject {subject!r}")
        raise DecodeError(
            BAD_SUBJECT, f"key {key!r} in subject {subject!r} is not 1-128 of A-Z a-z 0-9 _ -"
        )
    raise DecodeError(
        BAD_SUBJECT, f"subject {subject!r} is not events.<kind>.<key> (or events.<partition>.<kind>.<key>)"
    )


class Rejected(msgspec.Struct, frozen=True, gc=False):
    """Why a stored subject is dead-lettered: the reason alone. A caught DecodeError holds its
    traceback and through it the frames of the call (about 1.7 KB each), too much to keep
    for every distinct bad subject a cache has seen."""

    subject: str  # as read_subject gives it: bytes that are not UTF-8 escaped
    code: str
    detail: str


StoredSubject = tuple[str, str, str, tuple[str, str]]


def read_subject(subject: bytes) -> StoredSubject | Rejected:
    """(subject, kind, key, (kind, key)) of a subject as stored in EVENTS, or why it is a
    `bad_subject`. Bytes that are not valid UTF-8 are escaped (`events.sku.\\xff`): such a
    subject is always bad, as no kind or key may hold a backslash."""
    text = subject.decode("utf-8", "backslashreplace")
    try:
        kind, key = parse_subject(text)
    except DecodeError as err:
        return Rejected(text, err.code, err.detail)
    return (text, kind, key, (kind, key))


def subject_kind_token(subject: str) -> str:
    """The subject's kind token when it is one of the three kinds, else `unknown`."""
    tokens = subject.split(".")
    if len(tokens) >= 2 and tokens[0] == "events":
        i = 2 if len(tokens) >= 3 and _PARTITION_RE.match(tokens[1]) else 1
        if i < len(tokens) and tokens[i] in _KINDS:
            return tokens[i]
    return "unknown"


# JSON nested deeper than this is `malformed` (CONTRACT section 4 leaves it open). A fixed
# limit, checked before msgspec, makes the outcome the same for every caller: msgspec's own
# limit is Python's recursion limit, which counts the caller's stack frames.
MAX_DEPTH: Final = 64
_STRINGS: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_ONLY_BRACKETS: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


def maybe_deep(data: bytes) -> bool:
    """True when `data` has more than MAX_DEPTH brackets (two byte counts: cheap enough for every message)."""
    return len(data) > MAX_DEPTH and data.count(b"[") + data.count(b"{") > MAX_DEPTH


def nested_too_deep(data: bytes) -> bool:
    """True when the JSON in `data` nests arrays and objects deeper than MAX_DEPTH levels."""
    brackets = _STRINGS.sub(b"", data).translate(_ONLY_BRACKETS, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH):  # each pass removes the innermost level
        if not brackets:
            return False
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):
            return False  # unbalanced: msgspec says what is wrong
        brackets = inner
    return bool(brackets)


def decode_payload(kind: str, data: bytes) -> Any:
    """Decode one payload for `kind`; raise DecodeError with the first reason that applies."""
    if maybe_deep(data) and nested_too_deep(data):
        raise DecodeError(MALFORMED, f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return _decode_payload(kind, data)
    except RecursionError:  # not reached within MAX_DEPTH; never a crash all the same
        raise DecodeError(MALFORMED, "JSON nested too deeply") from None


def _decode_payload(kind: str, data: bytes) -> Any:
    try:
        event = DECODERS[kind].decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(kind, data, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(MALFORMED, _one_line(str(exc))) from None
    except UnicodeDecodeError:
        # msgspec raises this bare for invalid UTF-8 inside a string field it decodes.
        raise DecodeError(MALFORMED, _utf8_detail(data)) from None
    if not data.isascii():
        # msgspec does not check the UTF-8 of fields it skips.
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(MALFORMED, f"invalid UTF-8 at byte {exc.start}") from None
    return event


def _classify(kind: str, data: bytes, detail: str) -> DecodeError:
    """Order the reasons as the contract does: malformed, then the `type` field, then fields."""
    try:
        obj = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return DecodeError(MALFORMED, _one_line(str(exc)))
    if not isinstance(obj, dict):
        return DecodeError(MALFORMED, f"payload is a JSON {_json_type(obj)}, not an object")
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return DecodeError(MALFORMED, f"invalid UTF-8 at byte {exc.start}")
    etype = obj.get("type")
    if etype is None:
        return DecodeError(INVALID, "Object missing required field `type`")
    if not isinstance(etype, str):
        return DecodeError(INVALID, f"Expected `str`, got `{_json_type(etype)}` - at `$.type`")
    if etype not in EVENT_TYPES[kind]:
        return DecodeError(UNKNOWN_TYPE, f"unknown {kind} event type {etype!r} - at `$.type`")
    return DecodeError(INVALID, _one_line(detail))


def _utf8_detail(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    return "invalid UTF-8"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else type(value).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def decode_event(subject: str, data: bytes) -> tuple[str, str, Any]:
    """(kind, key, event) of one stored message, or DecodeError."""
    kind, key = parse_subject(subject)
    return kind, key, decode_payload(kind, data)


def future_ts(ts_us: int, stream_us: int, max_skew_us: int) -> str | None:
    """The `invalid` detail for an event time more than `max_skew_us` ahead of the event's
    JetStream timestamp (CONTRACT section 2, `[rules] max_future_skew`), else None."""
    ahead = ts_us - stream_us
    if ahead > max_skew_us:
        return f"`$.ts` is {skew_text(ahead)} ahead of the stream time"
    return None


def ingest_subject(kind: str, key: str) -> str:
    """`events.<kind>.<key>` for a kind and key given apart (an HTTP path), or DecodeError
    `bad_subject`: the subject check of `parse_subject`, with no token able to hide a dot
    (`events.7.sku.X` from kind `7` and key `sku.X` would pass as a partitioned subject)."""
    for what, token in (("kind", kind), ("key", key)):
        if "." in token or not token:
            raise DecodeError(BAD_SUBJECT, f"{what} {token!r} is not one subject token (1-128 of A-Z a-z 0-9 _ -)")
    subject = f"events.{kind}.{key}"
    parse_subject(subject)
    return subject


def check_ingest(kind: str, key: str, data: bytes, receipt_us: int, max_skew_us: int) -> Any:
    """The event a producer sends over HTTP, checked as the router checks it when stored
    (CONTRACT section 7): the subject, the payload (section 2 and 4's first reason), and the
    future-`ts` guard against the time of receipt. DecodeError says why not."""
    ingest_subject(kind, key)
    event = decode_payload(kind, data)
    ts = event.ts
    if ts is not None:
        detail = future_ts(to_us(ts), receipt_us, max_skew_us)
        if detail is not None:
            raise DecodeError(INVALID, detail.replace("the stream time", "the time of receipt"))
    return event
