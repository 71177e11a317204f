"""The on-call sink: one worker per configured target, a status file and a status subject.

Two ways to run it (both take `[oncall]` of the same config):
- `router oncall --config PATH`: a process of its own (`run_sink`), next to one or more routers;
- inside `router run` (`service`, given to `router.engine.daemon.run` as a service) when `[oncall]`
  names a target and `in_router` is true (the default).
Either way one sink runs per deployment: `<data>/oncall/oncall.lock` refuses a second one that
shares the data folder, and a sink that finds another one active on `router.oncall.sinks` (two
starting at once: the lower id wins) stands by, asking again every few seconds, and takes over
once that one is gone (several routers with `[oncall]`, or a spare `router oncall`). A sink that
takes over on another machine starts from its own data folder: a first start there folds what
EXCEPTIONS holds without sending and then sends what is open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets as secrets_module
import socket
from typing import Any

import anyio
import httpx
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from contracts.config import Config
from contracts.secrets import redact
from router.engine.daemon import Service
from router.errors import FatalError
from router.jetstream.connection import connect_options
from router.jetstream.embedded import read_url_file
from router.oncall.state import TargetState
from router.oncall.status import STATUS_SUBJECT, SinkStatus, TargetStatus, oncall_dir
from router.oncall.targets import make_targets
from router.oncall.worker import Worker
from router.pidlock import PidLock, PidLockBusy
from router.secrets import resolve_all

log = structlog.get_logger()

STATUS_EVERY_S = 1.0
# Every sink answers on this subject ({"id", "role": claiming|active|standby, "folder"}), so that
# only one runs per deployment: the others stand by and take over once it is gone.
SINKS_SUBJECT = "router.oncall.sinks"
CLAIM_WAIT_S = 0.5
STANDBY_RETRY_S = 5.0


async def _nats_url(cfg: Config) -> str:
    """The configured URL; with the embedded server, the URL the running router wrote (waited for)."""
    url = cfg.nats.url.strip()
    if url != "embedded":
        return url
    warned = False
    while True:
        recorded = read_url_file(cfg.data_dir)
        if recorded:
            return recorded
        if not warned:
            log.warning("oncall_waiting_for_router", reason="no embedded server URL yet",
                        file=str(cfg.data_dir / "nats.url"))
            warned = True
        await anyio.sleep(1.0)


async def _connect(cfg: Config, url: str) -> NATS:
    async def disconnected() -> None:
        log.warning("oncall_nats_disconnected", url=redact(url))

    async def reconnected() -> None:
        log.info("oncall_nats_reconnected", url=redact(url))

    async def error(exc: Exception) -> None:
        log.debug("oncall_nats_error", error=repr(exc))

    opts = connect_options(cfg, url, name="ops-router-oncall", disconnected_cb=disconnected,
                           reconnected_cb=reconnected, error_cb=error)
    opts.update(max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=3, allow_reconnect=True)
    while True:
        nc = NATS()
        try:
            with anyio.fail_after(15):
                await nc.connect(**opts)
            return nc
        except Exception as exc:
            log.warning("oncall_cannot_connect", url=redact(url), error=repr(exc))
            with contextlib.suppress(Exception):
                await nc.close()
            await anyio.sleep(2.0)


async def run_sink(cfg: Config, url: str | None = None, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Run the sink until cancelled. FatalError: another sink holds the data folder, or nothing to do."""
    oncall = cfg.oncall
    if not oncall.targets():
        raise FatalError(
            "[oncall] names no target: set alertmanager, [oncall.pagerduty] routing_key or [oncall.webhook] url"
        )
    secrets = resolve_all(cfg)
    # httpx logs every request at info; the sink logs what matters (retries, refusals) itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    folder = oncall_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = PidLock(folder / "oncall.lock")
    except PidLockBusy as exc:
        raise FatalError(f"another on-call sink runs on {folder} (pid {exc.holder}): run one per deployment") from None
    sink_id = f"{socket.gethostname()}:{os.getpid()}:{secrets_module.token_hex(3)}"
    status = SinkStatus(sink_id=sink_id)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lock.release)
        nc = await _connect(cfg, url or await _nats_url(cfg))
        stack.push_async_callback(_close, nc)
        role = {"role": "claiming"}

        async def who(msg: Msg) -> None:
            if msg.reply:
                await msg.respond(json.dumps({"id": sink_id, "role": role["role"], "folder": str(folder)}).encode())

        stack.push_async_callback(_unsubscribe, await nc.subscribe(SINKS_SUBJECT, cb=who))
        announced = False
        while (other := await _claim(nc, sink_id)) is not None:
            role["role"] = "standby"
            if not announced:
                log.warning("oncall_standby", other_sink=other, retry_s=STANDBY_RETRY_S,
                            advice="one on-call sink per deployment; this one takes over when that one is gone")
                task_status.started()  # (`router run` goes on; this sink waits its turn)
                task_status = anyio.TASK_STATUS_IGNORED
                announced = True
            await anyio.sleep(STANDBY_RETRY_S)
            role["role"] = "claiming"
        role["role"] = "active"
        client = await stack.enter_async_context(httpx.AsyncClient())
        workers: list[Worker] = []
        for target in make_targets(oncall, client, secrets):
            state = await TargetState.open(folder / f"{target.name}.db")
            stack.push_async_callback(state.close)
            status.targets[target.name] = TargetStatus()
            workers.append(Worker(target, state, nc, cfg.streams.exceptions, oncall, status.targets[target.name]))

        async def answer(msg: Msg) -> None:
            if msg.reply:
                await msg.respond(json.dumps(status.as_json()).encode())

        sub = await nc.subscribe(STATUS_SUBJECT, cb=answer)
        stack.push_async_callback(_unsubscribe, sub)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_status_loop, status, folder)
            for w in workers:
                await tg.start(w.run)
            log.info("oncall_started", targets=[w.target.name for w in workers], folder=str(folder))
            task_status.started()


async def _claim(nc: NATS, sink_id: str) -> str | None:
    """None when this sink may run: no other sink is active, and every other one claiming now has a
    higher id (two starting at once: the lower id runs). Else the id of the one that runs."""
    replies: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            body = json.loads(msg.data)
            if isinstance(body, dict):
                replies.append(body)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(SINKS_SUBJECT, b"", reply=inbox)
        await anyio.sleep(CLAIM_WAIT_S)  # every sink connected answers within this window
    finally:
        await _unsubscribe(sub)
    others = [r for r in replies if r.get("id") != sink_id and r.get("role") in ("active", "claiming")]
    for r in others:
        if r.get("role") == "active" or str(r.get("id")) < sink_id:
            return str(r.get("id"))
    return None


async def _status_loop(status: SinkStatus, folder: Any) -> None:
    while True:
        try:
            status.write(folder)
        except OSError as exc:
            log.debug("oncall_status_not_written", error=str(exc))
        await anyio.sleep(STATUS_EVERY_S)


async def _unsubscribe(sub: Any) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await sub.unsubscribe()


async def _close(nc: NATS) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), contextlib.suppress(Exception):
        await nc.close()


def oncall_service(cfg: Config) -> Service | None:
    """The sink as a service of `router run` (see router.engine.daemon.run), or None when `[oncall]`
    names no target or says `in_router = false`. It opens its own connection to the router's
    server, starts once the runtime is open and is cancelled when the router stops."""
    if not cfg.oncall.configured or not cfg.oncall.in_router:
        return None
    resolve_all(cfg)  # a routing key's or signing secret's file or variable missing: fails the start

    async def service(rt: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        await run_sink(rt.cfg, rt.url, task_status=task_status)

    return service
