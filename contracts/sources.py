"""Partner payloads mapped onto contract events by configuration: `[sources.<name>]`.

Pure code (no I/O). A partner (a carrier's tracking webhook, a WMS or a shop's inventory
push) posts its own JSON to `POST /sources/<name>`; its table says how to read it:

    [sources.aftership]
    each = "$.msg.checkpoints[*]"         # one event per element (optional)
    kind = "shipment"                     # a literal, or a path: "$.kind"
    key = "$.msg.tracking_number"         # a path, or a template: "AS-{$.msg.id}"
    type = "@.tag"                        # the partner's status word
    types = { InTransit = "in_transit", Delivered = "delivered", InfoReceived = "" }
    fields = { ts = "@.checkpoint_time", location = "@.location" }
    time_format = "rfc3339"               # or "epoch_s", "epoch_ms", or a strptime pattern
    idempotency_key = "{$.msg.id}:{@.checkpoint_time}:{@.tag}"
    signature_header = "aftership-hmac-sha256"
    signature_encoding = "base64"
    secret_env = "AFTERSHIP_WEBHOOK_SECRET"

Values are read with a small JSONPath: `$` is the whole payload, `@` the element of `each`
(the whole payload without `each`), then `.name`, `["name"]` and `[n]` (negative from the
end); `[*]` in `each` walks every element of an array (several walk nested arrays, `@` then
being the innermost element). A value that is one path gives the JSON value as it is (a
missing one leaves the field out); a value with `{...}` parts is a template and gives a
string (a part is a path, `header:<Name>` for a request header, or `index`, the element's
number); any other string is a literal, and so are numbers and booleans in `fields`.

`types` maps each partner word to an event type; an empty type skips that element (an
"info received" scan that is no movement). A word missing from the table, a missing key, a
value of the wrong type: the payload cannot be mapped (`MappingError`), and the router keeps
it in DEADLETTER instead of storing any of its events.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from contracts.times import rfc3339, to_us

# Fields of the contract that hold times: `time_format` applies to them.
TIME_FIELDS: Final = frozenset({"ts", "eta", "promised_by"})
_ZONE_RE: Final = re.compile(r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})\Z")
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_HEADER_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # an HTTP header name (token)
_MISSING: Final = object()
_EPOCH_UNITS: Final = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}

Scalar = str | int | float | bool


class MappingError(Exception):
    """A payload the source's mapping cannot turn into valid events; the message says why and where."""


class SourceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One `[sources.<name>]` table (see the module's text)."""

    kind: str
    key: str
    type: str
    types: dict[str, str] = {}
    each: str = ""
    fields: dict[str, Scalar] = {}
    time_format: str = "rfc3339"
    time_zone: str = ""  # for times written without an offset, e.g. "+05:30" or "Z"
    idempotency_key: str = ""
    signature_header: str = ""
    signature_encoding: Literal["hex", "base64"] = "hex"
    signature_prefix: str = ""  # stripped from the header's value first, e.g. "sha256="
    secret: str | None = None
    secret_file: str | None = None
    secret_env: str | None = None


EXAMPLE: Final = (
    'e.g. [sources.carrier] kind = "shipment", key = "$.tracking_number", type = "$.status", '
    'types = { in_transit = "in_transit", delivered = "delivered" }, fields = { ts = "$.occurred_at" }'
)

# --- paths ------------------------------------------------------------------------------------

_SEGMENT_RE: Final = re.compile(
    r"\.(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)"
    r"|\[(?:(?P<index>-?[0-9]+)|(?P<star>\*)|\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)')\]"
)
Segment = str | int | None  # a name, an index, or None for [*]


class Path(msgspec.Struct, frozen=True):
    root: str  # "$" or "@"
    segments: tuple[Segment, ...]
    text: str

    def read(self, doc: Any, item: Any) -> Any:
        """The value at this path, or _MISSING (no wildcards here)."""
        node = doc if self.root == "$" else item
        for seg in self.segments:
            if isinstance(seg, str):
                if not isinstance(node, dict) or seg not in node:
                    return _MISSING
                node = node[seg]
            elif isinstance(seg, int):
                if not isinstance(node, list) or not -len(node) <= seg < len(node):
                    return _MISSING
                node = node[seg]
        return node


def parse_path(text: str, *, wildcards: bool = False) -> Path:
    """A path of `$` or `@` and segments; ValueError says what is wrong."""
    if not text or text[0] not in "$@":
        raise ValueError(f"{text!r} is not a path: it starts with $ (the payload) or @ (the element of each)")
    pos = 1
    segments: list[Segment] = []
    while pos < len(text):
        m = _SEGMENT_RE.match(text, pos)
        if m is None:
            raise ValueError(f"{text!r} is not a path: cannot read {text[pos:]!r} (use .name, [\"name\"], [0] or [*])")
        if m.group("star") is not None:
            if not wildcards:
                raise ValueError(f"{text!r}: [*] is only for `each`")
            segments.append(None)
        elif m.group("index") is not None:
            segments.append(int(m.group("index")))
        else:
            segments.append(m.group("name") or m.group("dq") or m.group("sq") or "")
        pos = m.end()
    return Path(text[0], tuple(segments), text)


def walk(path: Path, doc: Any) -> list[tuple[Any, str]]:
    """The elements `each` names, with where each is (`$.msg.checkpoints[2]`); a path that does
    not end in [*] walks the array it names. MappingError when there is no such array."""
    segments = path.segments if path.segments and path.segments[-1] is None else (*path.segments, None)
    nodes: list[tuple[Any, str]] = [(doc, "$")]
    for seg in segments:
        out: list[tuple[Any, str]] = []
        for node, where in nodes:
            if seg is None:
                if not isinstance(node, list):
                    raise MappingError(f"`{where}` is not an array (each = {path.text!r})")
                out.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
            else:
                value = Path("$", (seg,), "").read(node, None)
                label = f"{where}.{seg}" if isinstance(seg, str) else f"{where}[{seg}]"
                if value is _MISSING:
                    raise MappingError(f"`{label}` is missing (each = {path.text!r})")
                out.append((value, label))
        nodes = out
    return nodes


# --- values: paths, templates, literals ---------------------------------------------------------


class Value(msgspec.Struct, frozen=True):
    """A compiled mapping value: a path (the JSON value), a template (a string), or a literal."""

    path: Path | None = None
    parts: tuple[str | Path | tuple[str, str], ...] = ()  # text, a path, ("header", name) or ("index", "")
    literal: Any = None
    uses_item: bool = False

    def get(self, doc: Any, item: Any, index: int, headers: Mapping[str, str]) -> Any:
        if self.path is not None:
            return self.path.read(doc, item)
        if not self.parts:
            return self.literal
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Path):
                out.append(_as_text(part.read(doc, item), part.text))
            elif part[0] == "index":
                out.append(str(index))
            else:
                value = headers.get(part[1].lower())
                if value is None:
                    raise MappingError(f"header {part[1]} is missing")
                out.append(value)
        return "".join(out)


def _as_text(value: Any, where: str) -> str:
    if value is _MISSING or value is None:
        raise MappingError(f"`{where}` is missing")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise MappingError(f"`{where}` is a JSON {'array' if isinstance(value, list) else 'object'}, not a value")


def compile_value(value: Scalar) -> Value:
    """ValueError names what is wrong with a path or template."""
    if not isinstance(value, str):
        return Value(literal=value)
    if value[:1] in ("$", "@") and "{" not in value:
        path = parse_path(value)
        return Value(path=path, uses_item=path.root == "@")
    if "{" not in value and "}" not in value:
        return Value(literal=value)
    parts: list[str | Path | tuple[str, str]] = []
    pos, text, uses_item = 0, "", False
    while pos < len(value):
        c = value[pos]
        if value.startswith(("{{", "}}"), pos):
            text += c
            pos += 2
        elif c == "{":
            end = value.find("}", pos)
            if end < 0:
                raise ValueError(f"{value!r}: a {{ without its }} (write {{{{ for a brace)")
            inner = value[pos + 1 : end].strip()
            if text:
                parts.append(text)
                text = ""
            if inner == "index":
                parts.append(("index", ""))
                uses_item = True
            elif inner.startswith("header:"):
                name = inner[7:].strip()
                if not _HEADER_RE.match(name):
                    raise ValueError(f"{value!r}: {name!r} is not a header name")
                parts.append(("header", name))
            else:
                path = parse_path(inner)
                uses_item = uses_item or path.root == "@"
                parts.append(path)
            pos = end + 1
        elif c == "}":
            raise ValueError(f"{value!r}: a }} without its {{ (write }}}} for a brace)")
        else:
            text += c
            pos += 1
    if text:
        parts.append(text)
    return Value(parts=tuple(parts), uses_item=uses_item)


# --- times -------------------------------------------------------------------------------------


def _time(value: Any, fmt: str, zone: str, where: str) -> Any:
    """A time field's value in RFC 3339 (an RFC 3339 value with an offset is kept byte for byte)."""
    if fmt in _EPOCH_UNITS:
        number: float | int
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", value):
            number = float(value) if "." in value else int(value)
        else:
            raise MappingError(f"`{where}`: {value!r} is not a number of {fmt[6:]} since the epoch")
        return rfc3339(round(number * _EPOCH_UNITS[fmt]))
    if not isinstance(value, str):
        raise MappingError(f"`{where}`: {value!r} is not a time string")
    if fmt == "rfc3339":
        if _ZONE_RE.search(value) or not zone:
            return value  # without a zone: the contract's check says it is invalid
        return value + zone
    try:
        parsed = _dt.datetime.strptime(value, fmt)
    except ValueError:
        raise MappingError(f"`{where}`: {value!r} does not match time_format {fmt!r}") from None
    if parsed.tzinfo is None:
        if not zone:
            raise MappingError(f"`{where}`: {value!r} has no offset (set time_zone, e.g. \"+05:30\")")
        parsed = _dt.datetime.fromisoformat(parsed.isoformat() + zone.replace("z", "Z"))
    return rfc3339(to_us(parsed))


# --- the mapping --------------------------------------------------------------------------------


class Mapped(msgspec.Struct, frozen=True):
    """One event a payload maps to: where it goes, its bytes, its idempotency key (or None)."""

    kind: str
    key: str
    data: bytes
    idempotency_key: str | None
    where: str  # the element it came from, for messages


class SourceMapping(msgspec.Struct, frozen=True):
    name: str
    each: Path | None
    kind: Value
    key: Value
    type: Value
    types: dict[str, str]
    fields: tuple[tuple[str, Value], ...]
    time_format: str
    time_zone: str
    idempotency_key: Value | None

    def apply(self, doc: Any, headers: Mapping[str, str]) -> list[Mapped]:
        """The events of one parsed payload; MappingError when it cannot be mapped (none then)."""
        items = walk(self.each, doc) if self.each is not None else [(doc, "$")]
        out: list[Mapped] = []
        for index, (item, where) in enumerate(items):
            try:
                event = self._one(doc, item, index, headers, where)
            except MappingError as exc:
                raise MappingError(f"{exc} (element {where})" if self.each is not None else str(exc)) from None
            if event is not None:
                out.append(event)
        return out

    def _one(self, doc: Any, item: Any, index: int, headers: Mapping[str, str], where: str) -> Mapped | None:
        word = self.type.get(doc, item, index, headers)
        word_text = _as_text(word, _where(self.type, "type"))
        if self.types:
            if word_text not in self.types:
                known = ", ".join(sorted(self.types))[:300]
                raise MappingError(f"status {word_text!r} is not in sources.{self.name}.types ({known})")
            etype = self.types[word_text]
            if not etype:
                return None  # mapped to nothing on purpose
        else:
            etype = word_text
        kind = _as_text(self.kind.get(doc, item, index, headers), _where(self.kind, "kind"))
        key = _as_text(self.key.get(doc, item, index, headers), _where(self.key, "key"))
        event: dict[str, Any] = {"type": etype}
        for name, value in self.fields:
            got = value.get(doc, item, index, headers)
            if got is _MISSING or got is None:
                continue
            if name in TIME_FIELDS:
                got = _time(got, self.time_format, self.time_zone, _where(value, name))
            event[name] = got
        idem = None
        if self.idempotency_key is not None:
            idem = idempotency_text(self.name, _as_text(self.idempotency_key.get(doc, item, index, headers), "idempotency_key"))
        return Mapped(kind, key, msgspec.json.encode(event), idem, where)


def _where(value: Value, name: str) -> str:
    return value.path.text if value.path is not None else name


# An idempotency key (CONTRACT section 7): 1-128 printable ASCII characters.
IDEMPOTENCY_RE: Final = re.compile(r"[\x20-\x7e]{1,128}\Z")


def idempotency_text(source: str, value: str) -> str:
    """`<source>:<value>`, or `<source>:sha256:<hex>` when that is no 1-128 printable ASCII."""
    text = f"{source}:{value}"
    if IDEMPOTENCY_RE.match(text):
        return text
    return f"{source}:sha256:{hashlib.sha256(value.encode()).hexdigest()}"


_EXAMPLES: Final = {
    "kind": 'kind = "shipment" or kind = "$.kind"',
    "key": 'key = "$.tracking_number" or key = "SHOP-{$.inventory_item_id}"',
    "type": 'type = "$.status" or type = "counted"',
    "idempotency_key": 'idempotency_key = "{header:X-Shopify-Webhook-Id}"',
}


def compile_source(name: str, src: SourceConfig) -> SourceMapping:
    """The source's mapping, checked: ValueError's message starts with the key's path."""

    def one(key: str, value: Scalar) -> Value:
        try:
            return compile_value(value)
        except ValueError as exc:
            field = key.rpartition(".")[2]
            example = _EXAMPLES.get(key, f'{field} = "$.{field}" or {field} = "AT-{{$.{field}}}"')
            raise ValueError(f"sources.{name}.{key}: {exc}, e.g. {example}") from None

    each = None
    if src.each:
        try:
            each = parse_path(src.each, wildcards=True)
        except ValueError as exc:
            raise ValueError(f'sources.{name}.each: {exc}, e.g. each = "$.msg.checkpoints[*]"') from None
    fields = []
    for field, value in src.fields.items():
        if field == "type":
            raise ValueError(f'sources.{name}.fields.type: the type comes from `type` (and `types`), e.g. type = "$.status"')
        fields.append((field, one(f"fields.{field}", value)))
    for key, etype in src.types.items():
        if etype and not re.fullmatch(r"[a-z_]{1,64}", etype):
            raise ValueError(f'sources.{name}.types.{key}: {etype!r} is not an event type, e.g. {key} = "in_transit"')
    if src.time_format not in ("rfc3339", *_EPOCH_UNITS) and "%" not in src.time_format:
        raise ValueError(
            f'sources.{name}.time_format: {src.time_format!r} is not "rfc3339", "epoch_s", "epoch_ms", "epoch_us" '
            'or a strptime pattern, e.g. time_format = "%Y-%m-%d %H:%M:%S%z"'
        )
    if src.time_zone and not _ZONE_RE.fullmatch(src.time_zone):
        raise ValueError(f'sources.{name}.time_zone: {src.time_zone!r} is not an offset, e.g. time_zone = "+05:30"')
    idem = one("idempotency_key", src.idempotency_key) if src.idempotency_key else None
    if idem is not None and each is not None and not idem.uses_item:
        raise ValueError(
            f"sources.{name}.idempotency_key: with `each`, the key must differ per element (use @ or {{index}}), "
            'e.g. idempotency_key = "{header:X-Delivery-Id}:{index}"'
        )
    if src.signature_header and not _HEADER_RE.match(src.signature_header):
        raise ValueError(
            f'sources.{name}.signature_header: {src.signature_header!r} is not a header name, '
            'e.g. signature_header = "X-Shopify-Hmac-Sha256"'
        )
    return SourceMapping(
        name=name,
        each=each,
        kind=one("kind", src.kind),
        key=one("key", src.key),
        type=one("type", src.type),
        types=dict(src.types),
        fields=tuple(fields),
        time_format=src.time_format,
        time_zone=src.time_zone,
        idempotency_key=idem,
    )


# --- signatures --------------------------------------------------------------------------------


def signature(secret: bytes, body: bytes, encoding: str) -> str:
    """The HMAC-SHA256 of `body`, as a partner writes it (hex or base64)."""
    digest = hmac.new(secret, body, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def signature_ok(secret: bytes, body: bytes, given: str | None, encoding: str, prefix: str = "") -> bool:
    """Whether `given` (a header's value) is the HMAC-SHA256 of the raw body, compared in constant time."""
    if given is None:
        return False
    text = given.strip()
    if prefix:
        if not text.startswith(prefix):
            return False
        text = text[len(prefix) :]
    try:
        got = bytes.fromhex(text) if encoding == "hex" else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, hmac.new(secret, body, hashlib.sha256).digest())


def body_id(source: str, body: bytes) -> str:
    """The Nats-Msg-Id of an unmapped payload's dead letter: a retry of the same body is stored once."""
    return f"unmapped:{source}:sha256-{hashlib.sha256(body).hexdigest()}"


__all__ = [
    "EXAMPLE",
    "IDEMPOTENCY_RE",
    "Mapped",
    "MappingError",
    "SourceConfig",
    "SourceMapping",
    "body_id",
    "compile_source",
    "signature",
    "signature_ok",
]
