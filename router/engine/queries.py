"""Live read-only queries: `router.state.<kind>.<key>`, `router.exceptions.open`, `router.health`,
`router.settings.list`: the endpoints of the `ops-router` NATS micro service."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS

import actors
from actors import Thresholds
from contracts import KEY_RE
from router.engine import open_query
from router.engine.micro import QueryService
from router.engine.partition import Partition
from router.engine.settings_list import settings_page
from router.health import Health
from router.jetstream.parser import Refusal, escape, is_utf8
from router.jetstream.streams import partition_of
from snapshots import Store, StoreDamagedError

log = structlog.get_logger()
_ENC = msgspec.json.Encoder()


async def state_reply(
    partitions: Sequence[Partition], store: Store, thresholds: Thresholds, kind: str, key: str
) -> dict[str, Any]:
    """The section-5 reply for one key: live state when resident, else the stored one.

    `partitions` are those this instance runs (any subset of the configured count, in any
    order); the stored state of a key whose partition is not among them may be stale: ask
    its owner (`router.state.*` is answered only by the owner)."""
    part = partition_for(partitions, key)
    state = part.resident.get((kind, key)) if part is not None else None
    if state is None:
        found = await store.load_actors([(kind, key)])
        item = found.get((kind, key))
        state = actors.decode_state(kind, item[1]) if item is not None else None
    if state is None or state.seq == 0:
        return {"kind": kind, "key": key, "seq": 0, "state": None, "exceptions": []}
    mod = actors.ACTORS[kind]
    return {"kind": kind, "key": key, "seq": state.seq, "state": mod.view(state, thresholds), "exceptions": mod.raised(state)}


async def open_reply(partitions: Sequence[Partition], store: Store, data: bytes) -> bytes:
    """The `router.exceptions.open` reply of this instance for `partitions` (the ones it runs now):
    CONTRACT 5.1's object, or `{"error": ...}` for a request the contract does not allow."""
    try:
        req = open_query.parse_request(data)
        return await open_query.answer(partitions, store, partitions[0].cfg.router.partitions, req)
    except open_query.BadRequest as exc:
        return _ENC.encode({"error": str(exc)})
    except Exception as exc:
        log.error("open_query_failed", error=repr(exc))
        return _ENC.encode({"error": f"open exceptions query failed: {exc!r}"})


def partition_for(partitions: Sequence[Partition], key: str) -> Partition | None:
    """The running partition of `key` among `partitions`, or None when this instance does not run it."""
    if not partitions:
        return None
    index = partition_of(key, partitions[0].cfg.router.partitions)
    for p in partitions:
        if p.index == index:
            return p
    return None


async def serve_queries(
    nc: NATS,
    partitions: Sequence[Partition],
    store: Store,
    thresholds: Thresholds,
    health: Callable[[], Health],
    refuse_bad_subjects: Callable[[Any, Refusal], None],
    on_store_damaged: Callable[[StoreDamagedError], None],
    owns: Callable[[int], bool],
    instance: str,
    *,
    partition_count: int | None = None,
    task_status: Any = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer `router.state.<kind>.<key>`, `router.exceptions.open`, `router.health` and
    `router.settings.list` until cancelled, as the endpoints of the `ops-router` micro service
    (router.engine.micro: every instance receives every request, and decides here whether it answers).

    `router.exceptions.open` is answered by every instance that runs partitions, each for those
    it runs (router.engine.open_gather puts the replies together).

    Only the owner of a key's partition (`owns`) answers for it (the owner of partition 0 for a
    malformed subject and for `router.settings.list`), so a standby stays silent and a request
    gets one reply. `router.health` is answered by the owner of partition 0,
    `router.health.<instance>` always.

    `refuse_bad_subjects(sub, refusal)` hands a subscription's requests whose subject is not
    valid UTF-8 to `refusal` (see router.jetstream.parser). A store found damaged while
    answering goes to `on_store_damaged` (the daemon moves it aside and rebuilds)."""
    count = partition_count if partition_count is not None else len(partitions)

    async def on_state(subject: str, _data: bytes) -> bytes | None:
        tokens = subject.split(".")
        valid = len(tokens) == 4 and tokens[2] in actors.ACTORS and KEY_RE.match(tokens[3]) is not None
        if not owns(partition_of(tokens[3], count) if valid else 0):
            return None
        if not valid:
            body: dict[str, Any] = {
                "error": f"expected router.state.<sku|shipment|campaign>.<key>, got {subject!r}"
            }
        else:
            try:
                body = await state_reply(partitions, store, thresholds, tokens[2], tokens[3])
            except Exception as exc:
                log.error("state_query_failed", subject=subject, error=repr(exc))
                if isinstance(exc, StoreDamagedError):
                    on_store_damaged(exc)
                body = {"error": f"state query failed: {exc!r}"}
        return _ENC.encode(body)

    async def refuse(subject: bytes, reply: bytes) -> bool:
        """A request whose subject is not valid UTF-8: answered with an error when its reply subject is."""
        if not reply or not is_utf8(reply) or not owns(0):
            return False
        body = {
            "error": f"expected router.state.<sku|shipment|campaign>.<key>, got '{escape(subject)}'"
            " (not valid UTF-8)"
        }
        await nc.publish(reply.decode(), _ENC.encode(body))
        return True

    async def on_health(subject: str, _data: bytes) -> bytes | None:
        if subject != "router.health" or owns(0):
            return _ENC.encode(health())
        return None

    async def on_settings_list(_subject: str, data: bytes) -> bytes | None:
        if not owns(0):
            return None
        try:
            body = await settings_page(partitions, store, data)
        except Exception as exc:
            log.error("settings_list_failed", error=repr(exc))
            body = {"error": f"settings list failed: {exc!r}"}
        return _ENC.encode(body)

    async def on_open(_subject: str, data: bytes) -> bytes | None:
        running = [p for p in list(partitions) if owns(p.index)]
        if not running:
            return None  # (standing by: the owners answer)
        return await open_reply(running, store, data)

    def stats() -> dict[str, Any]:
        """Added to each endpoint's `$SRV.STATS` entry: who answers what."""
        return {"instance": instance, "partitions": [p.index for p in list(partitions) if owns(p.index)]}

    service = await QueryService.start(nc, instance, stats)
    subs = [
        await service.endpoint("state", "router.state.>", on_state, {"answers": "the owner of the key's partition"}),
        # Every instance answers for the partitions it runs (CONTRACT 5.1).
        await service.endpoint(
            "exceptions-open", open_query.SUBJECT, on_open, {"answers": "every instance, for its partitions"}
        ),
        await service.endpoint("health", "router.health", on_health, {"answers": "the owner of partition 0"}),
        await service.endpoint("health-instance", f"router.health.{instance}", on_health, {"answers": "this instance"}),
        await service.endpoint(
            "settings-list", "router.settings.list", on_settings_list, {"answers": "the owner of partition 0"}
        ),
    ]
    refuse_bad_subjects(subs[0], refuse)
    task_status.started()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await service.stop()
