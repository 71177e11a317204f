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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

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


class FastParser(Parser):
    """Drop-in replacement for `nats.protocol.parser.Parser` (set as `client._ps` before connect).

    `handlers` maps a subscription id to a plain function that takes its messages directly
    (subject, reply, payload, parsed headers), in wire order, instead of nats-py's client.
    """

    def __init__(self, nc: Any = None) -> None:
        super().__init__(nc)
        self.handlers: dict[int, Callable[[bytes, bytes, bytes, dict[str, str] | None], None]] = {}

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
                buf.extend(data[pos : line_end + 2])
                pos = line_end + 2
                await Parser.parse(self)
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
            if handler is not None:
                handler(subject, reply or b"", payload, await self.nc._process_headers(hdr) if hdr else None)
                continue
            await self.nc._process_msg(sid_n, subject, reply or b"", payload, hdr)
            if self.buf is not buf:
                return  # the client reset the parser (reconnect): this read is gone
        if pos < n:
            buf.extend(data[pos:])
