"""Rebuilding an actor after an `actor_error` (issue 10, item 7): a fold of its history, or a loud failure.

The history is read from a real nats-server; a wrapper around the connection makes some of
those reads fail, as a server restart or a lost connection would half way through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import pytest
from structlog.testing import capture_logs

import actors
from actors import Thresholds
from contracts.times import ns_to_us, rfc3339
from router.engine.rebuild import rebuild_state
from router.errors import FatalError
from router.jetstream import recovery
from router.jetstream.streams import ensure_streams
from snapshots import Store
from tests.support.harness import make_config, publish_all
from tests.support.oracle import fold, read_stream

pytestmark = pytest.mark.anyio

KEY = ("shipment", "S")


class FlakyReads:
    """A connection whose direct gets (history reads) fail when `fail(n)` says so for the n-th one."""

    def __init__(self, nc: Any, fail: Any) -> None:
        self._nc = nc
        self._fail = fail
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        if subject.startswith("$JS.API.DIRECT.GET."):
            self.reads += 1
            if self._fail(self.reads):
                raise nats.errors.ConnectionReconnectingError()
        await self._nc.publish(subject, payload, reply=reply, headers=headers)


async def _history(url: str, cfg: Any) -> int:
    """A shipment with most events without `ts` (the stream's time stands in), between other keys'
    events, and its last one stored at an odd half microsecond or later: rounding it half up and
    truncating it differ. Returns the last sequence."""
    await publish_all(url, [("events.shipment.S", b'{"type":"booked","promised_by":"2030-01-01T00:00:00Z","ts":"2026-01-01T00:00:00Z"}')])
    for i in range(30):
        await publish_all(
            url,
            [
                (f"events.shipment.O{i}", b'{"type":"picked_up"}'),
                ("events.shipment.S", b'{"type":"in_transit","location":"L%d"}' % i),
            ],
        )
    for _ in range(200):
        last = [m for m in await read_stream(url, cfg.streams.events) if m.subject == "events.shipment.S"][-1]
        if last.ts_ns % 1000 >= 500:
            return last.seq
        await publish_all(url, [("events.shipment.S", b'{"type":"in_transit","location":"again"}')])
    raise AssertionError("no time stamp with 500 ns or more past the microsecond in 200 tries")


async def _setup(nats_server: Any, tmp_path: Path) -> tuple[Any, Any, Store, int, Any]:
    cfg = make_config(nats_server.url, tmp_path)
    nc = await nats.connect(nats_server.url)
    await ensure_streams(nc.jsm(), cfg)
    last = await _history(nats_server.url, cfg)
    expected = fold(await read_stream(nats_server.url, cfg.streams.events), Thresholds.from_rules(cfg.rules)).states[KEY]
    store = await Store.open(cfg.snapshot_path)
    return cfg, nc, store, last, expected


async def test_a_rebuild_whose_reads_fail_half_way_is_a_fold_of_the_whole_history(
    nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery, "BATCH", 4)  # several reads for one history
    cfg, nc, store, last, expected = await _setup(nats_server, tmp_path)
    try:
        flaky = FlakyReads(nc, lambda n: n in (3, 4))  # the third read fails, and its first retry
        with capture_logs() as logs:
            state = await rebuild_state(store, flaky, cfg, Thresholds.from_rules(cfg.rules), *KEY, last + 1)  # type: ignore[arg-type]
        assert flaky.reads > 5
        assert state.seq == last
        assert actors.encode_state(state) == actors.encode_state(expected)
        retries = [e for e in logs if e["event"] == "actor_rebuild_retry"]
        assert len(retries) == 2
        assert retries[0]["log_level"] == "warning"
    finally:
        await store.close()
        await nc.close()


async def test_the_time_of_an_event_without_ts_is_rounded_as_the_partition_rounds_it(
    nats_server: Any, tmp_path: Path
) -> None:
    cfg, nc, store, last, expected = await _setup(nats_server, tmp_path)
    try:
        stored = next(m for m in await read_stream(nats_server.url, cfg.streams.events) if m.seq == last)
        assert expected.last_movement == ns_to_us(stored.ts_ns) != stored.ts_ns // 1000  # the test can tell
        state = await rebuild_state(store, nc, cfg, Thresholds.from_rules(cfg.rules), *KEY, last + 1)
        assert rfc3339(state.last_movement) == rfc3339(expected.last_movement)
        assert actors.encode_state(state) == actors.encode_state(expected)
    finally:
        await store.close()
        await nc.close()


async def test_a_history_that_cannot_be_read_fails_loudly(
    nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery, "BATCH", 4)
    cfg, nc, store, last, _expected = await _setup(nats_server, tmp_path)
    try:
        flaky = FlakyReads(nc, lambda n: n > 1)  # the first read works, none after it
        with capture_logs() as logs, pytest.raises(FatalError, match="cannot be rebuilt") as raised:
            await rebuild_state(
                store, flaky, cfg, Thresholds.from_rules(cfg.rules), *KEY, last + 1, retry_for_s=0.5  # type: ignore[arg-type]
            )
        assert "shipment S" in str(raised.value)
        assert [e for e in logs if e["event"] == "actor_rebuild_retry"]
    finally:
        await store.close()
        await nc.close()
