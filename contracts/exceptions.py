"""The exception payload (CONTRACT.md section 3.1) and its deterministic id."""

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
