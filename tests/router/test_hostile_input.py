"""Hostile input never stops the router nor corrupts state (CONTRACT section 4), through a real router.

Random bytes, mutated valid payloads, deep nesting, payloads near the server's maximum,
and an actor that raises: each bad message is dead-lettered exactly once with the reason
the contract's decoder gives, and later valid events for the same key still apply.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actors
from actors import sku as sku_actor
from contracts.decode import DecodeError, decode_event
from tests.support.harness import (
    check_against_fold,
    make_config,
    publish_all,
    query_state,
    running_router,
    settle,
)
from tests.support.oracle import read_stream

T0 = "2026-11-20T10:00:00Z"


def received(qty: int, location: str = "X", **extra: Any) -> bytes:
    return json.dumps({"type": "received", "location": location, "qty": qty, "ts": T0, **extra}).encode()


VALID = [
    received(3),
    json.dumps({"type": "ordered", "location": "X", "qty": 1, "order_id": "o-1", "ts": T0}).encode(),
    json.dumps({"type": "adjusted", "location": "Y", "delta": -2, "reason": "damaged"}).encode(),
    json.dumps(
        {"type": "counted", "location": "X", "on_hand": 4, "ts": "2026-11-20T15:30:00+05:30"}
    ).encode(),
]

# Hand-picked cases named in issue 3, each with the reason the contract gives it.
NAMED = [
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":1', "malformed"),  # truncated JSON
    ("events.sku.{k}", b"\x00\x01\x02\xff\xfe", "malformed"),  # random bytes
    ("events.sku.{k}", b'{"type":"received","location":"X\xff","qty":1}', "malformed"),  # non-UTF-8
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":1,"note":"\xc3"}', "malformed"),
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":NaN}', "malformed"),
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":Infinity}', "malformed"),
    ("events.sku.{k}", b'{"type":"received","location":"\\ud800","qty":1}', "malformed"),  # lone surrogate
    ("events.sku.{k}", b"[" * 100_000 + b"]" * 100_000, "malformed"),  # deep nesting
    ("events.sku.{k}", b'{"type":"received","x":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001, "malformed"),
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":"2"}', "invalid"),  # wrong type
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":1,"ts":"2026-11-20T10:00:00"}', "invalid"),
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":1,"ts":12}', "invalid"),
    ("events.sku.{k}", b'{"type":"received","location":"X","qty":9007199254740993}', "invalid"),
    ("events.sku.{k}", b'{"type":"levitated"}', "unknown_type"),
    ("events.sku.{k}", b'{"type":null}', "invalid"),
    ("events.sku.{k}.extra", received(1), "bad_subject"),
    ("events.sku.{k}$", received(1), "bad_subject"),
    ("events.sku." + "K" * 129, received(1), "bad_subject"),
    ("events.pallet.{k}", received(1), "bad_subject"),
    ("events.{k}", received(1), "bad_subject"),
]


def test_named_hostile_cases_match_the_contract_decoder() -> None:
    """The reference decoder (also the oracle's) gives each named case the reason the issue expects."""
    for subject, data, code in NAMED:
        with pytest.raises(DecodeError) as info:
            decode_event(subject.format(k="K"), data)
        assert info.value.code == code, (subject, data[:60], info.value.detail)


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, byte in ops:
        if not out:
            out.append(byte)
            continue
        i = pos % len(out)
        if op == 0:
            out[i] = byte
        elif op == 1:
            out.insert(i, byte)
        elif op == 2:
            del out[i]
        else:
            del out[i:]
    return bytes(out)


_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_FIELDS = st.sampled_from(["type", "location", "qty", "ts", "order_id", "delta", "on_hand", "campaign", "id"])
HOSTILE = st.one_of(
    st.binary(max_size=120),
    st.tuples(
        st.sampled_from(VALID),
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4
        ),
    ).map(lambda t: _mutate(*t)),
    st.dictionaries(
        _FIELDS, _JSON_SCALARS | st.sampled_from(["received", "ordered", "X", T0, "2026-11-20T10:00:00"])
    ).map(lambda d: json.dumps(d).encode()),
    st.tuples(st.integers(1, 3000), st.sampled_from([b"[", b'{"a":'])).map(
        lambda t: (
            b'{"type":"received","location":"X","qty":1,"deep":'
            + t[1] * t[0]
            + b"0"
            + (b"]" if t[1] == b"[" else b"}") * t[0]
            + b"}"
        )
    ),
)
SUBJECT_FORMS = st.sampled_from(
    ["events.sku.{k}"] * 6 + ["events.sku.{k}.x", "events.sku.{k}!", "events.ghost.{k}", "events.3.sku.{k}"]
)


def test_fuzzed_input_through_a_running_router(nats_server: Any, tmp_path: Path) -> None:
    """Hypothesis-chosen bad input per key, then a valid event: the router applies the valid one every time,
    and at the end every dead letter is exactly what the contract's decoder says, exactly once."""
    cfg = make_config(nats_server.url, tmp_path)
    counter = itertools.count()

    async def round_trip(rt: Any, batch: list[tuple[str, bytes]], key: str) -> None:
        nc = await nats.connect(nats_server.url)
        try:
            for subject, data in batch:
                await nc.publish(subject.format(k=key), data)
            ack = await nc.jetstream().publish(f"events.sku.{key}", received(5, location="FINAL-LOC-1"))
        finally:
            await nc.close()
        with anyio.fail_after(20):
            while True:
                state = await query_state(nats_server.url, "sku", key)
                if state["seq"] >= ack.seq:
                    break
                await anyio.sleep(0.02)
        assert state["seq"] == ack.seq
        assert state["state"]["locations"]["FINAL-LOC-1"]["on_hand"] == 5

    with (
        anyio.from_thread.start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(running_router(cfg)) as rt,
    ):

        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(st.tuples(SUBJECT_FORMS, HOSTILE), min_size=1, max_size=6))
        def one_key(batch: list[tuple[str, bytes]]) -> None:
            portal.call(round_trip, rt, batch, f"FZ-{next(counter)}")

        one_key()
        portal.call(settle, nats_server.url, cfg, rt)
        try:
            exp = portal.call(check_against_fold, nats_server.url, cfg)
        except AssertionError:
            portal.call(_print_disagreements, nats_server.url)
            raise
        assert exp.dead_letters


@pytest.mark.anyio
async def test_named_cases_and_huge_payloads(nats_server: Any, tmp_path: Path) -> None:
    """The issue's list of hostile input, and payloads up to the server's maximum (truncated dead letters)."""
    cfg = make_config(nats_server.url, tmp_path)
    nc = await nats.connect(nats_server.url)
    max_payload = nc.max_payload
    await nc.close()
    huge_bad = b'{"type":"received","location":"X","qty":1,"pad":"' + b"a" * (
        max_payload - 100
    )  # unterminated
    huge_good = received(2, id="i" * (max_payload - 200))
    huge_binary = bytes(range(256)) * (max_payload // 256)
    assert len(huge_binary) <= max_payload
    assert len(huge_good) <= max_payload
    messages = [(s.format(k="H"), d) for s, d, _ in NAMED]
    messages += [("events.sku.H", huge_bad), ("events.sku.H", huge_good), ("events.campaign.H", huge_binary)]
    messages += [("events.sku.H", received(7))]
    async with running_router(cfg) as rt:
        await publish_all(nats_server.url, messages)
        await settle(nats_server.url, cfg, rt)
        state = await query_state(nats_server.url, "sku", "H")
        assert state["seq"] == len(messages)  # the valid event after all of it applied
        assert state["state"]["locations"]["X"]["on_hand"] == 2 + 7
        exp = await check_against_fold(nats_server.url, cfg)
    dead = {int(m.headers["Router-Seq"]): m for m in await read_stream(nats_server.url, "DEADLETTER")}
    for seq, (_subject, _data, code) in enumerate(NAMED, start=1):
        assert dead[seq].headers["Router-Error"] == code
        assert dead[seq].headers["Router-Detail"]
    events = {m.seq: m for m in await read_stream(nats_server.url, "EVENTS")}
    truncated = [m for m in dead.values() if "Router-Truncated" in m.headers]
    assert {int(m.headers["Router-Seq"]) for m in truncated} == {len(NAMED) + 1, len(NAMED) + 3}
    for m in truncated:
        original = events[int(m.headers["Router-Seq"])].data
        assert int(m.headers["Router-Truncated"]) == len(original)
        assert original.startswith(m.data)
        assert 0 < len(m.data) < len(original)
    assert len(NAMED) + 2 == len(exp.dead_letters)


@pytest.mark.anyio
async def test_an_actor_that_raises_is_dead_lettered_and_the_partition_goes_on(
    nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect in an actor: `actor_error` in DEADLETTER, state as if the event never came, later events apply."""
    real_apply = sku_actor.apply

    def buggy_apply(state: Any, event: Any, ts_us: int, th: Any) -> Any:
        if getattr(event, "location", None) == "BOOM":
            state.available += 1000  # half-done work before the failure must not stick
            raise ZeroDivisionError("division by zero in a buggy rule")
        return real_apply(state, event, ts_us, th)

    monkeypatch.setattr(sku_actor, "apply", buggy_apply)
    import router.engine.partition as partition_module

    table = getattr(partition_module, "_APPLY", None)
    if isinstance(table, dict):  # the partition's hot path keeps its own table of apply functions
        monkeypatch.setitem(table, "sku", buggy_apply)
    assert actors.ACTORS["sku"].apply is buggy_apply

    cfg = make_config(nats_server.url, tmp_path)
    messages = [
        ("events.sku.B", received(10)),
        ("events.sku.B", received(5, location="BOOM")),
        (
            "events.sku.B",
            json.dumps({"type": "ordered", "location": "X", "qty": 4, "order_id": "o"}).encode(),
        ),
        ("events.sku.B", received(5, location="BOOM")),
        ("events.sku.C", received(1)),
        ("events.sku.B", received(1, location="Y")),
    ]
    async with running_router(cfg) as rt:
        await publish_all(nats_server.url, messages)
        await settle(nats_server.url, cfg, rt)
        b = await query_state(nats_server.url, "sku", "B")
        c = await query_state(nats_server.url, "sku", "C")
    assert b["seq"] == 6
    assert set(b["state"]["locations"]) == {"X", "Y"}
    assert {k: b["state"]["locations"]["X"][k] for k in ("on_hand", "reserved", "available")} == {
        "on_hand": 10,
        "reserved": 4,
        "available": 6,
    }
    assert b["state"]["available"] == 7
    assert c["seq"] == 5
    assert c["state"]["available"] == 1
    dead = await read_stream(nats_server.url, "DEADLETTER")
    assert [(m.headers["Router-Seq"], m.headers["Router-Error"]) for m in dead] == [
        ("2", "actor_error"),
        ("4", "actor_error"),
    ]
    assert "ZeroDivisionError" in dead[0].headers["Router-Detail"]
    assert dead[0].data == messages[1][1]
    assert dead[0].subject == "deadletter.sku"


async def _print_disagreements(url: str) -> None:
    """On failure: each message whose outcome (dead-lettered or not) differs from the contract's decoder."""
    dead = {
        int(m.headers["Router-Seq"]): m.headers["Router-Error"] for m in await read_stream(url, "DEADLETTER")
    }
    for m in await read_stream(url, "EVENTS"):
        try:
            decode_event(m.subject, m.data)
            want = None
        except DecodeError as err:
            want = err.code
        if dead.get(m.seq) != want:
            print(f"seq {m.seq} {m.subject} {m.data[:120]!r}: router {dead.get(m.seq)}, contract {want}")


def test_the_nesting_limit_does_not_depend_on_the_callers_stack() -> None:
    """Deep JSON is judged by a fixed limit (64 levels), not by Python's recursion limit: the router's hot
    path, a replay and the oracle, at whatever stack depth, must agree."""
    import sys

    def payload(depth: int) -> bytes:  # `depth` levels in all, the event object included
        inner = depth - 1
        return b'{"type":"received","location":"X","qty":1,"d":' + b"[" * inner + b"0" + b"]" * inner + b"}"

    def outcome(data: bytes, frames: int) -> str:
        if frames:
            return outcome(data, frames - 1)
        try:
            decode_event("events.sku.K", data)
        except DecodeError as err:
            return err.code
        return "applied"

    limit = sys.getrecursionlimit()
    try:
        for recursion_limit in (limit, limit * 4):
            sys.setrecursionlimit(recursion_limit)
            for frames in (0, 300):
                assert outcome(payload(64), frames) == "applied"
                assert outcome(payload(65), frames) == "malformed"
                assert outcome(payload(990), frames) == "malformed"
    finally:
        sys.setrecursionlimit(limit)
    # Brackets inside strings do not count.
    assert outcome(b'{"type":"received","location":"X","qty":1,"s":"' + b"[" * 500 + b'"}', 0) == "applied"
