"""A NATS client on a raw socket, as a hostile one would be: it sends whatever bytes it is given.

nats-py encodes subjects as UTF-8 strings and so cannot send a subject that is not valid
UTF-8, while nats-server takes any bytes but white space in a subject. This client writes
the protocol lines itself, byte for byte. Async (anyio), so that a router running in the
same event loop goes on while it waits.
"""

from __future__ import annotations

import re
from types import TracebackType

import anyio
import anyio.abc

from tests.support.natsserver import HOST

_MSG = re.compile(rb"MSG (\S+) (\S+) (?:(\S+) )?(\d+)\Z")


class RawClient:
    """`async with RawClient(port) as c:`; `pub`, `hpub`, `sub`, `flush`, `next_msg`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.buf = b""
        self.received: list[tuple[bytes, bytes]] = []  # messages read while waiting for a PONG
        self._stream: anyio.abc.SocketStream | None = None

    async def __aenter__(self) -> RawClient:
        self._stream = await anyio.connect_tcp(HOST, self.port)
        await self._line()  # INFO
        await self.send(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"name":"raw"}\r\n')
        await self.flush()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def send(self, raw: bytes) -> None:
        assert self._stream is not None
        await self._stream.send(raw)

    async def pub(self, subject: bytes, payload: bytes = b"", reply: bytes = b"") -> None:
        head = b"PUB " + subject + (b" " + reply if reply else b"") + b" %d\r\n" % len(payload)
        await self.send(head + payload + b"\r\n")

    async def hpub(self, subject: bytes, headers: bytes, payload: bytes = b"", reply: bytes = b"") -> None:
        head = b"HPUB " + subject + (b" " + reply if reply else b"")
        head += b" %d %d\r\n" % (len(headers), len(headers) + len(payload))
        await self.send(head + headers + payload + b"\r\n")

    async def sub(self, subject: bytes, sid: int) -> None:
        await self.send(b"SUB " + subject + b" %d\r\n" % sid)

    async def flush(self, timeout: float = 10.0) -> None:
        """PING and wait for the PONG: the server has processed everything sent before."""
        await self.send(b"PING\r\n")
        with anyio.fail_after(timeout):
            while True:
                line = await self._line()
                if line == b"PONG":
                    return
                await self._other(line)

    async def next_msg(self, timeout: float = 10.0) -> tuple[bytes, bytes]:
        """(subject, payload) of the next MSG."""
        with anyio.fail_after(timeout):
            while not self.received:
                await self._other(await self._line())
        return self.received.pop(0)

    async def _other(self, line: bytes) -> None:
        if line == b"PING":
            await self.send(b"PONG\r\n")
        elif line.startswith(b"MSG "):
            m = _MSG.match(line)
            assert m is not None, line
            self.received.append((m.group(1), await self._exactly(int(m.group(4)))))
        elif line.startswith(b"-ERR"):
            raise RuntimeError(line.decode("utf-8", "replace"))

    async def _fill(self) -> None:
        assert self._stream is not None
        self.buf += await self._stream.receive()

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            await self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self.buf) < size + 2:
            await self._fill()
        payload, self.buf = self.buf[:size], self.buf[size + 2 :]
        return payload
