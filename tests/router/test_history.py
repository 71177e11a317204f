"""`last_messages`: an entity's last few messages from a stream, read forward with a widening window."""

from __future__ import annotations

import nats
import pytest
from nats.js import api

from router.jetstream import history
from tests.support.natsserver import NatsServer


@pytest.mark.anyio
async def test_last_messages_of_a_busy_and_a_quiet_key(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "FIRST_WINDOW", 16)  # so that the quiet key needs a wider window
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jsm().add_stream(api.StreamConfig(name="H", subjects=["events.>"], allow_direct=True))
        js = nc.jetstream()
        await js.publish("events.sku.QUIET", b'{"n":0}')
        await js.publish("events.sku.QUIET", b'{"n":1}')
        for i in range(3000):
            await js.publish("events.sku.BUSY", b'{"n":%d}' % i)
        await js.publish("events.7.sku.QUIET", b'{"n":2}', headers={"Nats-Msg-Id": "m-2"})

        busy = await history.last_messages(nc, "H", "events.sku.BUSY", 5)
        assert [m.data for m in busy] == [b'{"n":%d}' % i for i in range(2995, 3000)]
        assert [m.seq for m in busy] == list(range(2998, 3003))
        assert all(m.subject == "events.sku.BUSY" and m.time.endswith("Z") for m in busy)

        quiet = await history.last_messages(nc, "H", "events.sku.QUIET", 10)
        assert [m.data for m in quiet] == [b'{"n":0}', b'{"n":1}']
        both = await history.last_messages(nc, "H", "events.*.sku.QUIET", 10)  # the partitioned form
        assert [(m.seq, m.headers.get("Nats-Msg-Id")) for m in both] == [(3003, "m-2")]
        assert await history.last_messages(nc, "H", "events.sku.NEVER", 10) == []
    finally:
        await nc.close()


def test_preview_is_one_line() -> None:
    assert history.preview(b'{"a":\n1}\xff') == '{"a":\\n1}\\xff'
    assert len(history.preview(b"x" * 1000, 50)) == 50
