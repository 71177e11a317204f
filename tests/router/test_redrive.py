"""`router dlq redrive`: dead letters fixed and republished once, against a real router and nats-server."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest

from router import cli
from router.cli.redrive import EditError, edit_payload, field_setting, since_time
from router.jetstream.deadletters import AlreadyRedriven, RedriveLedger, Redriven, bucket_name, msg_id
from tests.support.harness import wait_for
from tests.support.natsserver import NatsServer
from tests.support.oracle import read_stream
from tests.support.procs import router_process, settled_exactly_once, wait_healthy, write_config

# --- pure parts -------------------------------------------------------------------------


def test_edit_payload_replaces_fields_and_can_fix_malformed_json() -> None:
    assert json.loads(edit_payload(b'{"type":"picked","qty":"4"}', [(["qty"], 4)])) == {"type": "picked", "qty": 4}
    # NaN and a BOM make a payload `malformed`; --set of the NaN field fixes it.
    fixed = edit_payload(b'\xef\xbb\xbf{"type":"picked","location":"L","qty":NaN}', [(["qty"], 2)])
    assert fixed == b'{"type":"picked","location":"L","qty":2}'
    assert json.loads(edit_payload(b'{"a":{"b":1}}', [(["a", "c"], True)])) == {"a": {"b": 1, "c": True}}
    with pytest.raises(EditError, match="still not valid JSON"):
        edit_payload(b'{"qty":NaN,"x":1}', [(["x"], 2)])
    with pytest.raises(EditError, match="cannot be read as JSON"):
        edit_payload(b"\xff not json", [(["x"], 2)])
    with pytest.raises(EditError, match="not an object"):
        edit_payload(b"[1]", [(["x"], 2)])


def test_set_and_since_arguments() -> None:
    assert field_setting("qty=5") == (["qty"], 5)
    assert field_setting('location="BLR-DS-4"') == (["location"], "BLR-DS-4")
    with pytest.raises(argparse.ArgumentTypeError, match="needs quotes"):
        field_setting("location=BLR")
    with pytest.raises(argparse.ArgumentTypeError, match="FIELD=JSON"):
        field_setting("qty")
    assert since_time("2026-03-01T09:00:00Z").isoformat() == "2026-03-01T09:00:00+00:00"
    with pytest.raises(argparse.ArgumentTypeError, match="offset"):
        since_time("2026-03-01T09:00:00")
    with pytest.raises(argparse.ArgumentTypeError, match="how long ago"):
        since_time("yesterday")


@pytest.mark.anyio
async def test_two_claims_of_one_dead_letter_one_wins(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        a = await RedriveLedger.open(nc, "DEADLETTER")
        b = await RedriveLedger.open(nc, "DEADLETTER")  # a second client binds the same bucket
        rev = await a.claim(Redriven(dead_letter=7, events_seq=70, subject="events.sku.K", host="one"))
        with pytest.raises(AlreadyRedriven) as caught:
            await b.claim(Redriven(dead_letter=7, events_seq=70, subject="events.sku.K", host="two"))
        assert caught.value.record is not None
        assert caught.value.record.host == "one"
        # A claim released after a failed publish can be claimed again.
        await a.release(7, rev)
        assert await b.get(7) is None
        await b.claim(Redriven(dead_letter=7, events_seq=70, subject="events.sku.K", host="two"))
        assert set(await a.all()) == {7}
    finally:
        await nc.close()


# --- against a router -------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


async def _publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url)
    try:
        for subject, data in messages:
            await nc.publish(subject, data)
        await nc.flush()
    finally:
        await nc.close()


async def _state(url: str, key: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        reply = await nc.request(f"router.state.sku.{key}", b"", timeout=5)
        return json.loads(reply.data)  # type: ignore[no-any-return]
    finally:
        await nc.close()


async def _on_hand(url: str, key: str) -> int | None:
    st = (await _state(url, key))["state"]
    return None if st is None else int(st["locations"]["L1"]["on_hand"])


async def _events_last(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jsm().stream_info("EVENTS")).state.last_seq or 0)
    finally:
        await nc.close()


async def _probe_duplicate(url: str, number: int) -> bool:
    """Publish a harmless event with the redrive's Nats-Msg-Id: True while the stream still drops it."""
    nc = await nats.connect(url)
    try:
        ack = await nc.jetstream().publish(
            "events.sku.PROBE", b'{"type":"received","location":"L1","qty":1}', headers={"Nats-Msg-Id": msg_id(number)}
        )
        return bool(ack.duplicate)
    finally:
        await nc.close()


def test_redrive_fixes_dead_letters_once(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    url = nats_server.url
    # A short duplicate window: the second redrive must be refused by the record, not the stream.
    cfg = write_config(tmp_path / "config.toml", url, streams={"duplicate_window": "1s"})
    conf = ["--config", str(tmp_path / "config.toml")]
    with router_process(tmp_path / "config.toml") as rp:
        anyio.run(wait_healthy, url, rp)
        anyio.run(
            _publish,
            url,
            [
                ("events.sku.SKU-R", b'{"type":"received","location":"L1","qty":10}'),
                ("events.sku.SKU-R", b'{"type":"picked","location":"L1","qty":"4"}'),  # invalid
                ("events.sku.SKU-R", b'{"type":"picked","location":"L1","qty":NaN}'),  # malformed
                ("events.sku.SKU-Q", b'{"type":"recieved","location":"L1","qty":3}'),  # unknown_type
                ("events.pallet.X", b'{"type":"received"}'),  # bad_subject
            ],
        )

        async def four_dead() -> bool:
            try:
                return len(await read_stream(url, "DEADLETTER")) == 4
            except Exception:
                return False

        anyio.run(wait_for, four_dead, 20.0)
        dead = {m.headers["Router-Error"]: m.seq for m in anyio.run(read_stream, url, "DEADLETTER")}
        assert set(dead) == {"invalid", "malformed", "unknown_type", "bad_subject"}
        anyio.run(settled_exactly_once, url, cfg, rp)
        assert anyio.run(_on_hand, url, "SKU-R") == 10

        # Still invalid: said so, nothing published.
        before = anyio.run(_events_last, url)
        code, out, err = _run(["dlq", "redrive", str(dead["invalid"]), *conf], capsys)
        assert code == 1, (out, err)
        assert "would dead-letter it again: invalid" in err
        assert "$.qty" in err
        assert "nothing sent" in err
        assert anyio.run(_events_last, url) == before

        # The malformed event fixed with --set: applied, the state changes.
        code, out, err = _run(["dlq", "redrive", f"#{dead['malformed']}", "--set", "qty=4", *conf], capsys)
        assert code == 0, err
        malformed_seq = before + 1
        assert f"#{dead['malformed']} (malformed) -> events.sku.SKU-R  EVENTS seq {before + 1}" in out
        assert "(with qty set)" in out
        anyio.run(wait_for, lambda: _on_hand_is(url, "SKU-R", 6), 20.0)
        stored = anyio.run(read_stream, url, "EVENTS")[-1]
        assert stored.subject == "events.sku.SKU-R"
        assert json.loads(stored.data) == {"type": "picked", "location": "L1", "qty": 4}
        assert stored.headers["Nats-Msg-Id"] == f"redrive:{dead['malformed']}"

        # A second redrive is refused, within the duplicate window and after it.
        code, out, err = _run(["dlq", "redrive", str(dead["malformed"]), "--set", "qty=4", *conf], capsys)
        assert code == 1
        assert f"dead letter #{dead['malformed']} was already redriven" in err
        assert f"as EVENTS seq {before + 1}" in err
        assert "not sent again" in err

        async def window_passed() -> bool:
            return not await _probe_duplicate(url, dead["malformed"])

        anyio.run(wait_for, window_passed, 20.0)  # the stream itself would now take a copy
        after_probe = anyio.run(_events_last, url)
        code, out, err = _run(["dlq", "redrive", str(dead["malformed"]), *conf], capsys)
        assert code == 1, (out, err)
        assert "already redriven" in err, (out, err)
        assert anyio.run(_events_last, url) == after_probe

        # Selection by reason (with --set) and by time.
        code, out, err = _run(["dlq", "redrive", "--error", "invalid", "--since", "2099-01-01T00:00:00Z", *conf], capsys)
        assert code == 0, (out, err)
        assert "no dead letters with Router-Error invalid since 2099" in out, (out, err)
        code, out, err = _run(["dlq", "redrive", "--error", "invalid", "--since", "1h", "--set", "qty=4", "--json", *conf], capsys)
        assert code == 0, err
        sent = [json.loads(line) for line in out.splitlines()]
        assert [(s["dead_letter"], s["error"], s["subject"], s["changed"]) for s in sent] == [
            (dead["invalid"], "invalid", "events.sku.SKU-R", ["qty"])
        ]
        anyio.run(wait_for, lambda: _on_hand_is(url, "SKU-R", 2), 20.0)
        code, out, err = _run(["dlq", "redrive", "--error", "unknown_type", "--set", 'type="received"', *conf], capsys)
        assert code == 0, err
        assert "events.sku.SKU-Q" in out, err
        anyio.run(wait_for, lambda: _on_hand_is(url, "SKU-Q", 3), 20.0)
        # Chosen by reason again: the redriven ones are skipped (and said so), nothing sent.
        before = anyio.run(_events_last, url)
        code, out, err = _run(["dlq", "redrive", "--error", "invalid", *conf], capsys)
        assert code == 0
        assert "already redriven" in err
        assert "redriven 0 dead letters" in err
        assert anyio.run(_events_last, url) == before

        # A bad subject cannot be fixed by a redrive; an unknown number is said so.
        code, out, err = _run(["dlq", "redrive", str(dead["bad_subject"]), "99", *conf], capsys)
        assert code == 1
        assert "is not an event subject" in err
        assert "#99: no such dead letter" in err

        # The record, for a redrive from another machine.
        records = anyio.run(_records, url)
        assert records[dead["malformed"]].state == "sent"
        assert records[dead["malformed"]].seq == malformed_seq
        assert records[dead["malformed"]].changed == ["qty"]
        assert bucket_name("DEADLETTER") == "DEADLETTER_redriven"

        # The redriven events, like any other, leave exactly what the stream implies.
        anyio.run(settled_exactly_once, url, cfg, rp)


async def _on_hand_is(url: str, key: str, want: int) -> bool:
    return await _on_hand(url, key) == want


async def _records(url: str) -> dict[int, Redriven]:
    nc = await nats.connect(url)
    try:
        return await (await RedriveLedger.open(nc, "DEADLETTER", create=False)).all()
    finally:
        await nc.close()


def test_redrive_arguments_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, message in [
        (["dlq", "redrive"], "needs the dead letters"),
        (["dlq", "redrive", "3", "--error", "invalid"], "needs the dead letters"),
        (["dlq", "redrive", "4", "--since", "1h"], "--since selects with --error"),
        (["dlq", "list", "--set", "qty=1"], "--set is for `router dlq redrive`"),
        (["dlq", "show", "1", "2"], "shows one dead letter"),
    ]:
        code, _, err = _run([*argv, "--server", "nats://127.0.0.1:1"], capsys)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)


async def _streams_with_dead_letters(url: str, cfg_path: Path) -> None:
    """EVENTS, EXCEPTIONS and DEADLETTER as the router creates them, and two dead letters (#1, #2)."""
    from contracts.config import load_config
    from router.jetstream.streams import ensure_streams

    nc = await nats.connect(url)
    try:
        await ensure_streams(nc.jsm(), load_config(cfg_path))
        for n in (1, 2):
            await nc.jetstream().publish(
                "deadletter.sku",
                b'{"type":"received","location":"L1","qty":"3"}',
                headers={
                    "Router-Error": "invalid",
                    "Router-Detail": "Expected `int`, got `str` - at `$.qty`",
                    "Router-Subject": f"events.sku.K{n}",
                    "Router-Seq": str(100 + n),
                    "Nats-Msg-Id": f"dead:{100 + n}",
                },
            )
    finally:
        await nc.close()


async def _pending(url: str, number: int, at: str) -> None:
    nc = await nats.connect(url)
    try:
        ledger = await RedriveLedger.open(nc, "DEADLETTER")
        await ledger.claim(Redriven(dead_letter=number, events_seq=100 + number, subject=f"events.sku.K{number}", at=at))
    finally:
        await nc.close()


async def _publish_as_redrive(url: str, number: int) -> int:
    nc = await nats.connect(url)
    try:
        ack = await nc.jetstream().publish(
            f"events.sku.K{number}", b'{"type":"received","location":"L1","qty":3}', headers={"Nats-Msg-Id": msg_id(number)}
        )
        return int(ack.seq)
    finally:
        await nc.close()


def test_a_redrive_that_died_midway_is_resolved(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `pending` record (a redrive died between its record and its publish, or before recording
    the sequence) is resolved by the next redrive: found in EVENTS, refused; not found and stale,
    sent; not found and fresh, left to the one under way."""
    url = nats_server.url
    cfg_path = tmp_path / "config.toml"
    write_config(cfg_path, url)
    conf = ["--config", str(cfg_path)]
    anyio.run(_streams_with_dead_letters, url, cfg_path)

    # #1: published, but the record still says pending -> found by its Nats-Msg-Id, not sent again.
    anyio.run(_pending, url, 1, "2020-01-01T00:00:00Z")
    seq = anyio.run(_publish_as_redrive, url, 1)
    code, out, err = _run(["dlq", "redrive", "1", "--set", "qty=3", *conf], capsys)
    assert code == 1, (out, err)
    assert f"as EVENTS seq {seq}" in err
    records = anyio.run(_records, url)
    assert records[1].state == "sent"
    assert records[1].seq == seq

    # #2 fresh pending: another redrive is under way -> not sent.
    from contracts.times import rfc3339

    anyio.run(_pending, url, 2, rfc3339(int(time.time() * 1e6)))
    before = anyio.run(_events_last, url)
    code, out, err = _run(["dlq", "redrive", "2", "--set", "qty=3", *conf], capsys)
    assert code == 1
    assert "has not recorded its EVENTS sequence yet" in err
    assert anyio.run(_events_last, url) == before


def test_a_stale_pending_redrive_is_taken_over(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = nats_server.url
    cfg_path = tmp_path / "config.toml"
    write_config(cfg_path, url)
    anyio.run(_streams_with_dead_letters, url, cfg_path)
    anyio.run(_pending, url, 2, "2020-01-01T00:00:00Z")  # died before publishing, long ago
    code, out, err = _run(["dlq", "redrive", "2", "--set", "qty=3", "--config", str(cfg_path)], capsys)
    assert code == 0, err
    assert "#2 (invalid) -> events.sku.K2  EVENTS seq 1" in out
    assert anyio.run(_records, url)[2].seq == 1
