"""The query API as a NATS micro service: `nats micro ls/info/stats` find `ops-router`.

`nats.micro` (nats-py) answers the discovery subjects `$SRV.PING`, `$SRV.INFO` and
`$SRV.STATS` (each also `.ops-router` and `.ops-router.<id>`) with the service's name,
version, endpoints and per-endpoint request counts and processing times.

A micro endpoint listens in a queue group: with a shared one, a random instance would get
each request. The router's queries need every instance to see every request:
`router.state.<kind>.<key>` is answered only by the owner of the key's partition, and
`router.exceptions.open` by every instance for the partitions it runs (CONTRACT 5.1). So
each endpoint here listens in a queue group of this process alone (`ops-router-<service
id>`): the one member of its group, it gets every request, as a plain subscription would,
and the handler decides whether this instance answers. An endpoint's `num_requests`
therefore counts the requests it received, answered or left to another instance.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import structlog
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from router import __version__

log = structlog.get_logger()

NAME: Final = "ops-router"
DESCRIPTION: Final = (
    "ops-router's read-only queries: entity state, open exceptions, health, settings "
    "(CONTRACT.md sections 5 and 5.1)"
)

# (subject, payload) -> the reply's bytes, or None when another instance answers this request.
Answer = Callable[[str, bytes], Awaitable[bytes | None]]


class QueryService:
    """The `ops-router` micro service of one router process."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        # Unique to this process: every instance receives every request (see the module's doc).
        self.queue_group = f"{NAME}-{svc.id}"

    @classmethod
    async def start(
        cls, nc: NATS, instance: str, stats: Callable[[], dict[str, Any]] | None = None
    ) -> QueryService:
        """Register the service (no endpoints yet). `stats()` adds its dict to each endpoint's STATS entry."""

        def stats_handler(_endpoint: EndpointStats) -> dict[str, Any]:
            return stats() if stats is not None else {}

        svc = await add_service(
            nc,
            name=NAME,
            version=_semver(__version__),
            description=DESCRIPTION,
            metadata={"instance": instance},
            stats_handler=stats_handler,
        )
        return cls(svc)

    @property
    def id(self) -> str:
        return self.svc.id

    async def endpoint(
        self, name: str, subject: str, answer: Answer, metadata: dict[str, str] | None = None
    ) -> Subscription:
        """Answer requests on `subject` (wildcards allowed) with `answer`; returns the subscription.

        `answer` catches its own errors and says what went wrong in its reply body: an error
        escaping it would make nats.micro reply with an error header, from every instance.
        """

        async def handler(req: Request) -> None:
            body = await answer(req.subject, req.data)
            if body is not None:
                with contextlib.suppress(Exception):  # no reply subject, connection closing
                    await req.respond(body)

        await self.svc.add_endpoint(
            name=name, subject=subject, handler=handler, queue_group=self.queue_group, metadata=metadata
        )
        # nats.micro keeps the endpoint's subscription to itself; the router hands it to its
        # protocol parser for requests whose subject is not valid UTF-8 (router.jetstream.parser).
        sub: Subscription | None = self.svc._endpoints[-1]._subscription
        assert sub is not None
        return sub

    async def stop(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0), contextlib.suppress(Exception):
            await self.svc.stop()


def _semver(version: str) -> str:
    """nats.micro wants a semantic version; a PEP 440 local or dev version is turned into one."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(.*)$", version)
    if m is None:
        return "0.0.0"
    rest = re.sub(r"[^0-9A-Za-z.-]", "-", m.group(4).lstrip(".+-"))
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" + (f"-{rest}" if rest else "")
