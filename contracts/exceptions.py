"""The exception payload (CONTRACT.md section 3.1) and the deterministic ids of every effect.

An effect's `Nats-Msg-Id` names its cause, so a restart can tell which effects of an event it
did not acknowledge are stored already and the streams' duplicate windows drop a retry:

- an exception: `exception_id` (`<kind>:<key>:<rule>:<location>:<status>:<cause>`);
- a message to another actor: `message_id` (`msg:<kind>:<key>:<cause>:<type>:<to kind>:<to key>`);
- a dead letter: `dead_letter_id` (`dead:<seq>`).

The cause is the event's stream sequence, or `timer_cause` for a timer firing. `effect_cause`
reads it back.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

Number = Union[int, float]


class ExceptionEvent(msgspec.Struct, frozen=True, omit_defaults=False):
    """Published on `exceptions.<kind>.<rule>.<key>` into EXCEPTIONS."""

    id: str
    kind: str
    key: str
    rule: str
    status: Literal["raised", "cleared"]
    severity: Literal["critical", "warning"]
    location: str | None
    value: Number | None
    threshold: Number | None
    seq: int | None
    event_ts: str
    detected_at: str
    message: str


def exception_id(kind: str, key: str, rule: str, location: str | None, status: str, cause: str) -> str:
    """`<kind>:<key>:<rule>:<location or empty>:<status>:<cause>`."""
    return f"{kind}:{key}:{rule}:{location or ''}:{status}:{cause}"


def timer_cause(deadline_us: int) -> str:
    """`t<deadline in epoch ms>`, microseconds floored to whole milliseconds."""
    return f"t{deadline_us // 1000}"


def exception_subject(kind: str, rule: str, key: str) -> str:
    return f"exceptions.{kind}.{rule}.{key}"


def message_id(kind: str, key: str, cause: str, event_type: str, to_kind: str, to_key: str) -> str:
    """`msg:<kind>:<key>:<cause>:<event type>:<target kind>:<target key>`: an actor's message to another."""
    return f"msg:{kind}:{key}:{cause}:{event_type}:{to_kind}:{to_key}"


def dead_letter_id(seq: int) -> str:
    """`dead:<seq>`: the dead letter of the event at stream sequence `seq`."""
    return f"dead:{seq}"


HEADER_OVERHEAD = len("NATS/1.0\r\n\r\n")


def header_bytes(headers: dict[str, str]) -> int:
    """The size of `headers` on the wire (`NATS/1.0`, one `Name: value` line each, the blank line)."""
    return HEADER_OVERHEAD + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def fit_dead_letter(data: bytes, headers: dict[str, str], max_payload: int) -> bytes:
    """The bytes of a dead letter that fit the server's maximum payload with `headers`: when the
    whole does not fit, adds `Router-Truncated: <original length>` to `headers` and cuts the
    bytes (CONTRACT section 4)."""
    hdr_len = header_bytes(headers)
    if len(data) + hdr_len <= max_payload:
        return data
    trunc = str(len(data))
    headers["Router-Truncated"] = trunc
    hdr_len += len("Router-Truncated") + len(trunc) + 4
    return data[: max(0, max_payload - hdr_len - 64)]


def effect_cause(msg_id: str) -> int | None:
    """The event sequence an effect's `Nats-Msg-Id` names (None for a timer's or a foreign id)."""
    if msg_id.startswith("dead:"):
        cause = msg_id[5:]
    elif msg_id.startswith("msg:"):
        parts = msg_id.split(":")
        cause = parts[3] if len(parts) > 3 else ""
    else:
        cause = msg_id.rpartition(":")[2]
    return int(cause) if cause.isdigit() else None
