"""A loopback TCP proxy whose connections a test can cut: connection loss with the server still up."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_port`; `cut()` drops every open connection at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._conns: set[anyio.abc.SocketStream] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def cut(self) -> None:
        """Abort every connection in both directions, as a network failure would."""
        self.cuts += 1
        conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.aclose()

    async def _pipe(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(Exception):
            async for chunk in src:
                await dst.send(chunk)
        with contextlib.suppress(Exception):
            await dst.aclose()
        with contextlib.suppress(Exception):
            await src.aclose()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                server = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return
            async with server:
                self._conns |= {client, server}
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pipe, client, server)
                        tg.start_soon(self._pipe, server, client)
                finally:
                    self._conns -= {client, server}


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(target_port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy._handle)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()


__all__: list[Any] = ["TcpProxy", "tcp_proxy"]
