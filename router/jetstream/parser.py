"""A NATS protocol parser for nats-py that hands a partition's messages straight to it.

nats-py's parser removes every parsed control line and payload from the front of its
bytearray, which moves the rest of the buffer (up to 32 KiB) twice per message, and builds a
Msg and a callback task for each. At a hundred thousand messages a second both are a
measurable share of a core. This parser walks each read as one bytes object (a message's
control line is one regex match, its subject, reply and payload single-copy slices) and
gives the messages of subscriptions in `handlers` to their handler, in wire order. Any other
line (INFO, PING, PONG, +OK, -ERR) goes to nats-py's own parser, alone, and the messages of
other subscriptions to nats-py's client, with exactly nats-py's call: `_process_msg(sid,
subject, reply, payload, headers)`.

Every byte the server can deliver is handled here, because an exception out of `parse` ends
nats-py's read loop without a reconnect: the connection then looks alive and delivers nothing
until the stale-connection check fires, minutes later. nats-py decodes a message's subject
and reply subject as strict UTF-8 (`Client._build_message`) and a status line's code and
description too (`Client._process_headers`); a client may publish any bytes but white space
in a subject. So a message for nats-py whose subject or reply is not valid UTF-8 goes to the
subscription's entry in `refusals` (where the router answers a request with an error) or is
dropped, counted in `dropped`; a handler or nats-py that still raises for one message loses
that message alone; and a control line nats-py cannot take becomes a ProtocolError, on which
nats-py reconnects.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

_CRLF: Final = b"\r\n"
# MSG <subject> <sid> [reply] <bytes> and HMSG <subject> <sid> [reply] <header bytes> <total
# bytes>, as nats-server writes them (one space apart); then, for any other spacing, nats-py's
# own patterns (nats.protocol.parser), anchored by `match` at an offset instead of by \A: every
# line nats-py takes for a message, this parser takes too.
_MSG: Final = re.compile(rb"MSG ([^ \t\r\n]+) ([0-9]+) (?:([^ \t\r\n]+) )?([0-9]+)\r\n")
_HMSG: Final = re.compile(rb"HMSG ([^ \t\r\n]+) ([0-9]+) (?:([^ \t\r\n]+) )?([0-9]+) ([0-9]+)\r\n")
_ANY_MSG: Final = re.compile(rb"MSG\s+([^\s]+)\s+([^\s]+)\s+(?:([^\s]+)[^\S\r\n]+)?(\d+)\r\n")
_ANY_HMSG: Final = re.compile(rb"HMSG\s+([^\s]+)\s+([^\s]+)\s+(?:([^\s]+)[^\S\r\n]+)?([\d]+)\s+(\d+)\r\n")
# A dropped message is logged at most this often (with the count since the last line): a
# client sending bad subjects in a loop must not flood the log.
LOG_EVERY_S: Final = 10.0

log = structlog.get_logger()

Handler = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]
# Given (subject, reply) of a message whose subject or reply is not valid UTF-8: True when it
# answered it, False when it could not (the message then counts as dropped).
Refusal = Callable[[bytes, bytes], Awaitable[bool]]


def is_utf8(b: bytes) -> bool:
    """Whether `b` is valid UTF-8 (strict: no surrogates, no overlong forms)."""
    if b.isascii():
        return True
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def escape(b: bytes) -> str:
    """`b` as text, any byte that is not valid UTF-8 as a `\\xNN` escape (for logs and headers)."""
    return b.decode("utf-8", "backslashreplace")


class FastParser(Parser):
    """Drop-in replacement for `nats.protocol.parser.Parser` (set as `client._ps` before connect).

    `handlers` maps a subscription id to a plain function that takes its messages directly
    (subject, reply, payload, parsed headers), in wire order, instead of nats-py's client.
    `refusals` maps a subscription id on nats-py's path to what to do with a message whose
    subject or reply subject is not valid UTF-8 (called with both, as bytes); without one,
    such a message is dropped. `dropped` counts the messages dropped.
    """

    def __init__(self, nc: Any = None) -> None:
        super().__init__(nc)
        self.handlers: dict[int, Handler] = {}
        self.refusals: dict[int, Refusal] = {}
        # Subscriptions whose handler takes the header block as it came (bytes), unparsed:
        # nats-py's header parser costs ~80 us a message (the cluster copy's restore reads 100k).
        self.raw_headers: set[int] = set()
        self.dropped = 0
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0

    async def parse(self, data: bytes = b"") -> None:
        # Each read is walked as one immutable bytes object: a control line is one regex match,
        # and subject, reply and payload are single-copy slices of it. What is left of an
        # incomplete frame waits in self.buf for the next read.
        if self.state != AWAITING_CONTROL_LINE:  # never: nats-py's parser only gets lines without payload
            await Parser.parse(self, data)
            return
        buf = self.buf
        if buf:
            buf.extend(data)
            data = bytes(buf)
            buf.clear()
        n = len(data)
        pos = 0
        handlers = self.handlers
        match_msg = _MSG.match
        while pos < n:
            m = match_msg(data, pos) or _ANY_MSG.match(data, pos)
            if m is not None:
                subject, sid, reply, size = m.groups()
                start = m.end()
                end = start + int(size)
                hdr: bytes | None = None
            elif (m := _HMSG.match(data, pos) or _ANY_HMSG.match(data, pos)) is not None:
                subject, sid, reply, hsize, size = m.groups()
                start = m.end()
                end = start + int(size)
                hdr = data[start : start + int(hsize)]
                start += len(hdr)
            else:
                # One line without a payload (PING, PONG, +OK, -ERR, INFO of any length): nats-py's
                # parser takes that line alone. Given the rest of the read too, it would hand
                # the messages after it to the client, not to their handlers.
                line_end = data.find(_CRLF, pos)
                if line_end < 0:
                    break  # the rest of the line is still to come
                line = data[pos : line_end + 2]
                pos = line_end + 2
                if not is_utf8(line):  # nats-py decodes -ERR and INFO lines strictly
                    line = line.decode("utf-8", "replace").encode()
                buf.extend(line)
                try:
                    await Parser.parse(self)
                except ProtocolError:
                    raise
                except Exception as exc:  # INFO that is not JSON, a callback's defect: reconnect
                    raise ProtocolError(f"nats: unreadable line from the server: {exc!r}") from exc
                if self.buf is not buf:
                    return  # the client reset the parser (reconnect): this read is gone
                if buf:  # a line nats-py's parser neither took nor refused (a long unknown one)
                    raise ProtocolError("nats: unknown protocol")
                continue
            if end + 2 > n:
                break  # the payload is still to come
            pos = end + 2
            try:
                sid_n = int(sid)
            except ValueError:  # nats-py's own pattern takes any word for the sid
                raise ProtocolError("nats: malformed MSG") from None
            payload = data[start:end]
            handler = handlers.get(sid_n)
            # (A try block costs nothing in Python 3.11 until something raises.)
            if handler is not None:
                try:
                    if hdr and sid_n not in self.raw_headers:
                        handler(subject, reply or b"", payload, await self._headers(hdr, sid_n, subject, reply))
                    else:
                        handler(subject, reply or b"", payload, hdr)  # type: ignore[arg-type]
                except Exception as exc:  # a defect for one message must not end the read loop
                    self._drop("handler_failed", sid_n, subject, reply, exc)
                continue
            if not (subject.isascii() and (reply is None or reply.isascii())) and not (
                is_utf8(subject) and (reply is None or is_utf8(reply))
            ):
                await self._refuse(sid_n, subject, reply or b"")
            else:
                if hdr is not None and hdr[8:9] == b" " and not hdr.isascii():
                    # An inline status (NATS/1.0 <code>) nats-py decodes strictly: when it cannot, the
                    # message goes on without its headers.
                    hdr = hdr if await self._headers(hdr, sid_n, subject, reply) is not None else None
                try:
                    await self.nc._process_msg(sid_n, subject, reply or b"", payload, hdr)
                except Exception as exc:
                    self._drop("message_failed", sid_n, subject, reply, exc)
            if self.buf is not buf:
                return  # the client reset the parser (reconnect): this read is gone
        if pos < n:
            buf.extend(data[pos:])

    async def _headers(self, hdr: bytes, sid: int, subject: bytes, reply: bytes | None) -> dict[str, str] | None:
        try:
            headers: dict[str, str] | None = await self.nc._process_headers(hdr)
        except Exception as exc:  # a status line that is not UTF-8: the message is delivered, its headers not
            self._drop("headers_unreadable", sid, subject, reply, exc, lost=False)
            return None
        return headers

    async def _refuse(self, sid: int, subject: bytes, reply: bytes) -> None:
        refusal = self.refusals.get(sid)
        if refusal is None:
            self._drop("bad_subject", sid, subject, reply, None)
            return
        try:
            answered = await refusal(subject, reply)
        except Exception as exc:
            self._drop("refusal_failed", sid, subject, reply, exc)
        else:
            if not answered:
                self._drop("bad_subject", sid, subject, reply, None)

    def _drop(
        self, what: str, sid: int, subject: bytes, reply: bytes | None, exc: Exception | None, *, lost: bool = True
    ) -> None:
        """Count a message not delivered (or delivered without its headers); log at most every LOG_EVERY_S."""
        if lost:
            self.dropped += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S:
            return
        log.warning(
            "message_dropped" if lost else what,
            reason=what,
            sid=sid,
            subject=escape(subject)[:256],
            reply=escape(reply or b"")[:256],
            error=repr(exc)[:300] if exc is not None else None,
            since_last_line=self._unlogged,
        )
        self._logged_at = now
        self._unlogged = 0
