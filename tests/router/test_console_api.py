"""The console's own routes (router/http/console.py) against a real router process and nats-server:
the page and its static files, an entity's history, the dead letters by reason, and the token."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import httpx
import nats
import pytest

from router import cli
from tests.router.test_http import served, wait_status
from tests.support.natsserver import NatsServer

TOKEN = "console-api-token-41c7"


async def _publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url)
    try:
        for subject, data in messages:
            await nc.publish(subject, data)
        await nc.flush()
    finally:
        await nc.close()


def wait_json(client: httpx.Client, path: str, check: object, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(path)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        body: dict[str, object] = r.json()
        if check(body) or time.monotonic() > deadline:  # type: ignore[operator]
            return body
        time.sleep(0.05)


def test_page_history_and_dead_letters(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    with served(tmp_path, url) as (_rp, client):
        wait_status(client, "/readyz", 200)
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script src="/console/static/console.js"' in page.text
        script = client.get("/console/static/console.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert 'new EventSource("/feed")' in script.text
        assert client.get("/console/static/console.css").status_code == 200
        assert client.get("/console/static/../console.py").status_code == 404

        anyio.run(
            _publish,
            url,
            [
                ("events.sku.SKU-H", b'{"type":"counted","location":"L1","on_hand":0}'),  # raises
                ("events.sku.OTHER", b'{"type":"counted","location":"L1","on_hand":9}'),
                ("events.sku.SKU-H", b'{"type":"received","location":"L1","qty":9}'),  # clears
                ("events.sku.SKU-H", b'{"type":"picked","location":"L1","qty":"x"}'),  # invalid
                ("events.sku.SKU-H", b'{"type":"warped"}'),  # unknown_type
                ("events.sku.SKU-H", b"not json"),  # malformed
                ("events.sku.SKU-O", b'{"type":"counted","location":"L1","on_hand":0}'),  # stays open
            ],
        )
        hist = wait_json(
            client, "/console/history/sku/SKU-H", lambda b: len(b["exceptions"]) >= 4  # type: ignore[arg-type]
        )
        events = hist["events"]
        assert isinstance(events, list)
        assert [e["seq"] for e in events] == [1, 3, 4, 5, 6]
        assert [e["type"] for e in events] == ["counted", "received", "picked", "warped", None]
        assert events[-1]["payload"] == "not json"
        assert all(e["subject"] == "events.sku.SKU-H" and e["time"].endswith("Z") for e in events)
        excs = hist["exceptions"]
        assert isinstance(excs, list)
        assert sorted((e["rule"], e["status"]) for e in excs) == [
            ("low_stock", "cleared"), ("low_stock", "raised"), ("stockout", "cleared"), ("stockout", "raised"),
        ]
        assert all(e["key"] == "SKU-H" for e in excs)
        two = client.get("/console/history/sku/SKU-H", params={"limit": 2}).json()
        assert [e["seq"] for e in two["events"]] == [5, 6]
        assert client.get("/console/history/sku/NEVER").json() == {
            "kind": "sku", "key": "NEVER", "events": [], "exceptions": [],
        }
        bad = client.get("/console/history/pallet/X")
        assert bad.status_code == 400
        assert "bad_subject" in bad.json()["error"]
        assert client.get("/console/history/sku/SKU-H", params={"limit": "0"}).status_code == 400

        board = wait_json(client, "/console/board", lambda b: b["total"] == 2)
        assert board["groups"] == [["critical", "sku", "stockout", "L1", 1], ["warning", "sku", "low_stock", "L1", 1]]
        assert board["partitions"] == [0]
        assert board["partition_count"] == 1

        dead = wait_json(client, "/console/deadletters", lambda b: b["total"] == 3)
        assert dead["stream"] == "DEADLETTER"
        assert dead["by_reason"] == {"invalid": 1, "unknown_type": 1, "malformed": 1}
        items = dead["items"]
        assert isinstance(items, list)
        assert [(i["number"], i["reason"], i["events_seq"]) for i in items] == [
            (3, "malformed", 6), (2, "unknown_type", 5), (1, "invalid", 4),
        ]
        assert items[2]["detail"].startswith("Expected `int`")
        assert items[2]["subject"] == "events.sku.SKU-H"
        assert all(i["redriven"] is None for i in items)
        only = client.get("/console/deadletters", params={"reason": "invalid"}).json()
        assert [i["number"] for i in only["items"]] == [1]

        # A redriven dead letter is marked so.
        code = cli.main(["dlq", "redrive", "1", "--set", "qty=1", "--config", str(tmp_path / "config.toml")])
        capsys.readouterr()
        assert code == 0
        marked = client.get("/console/deadletters").json()["items"]
        assert marked[2]["redriven"]["seq"] == 8
        assert marked[2]["redriven"]["state"] == "sent"


def test_console_routes_need_the_token(tmp_path: Path, nats_server: NatsServer) -> None:
    with served(tmp_path, nats_server.url, http={"token": TOKEN}) as (_rp, client):
        wait_status(client, "/readyz", 200)
        login = client.get("/")
        assert login.status_code == 200
        assert "console.js" not in login.text  # the login page, not the console
        for path in ("/console/history/sku/K", "/console/deadletters", "/console/board", "/console/static/console.js"):
            assert client.get(path).status_code == 401, path
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert "console.js" in client.get("/", headers=auth).text
        assert client.get("/console/deadletters", headers=auth).status_code == 200
        # The login cookie works for the page's own requests too.
        r = client.post("/login", data={"token": TOKEN})
        assert r.status_code == 303
        assert client.get("/console/history/sku/K").status_code == 200
        assert json.loads(client.get("/console/deadletters").text)["total"] == 0
