"""Every open exception the routers hold now (CONTRACT.md section 5.1), all partitions, all pages."""

from __future__ import annotations

from typing import Any, Final

import structlog
from nats.aio.client import Client as NATS

log = structlog.get_logger()

PAGE: Final = 1000
WAIT_S: Final = 5.0


async def all_open(
    nc: NATS, filters: dict[str, Any] | None = None, wait_s: float = WAIT_S
) -> list[dict[str, Any]] | None:
    """The open exceptions (raise payloads) matching `filters`, or None when not every partition
    answered (then the caller must not take anything missing as closed)."""
    try:
        from router.engine.open_gather import GatherError, gather_open
    except ImportError:  # (a router without the open-exceptions index)
        return None
    out: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        request: dict[str, Any] = {**(filters or {}), "limit": PAGE}
        if after:
            request["after"] = after
        try:
            reply = await gather_open(nc, request, wait_s=wait_s)
        except GatherError as exc:
            log.info("oncall_open_set_unavailable", error=str(exc))
            return None
        except Exception as exc:  # the connection away, a reply not as the contract says
            log.info("oncall_open_set_unavailable", error=repr(exc))
            return None
        out.extend(e for e in reply.get("open", []) if isinstance(e, dict))
        after = reply.get("next")
        if not after:
            return out
