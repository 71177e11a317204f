"""Run the router in-process against a real nats-server, and wait for what it must do."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import nats

from contracts.config import Config, config_from_dict, duration_us
from contracts.times import rfc3339
from router.engine.daemon import Runtime, wall_clock_us
from tests.support.oracle import Expected, Stored, expected_reply, fold, read_stream


def now_us() -> int:
    """The wall clock in epoch microseconds."""
    return time.time_ns() // 1000


def timed_event(kind: str, key: str, ts_us: int | None = None, **payload: Any) -> tuple[str, bytes]:
    """(subject, payload) of one event, with `ts` at `ts_us` when given (else the stream's time)."""
    if ts_us is not None:
        payload["ts"] = rfc3339(ts_us)
    return f"events.{kind}.{key}", json.dumps(payload).encode()


def make_config(url: str, data_dir: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "nats": {"url": url},
        "snapshots": {"path": str(data_dir / "router.db"), "every": "200ms"},
        "log": {"level": "warning"},
        "http": {"listen": "127.0.0.1:0"},  # never the default 127.0.0.1:8080 (tests run in parallel)
    }
    for name, values in sections.items():
        if name == "rules":
            raw["rules"] = values
        else:
            raw.setdefault(name, {}).update(values)
    return config_from_dict(raw, base_dir=str(data_dir))


@asynccontextmanager
async def running_router(cfg: Config, clock: Callable[[], int] = wall_clock_us) -> AsyncIterator[Runtime]:
    """The router serving in this process; stopped gracefully (final snapshot) on exit."""
    async with Runtime.open(cfg, clock) as rt, anyio.create_task_group() as tg:
        await tg.start(rt.serve)
        try:
            yield rt
        finally:
            rt.request_stop()


async def wait_for(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0, what: str = "") -> None:
    with anyio.fail_after(timeout):
        while True:
            r = check()
            if not isinstance(r, bool):
                r = await r
            if r:
                return
            await anyio.sleep(0.05)


async def all_applied(jsm: Any, cfg: Config, applied: list[int], stream_last: int) -> bool:
    """Whether the partitions (their `applied` sequences) applied everything through `stream_last`.

    One partition applies the whole stream. Of several, each has only its share: then its
    consumer must have delivered all it holds and had every delivery acknowledged (the router
    acknowledges once an event's effects are confirmed).
    """
    if len(applied) == 1:
        return applied[0] >= stream_last
    from router.jetstream.streams import consumer_name

    for i in range(len(applied)):
        info = await jsm.consumer_info(cfg.streams.events, consumer_name(cfg, i))
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def wait_applied(rt: Runtime, stream_last: int, timeout: float = 30.0) -> None:
    """Until every partition applied through `stream_last` and all effects are confirmed."""

    async def done() -> bool:
        return (
            rt.publisher.outstanding == 0
            and not any(p.outbox.inflight for p in rt.partitions)
            and await all_applied(rt.jsm, rt.cfg, [p.applied_seq for p in rt.partitions], stream_last)
        )

    await wait_for(done, timeout)


async def stream_last_seq(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jsm().stream_info(stream)
        return int(info.state.last_seq or 0)
    finally:
        await nc.close()


async def publish_all(url: str, messages: list[tuple[str, bytes]]) -> None:
    """Plain core publishes, as `nats pub` does (no headers), then a flush."""
    nc = await nats.connect(url)
    try:
        for subject, data in messages:
            await nc.publish(subject, data)
        await nc.flush()
    finally:
        await nc.close()


async def settle(url: str, cfg: Config, rt: Runtime, timeout: float = 60.0) -> None:
    """Until the router has applied everything in EVENTS, including the actor messages it sent."""
    with anyio.fail_after(timeout):
        while True:
            last = await stream_last_seq(url, cfg.streams.events)
            await wait_applied(rt, last, timeout)
            await anyio.sleep(0.1)
            if await stream_last_seq(url, cfg.streams.events) == last:
                return


async def query_state(url: str, kind: str, key: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        reply = await nc.request(f"router.state.{kind}.{key}", b"", timeout=5)
        return json.loads(reply.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


def normalize(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


async def check_against_fold(url: str, cfg: Config, rt: Runtime | None = None) -> Expected:
    """EXCEPTIONS, DEADLETTER and actor messages hold exactly what a fold of EVENTS implies."""
    from actors import Thresholds

    events = await read_stream(url, cfg.streams.events)
    exp = fold(events, Thresholds.from_rules(cfg.rules), duration_us(cfg.rules.max_future_skew))
    exceptions = await read_stream(url, cfg.streams.exceptions)
    got_ids = Counter(json.loads(m.data)["id"] for m in exceptions)
    event_caused = Counter({i: n for i, n in got_ids.items() if not i.rsplit(":", 1)[1].startswith("t")})
    want = Counter(exp.exception_ids)
    assert event_caused == want, _diff("exceptions", want, event_caused)
    for m in exceptions:
        assert m.headers.get("Nats-Msg-Id") == json.loads(m.data)["id"]
    dead = await read_stream(url, cfg.streams.deadletter)
    got_dead = Counter(int(m.headers["Router-Seq"]) for m in dead)
    assert all(n == 1 for n in got_dead.values()), f"dead letters repeated: {got_dead.most_common(3)}"
    got_reasons = {int(m.headers["Router-Seq"]): m.headers["Router-Error"] for m in dead}
    assert got_reasons == exp.dead_letters, (
        f"dead letters: missing {sorted(set(exp.dead_letters) - set(got_reasons))[:5]}, "
        f"extra {sorted(set(got_reasons) - set(exp.dead_letters))[:5]}, different reason "
        f"{[(s, got_reasons[s], r) for s, r in exp.dead_letters.items() if got_reasons.get(s, r) != r][:5]}"
    )
    by_seq = {m.seq: m for m in events}
    for m in dead:
        orig = by_seq[int(m.headers["Router-Seq"])]
        # (modulo the partition token: `router repartition` stores the same event under another one)
        assert unpartitioned(as_read(m.headers["Router-Subject"])) == unpartitioned(orig.subject)
        if "Router-Truncated" not in m.headers:
            assert m.data == orig.data
    sent = Counter(m.headers.get("Nats-Msg-Id") for m in events if m.headers.get("Nats-Msg-Id", "").startswith("msg:"))
    assert sent == Counter(exp.message_ids), _diff("actor messages", Counter(exp.message_ids), sent)
    return exp


def unpartitioned(subject: str) -> str:
    """`events.<digits>.<rest>` as `events.<rest>` (CONTRACT 1: the partitioned form reads the same)."""
    head, _, rest = subject.partition(".")
    token, _, tail = rest.partition(".")
    return f"{head}.{tail}" if head == "events" and token.isdigit() and tail else subject


def as_read(router_subject: str) -> str:
    """A Router-Subject as nats-py reads the stored subject: the router escapes the bytes that are
    not UTF-8 (`\\xff`), nats-py's header parser reads them as U+FFFD."""
    raw = re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(0xDC00 + int(m[1], 16)), router_subject)
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


async def check_states(url: str, exp: Expected, sample: int | None = None) -> None:
    keys = sorted(exp.states)
    if sample is not None:
        keys = keys[:: max(1, len(keys) // sample)]
    for kind, key in keys:
        got = await query_state(url, kind, key)
        want = normalize(expected_reply(kind, key, exp.states[(kind, key)], exp.th))
        assert got == want, f"{kind}:{key}\n got {got}\nwant {want}"


def _diff(what: str, want: Counter[Any], got: Counter[Any]) -> str:
    missing = list((want - got).elements())[:5]
    extra = list((got - want).elements())[:5]
    return f"{what}: missing {len(list((want - got).elements()))} e.g. {missing}; extra {len(list((got - want).elements()))} e.g. {extra}"


__all__ = [
    "Stored",
    "check_against_fold",
    "check_states",
    "make_config",
    "publish_all",
    "query_state",
    "running_router",
    "settle",
    "wait_for",
]
