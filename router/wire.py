"""A NATS protocol parser for nats-py that walks its buffer by offset instead of deleting from its front.

nats-py's parser removes every parsed control line and payload from the front of its
bytearray, which moves the rest of the buffer (up to 32 KiB) twice per message. At a hundred
thousand messages a second that memmove is a measurable share of a core. This parser
handles MSG and HMSG, the only frequent operations, by offset and compacts the buffer once
per read; anything else (INFO, PING, PONG, +OK, -ERR) goes to nats-py's own parser,
unchanged. The calls into the client are exactly nats-py's: `_process_msg(sid, subject,
reply, payload, headers)` with the same types, in wire order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    AWAITING_MSG_PAYLOAD,
    MAX_CONTROL_LINE_SIZE,
    Parser,
)

_CRLF: Final = b"\r\n"


class FastParser(Parser):
    """Drop-in replacement for `nats.protocol.parser.Parser` (set as `client._ps` before connect).

    `handlers` maps a subscription id to a plain function that takes its messages directly
    (subject, reply, payload, parsed headers), in wire order, instead of nats-py's client.
    """

    def __init__(self, nc: Any = None) -> None:
        super().__init__(nc)
        self.handlers: dict[int, Callable[[bytes, bytes, bytes, dict[str, str] | None], None]] = {}

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        pos = 0
        try:
            while True:
                n = len(buf)
                if pos >= n:
                    break
                if self.state == AWAITING_CONTROL_LINE:
                    if buf.startswith(b"MSG ", pos):
                        header = False
                    elif buf.startswith(b"HMSG ", pos):
                        header = True
                    else:
                        # A rare operation: let nats-py's parser handle the rest of the buffer.
                        del buf[:pos]
                        pos = 0
                        await Parser.parse(self)
                        return
                    end = buf.find(_CRLF, pos, pos + MAX_CONTROL_LINE_SIZE)
                    if end < 0:
                        if n - pos > MAX_CONTROL_LINE_SIZE:
                            del buf[:pos]
                            pos = 0
                            await Parser.parse(self)  # raises nats' own protocol error
                            return
                        break
                    args = bytes(buf[pos + (5 if header else 4) : end]).split()
                    try:
                        if header:
                            # HMSG <subject> <sid> [reply] <header bytes> <total bytes>
                            if len(args) == 5:
                                subject, sid, reply, hsize, size = args
                            else:
                                subject, sid, hsize, size = args
                                reply = b""
                            self.header_needed = int(hsize)
                        else:
                            # MSG <subject> <sid> [reply] <bytes>
                            if len(args) == 4:
                                subject, sid, reply, size = args
                            else:
                                subject, sid, size = args
                                reply = b""
                            self.header_needed = 0
                        self.needed = int(size)
                        self.msg_arg = {"subject": subject, "sid": int(sid), "reply": reply}
                    except ValueError:
                        del buf[:pos]
                        pos = 0
                        await Parser.parse(self)  # raises nats' "malformed MSG"
                        return
                    pos = end + 2
                    self.state = AWAITING_MSG_PAYLOAD
                else:  # AWAITING_MSG_PAYLOAD
                    needed = self.needed
                    if n - pos < needed + 2:
                        break
                    hlen = self.header_needed
                    if hlen:
                        hdr: bytes | None = bytes(buf[pos : pos + hlen])
                        payload = bytes(buf[pos + hlen : pos + needed])
                        self.header_needed = 0
                    else:
                        hdr = None
                        payload = bytes(buf[pos : pos + needed])
                    pos += needed + 2
                    self.state = AWAITING_CONTROL_LINE
                    arg = self.msg_arg
                    handler = self.handlers.get(arg["sid"])
                    if handler is not None:
                        handler(
                            arg["subject"], arg["reply"], payload, await self.nc._process_headers(hdr) if hdr else None
                        )
                        continue
                    await self.nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, hdr)
                    if self.buf is not buf:
                        return  # the client reset the parser (reconnect): this buffer is gone
        finally:
            if pos and self.buf is buf:
                del buf[:pos]
