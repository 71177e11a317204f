"""The `router` command: exit codes, config errors, pub validation, client commands against a real server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
import structlog

from contracts.config import Config, config_from_dict
from contracts.decode import DecodeError, decode_event
from contracts.events import EVENT_TYPES, KINDS
from contracts.times import to_us
from router import cli
from router.cli.client import ClientError, resolve_server
from router.logs import configure_logging
from router.workload import HOT_SKU, Tally, workload
from tests.support.natsserver import NatsServer

ROOT = Path(__file__).resolve().parents[2]
T0_US = 1_790_000_000_000_000  # a fixed time base


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No repo config.toml, no NATS_URL from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m router.cli ...` as a user runs `router ...` (own process, own event loop)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("NATS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


async def _add_stream(url: str, name: str, subjects: list[str]) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name=name, subjects=subjects, duplicate_window=60)
    finally:
        await nc.close()


async def _stored(url: str, name: str) -> list[Any]:
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(name)
        return [await jsm.get_msg(name, seq) for seq in range(1, int(info.state.last_seq or 0) + 1)]
    finally:
        await nc.close()


def add_stream(url: str, name: str, subjects: list[str]) -> None:
    anyio.run(_add_stream, url, name, subjects)


def stored(url: str, name: str) -> list[Any]:
    return anyio.run(_stored, url, name)  # type: ignore[no-any-return]


GOOD = '{"type":"received","location":"BLR-DS-4","qty":20}'


# --- usage, help, exit codes -----------------------------------------------------------


def test_no_command_and_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([], capsys)
    assert code == 2
    assert "COMMAND" in err
    code, _, err = run(["state", "warehouse", "X"], capsys)
    assert code == 2
    assert "invalid choice" in err
    code, _, err = run(["state", "sku", "bad key"], capsys)
    assert code == 2
    assert "'bad key'" in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "check-config", "pub", "state", "watch", "dlq", "schema", "simulate"):
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0, command
        assert f"usage: router {command}" in out
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.startswith("router (ops-router) ")


def test_console_entry_point_runs() -> None:
    proc = run_process("schema", "campaign")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["title"] == "ops-router campaign events"


# --- check-config, schema --------------------------------------------------------------


def test_check_config_with_an_unknown_key_exits_2_naming_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.toml").write_text('[nats]\nurll = "nats://x:4222"\n')
    code, out, err = run(["check-config", "--config", "bad.toml"], capsys)
    assert code == 2
    assert err.startswith("config error: nats.urll: ")
    assert out == ""


def test_check_config_with_a_wrong_type_names_the_nested_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.toml").write_text('[rules.sku]\nlow_stock_threshold = "five"\n')
    code, _, err = run(["check-config", "--config", "bad.toml"], capsys)
    assert code == 2
    assert err.startswith("config error: rules.sku.low_stock_threshold: ")


def test_check_config_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["check-config", "--config", "nope.toml"], capsys)
    assert code == 2
    assert err.startswith("config error: nope.toml: cannot read config")


def test_check_config_prints_toml_that_validates_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.toml").write_text(
        '[nats]\nurl = "nats://127.0.0.1:4333"\nuser = "router"\npassword = "s3cret"\n[rules.sku]\nlow_stock_threshold = 3\n'
    )
    code, out, err = run(["check-config"], capsys)
    assert code == 0, err
    assert "s3cret" not in out
    doc = tomllib.loads(out)
    assert doc["rules"]["sku"]["low_stock_threshold"] == 3
    assert doc["streams"]["events"] == "EVENTS"
    again = config_from_dict(doc)
    assert again.nats.url == "nats://127.0.0.1:4333"
    code, out, _ = run(["check-config", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["nats"]["password"] == "***"


def test_schema_is_json_schema_with_every_event_type(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["schema"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["$schema"].startswith("https://json-schema.org/")
    assert set(doc["properties"]) == set(KINDS)
    tags = {
        d["properties"]["type"]["enum"][0] for d in doc["$defs"].values() if "type" in d.get("properties", {})
    }
    for kind in KINDS:
        assert EVENT_TYPES[kind] <= tags, kind
    code, out, _ = run(["schema", "shipment"], capsys)
    one = json.loads(out)
    refs = {r["$ref"].rsplit("/", 1)[1] for r in one["anyOf"]}
    assert refs <= set(one["$defs"])
    assert {one["$defs"][r]["properties"]["type"]["enum"][0] for r in refs} == EVENT_TYPES["shipment"]


# --- finding the server ----------------------------------------------------------------


def test_server_resolution_order(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "nats.url").write_text("nats://127.0.0.1:5555\n")
    embedded = Config(base_dir=str(tmp_path))
    assert resolve_server("nats://flag:1", embedded, {"NATS_URL": "nats://env:2"}).url == "nats://flag:1"
    assert resolve_server(None, embedded, {"NATS_URL": "nats://env:2"}).url == "nats://env:2"
    found = resolve_server(None, embedded, {})
    assert found.url == "nats://127.0.0.1:5555"
    assert found.source == str(tmp_path / "data" / "nats.url")
    configured = config_from_dict({"nats": {"url": "nats://cfg:3"}}, base_dir=str(tmp_path))
    assert resolve_server(None, configured, {}).url == "nats://cfg:3"
    # The data folder is that of [snapshots] path, relative to the config file.
    other = config_from_dict({"snapshots": {"path": "state/r.db"}}, base_dir=str(tmp_path))
    with pytest.raises(
        ClientError, match=r"no router running with the embedded server found at .*state/nats\.url"
    ):
        resolve_server(None, other, {})


def test_client_command_without_any_server_says_how_to_start_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["pub", "events.sku.A", GOOD], capsys)
    assert code == 1
    assert "no router running with the embedded server found at" in err
    assert "router run" in err
    assert "--server" in err


def test_unreachable_server_is_a_one_line_runtime_error(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.natsserver import free_port

    code, _, err = run(["state", "sku", "A", "--server", f"nats://127.0.0.1:{free_port()}"], capsys)
    assert code == 1
    assert "cannot connect to nats://127.0.0.1:" in err
    assert "connection refused" in err
    assert err.count("\n") == 1


# --- pub -------------------------------------------------------------------------------


def test_pub_invalid_event_exits_2_with_field_path_and_publishes_nothing(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    add_stream(nats_server.url, "EVENTS", ["events.>"])
    bad = '{"type":"received","location":"BLR-DS-4","qty":"2"}'
    code, out, err = run(["pub", "--server", nats_server.url, "events.sku.SKU-1", bad], capsys)
    assert code == 2
    assert "invalid: Expected `int`, got `str` - at `$.qty`" in err
    assert "Router-Error: invalid" in err
    assert "--force" in err
    assert out == ""
    for subject, payload, code_ in [
        ("events.pallet.X", GOOD, "bad_subject"),
        ("events.sku.X", "{nope", "malformed"),
        ("events.sku.X", '{"type":"teleported"}', "unknown_type"),
    ]:
        code, _, err = run(["pub", "--server", nats_server.url, subject, payload], capsys)
        assert code == 2
        assert f"invalid event: {code_}: " in err
    assert stored(nats_server.url, "EVENTS") == []


def test_pub_lands_in_the_stream_as_a_plain_core_publish(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    add_stream(nats_server.url, "EVENTS", ["events.>"])
    code, out, err = run(["pub", "--server", nats_server.url, "events.sku.SKU-1", GOOD], capsys)
    assert code == 0, err
    assert "published" in out
    (msg,) = stored(nats_server.url, "EVENTS")
    assert msg.subject == "events.sku.SKU-1"
    assert msg.data == GOOD.encode()
    assert not msg.headers


def test_pub_headers_msg_id_count_and_js(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    add_stream(nats_server.url, "EVENTS", ["events.>"])
    url = nats_server.url
    payload = '{"type":"counted","location":"DEL-WH-1","on_hand":{{i}}}'
    code, _, err = run(
        [
            "pub",
            "--server",
            url,
            "events.sku.S-{{i}}",
            payload,
            "--count",
            "3",
            "-H",
            "Source: wms",
            "--msg-id",
            "c-{{i}}",
        ],
        capsys,
    )
    assert code == 0, err
    # The same ids again: the stream's duplicate window drops them.
    code, out, _ = run(
        ["pub", "--server", url, "events.sku.S-1", payload.replace("{{i}}", "1"), "--msg-id", "c-1", "--js"],
        capsys,
    )
    assert code == 0
    assert "duplicate" in out
    msgs = stored(url, "EVENTS")
    assert [m.subject for m in msgs] == ["events.sku.S-1", "events.sku.S-2", "events.sku.S-3"]
    assert [json.loads(m.data)["on_hand"] for m in msgs] == [1, 2, 3]
    assert msgs[1].headers == {"Source": "wms", "Nats-Msg-Id": "c-2"}
    code, out, _ = run(["pub", "--server", url, "events.sku.S-9", GOOD, "--js"], capsys)
    assert code == 0
    assert "in EVENTS at seq 4" in out


def test_pub_force_sends_bad_input_and_reads_stdin(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    add_stream(nats_server.url, "EVENTS", ["events.>"])
    code, _, err = run(["pub", "--server", nats_server.url, "events.sku.A", "{broken", "--force"], capsys)
    assert code == 0, err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"type":"delivered"}\n')))
    code, _, err = run(["pub", "--server", nats_server.url, "events.shipment.SHP-1", "-"], capsys)
    assert code == 0, err
    assert [m.data for m in stored(nats_server.url, "EVENTS")] == [b"{broken", b'{"type":"delivered"}\n']


def test_pub_refuses_subjects_no_stream_stores_even_with_force(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outside events.> (or outside the server's events stream) an event would be lost: refused, --force or not."""
    url = nats_server.url
    code, out, err = run(["pub", "--server", url, "sku.SKU-1", GOOD, "--force"], capsys)
    assert code == 2
    assert "sku.SKU-1 is outside the events stream (events.>)" in err
    assert "with or without --force; did you mean events.sku.SKU-1?" in err
    assert out == ""
    code, _, err = run(["pub", "--server", url, "sku.SKU-1", GOOD], capsys)
    assert code == 2
    assert "did you mean events.sku.SKU-1?" in err
    assert "dead-letter" not in err  # the router never sees it: it could not dead-letter it
    # No events stream on the server: nothing would store it either.
    code, _, err = run(["pub", "--server", url, "events.sku.SKU-1", GOOD, "--force"], capsys)
    assert code == 1
    assert f"stream EVENTS not found on {url}: nothing would store the event, so nothing was published" in err
    # An events stream of narrower subjects than the router's: what it does not store is refused.
    add_stream(url, "EVENTS", ["events.sku.>"])
    code, _, err = run(["pub", "--server", url, "events.campaign.C1", '{"type":"paused"}', "--force"], capsys)
    assert code == 1
    assert "events.campaign.C1 is outside the events stream EVENTS (events.sku.>)" in err
    code, _, err = run(["pub", "--server", url, "events.sku.SKU-1", GOOD], capsys)
    assert code == 0, err
    assert [m.subject for m in stored(url, "EVENTS")] == ["events.sku.SKU-1"]


# --- state, watch, dlq -----------------------------------------------------------------


def test_state_without_a_router_says_so(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["state", "sku", "SKU-1", "--server", nats_server.url], capsys)
    assert code == 1
    assert "router.state.sku.SKU-1" in err
    assert "is the router running?" in err


@pytest.mark.anyio
async def test_state_pretty_prints_the_reply(nats_server: NatsServer) -> None:
    reply = {"kind": "sku", "key": "SKU-1", "seq": 3, "state": {"available": 4}, "exceptions": []}
    nc = await nats.connect(nats_server.url)

    async def answer(msg: Any) -> None:
        await msg.respond(json.dumps(reply, separators=(",", ":")).encode())

    await nc.subscribe("router.state.sku.SKU-1", cb=answer)
    await nc.flush()
    try:
        with anyio.fail_after(60):
            pretty = await anyio.to_thread.run_sync(
                run_process, "state", "sku", "SKU-1", "--server", nats_server.url
            )
            raw = await anyio.to_thread.run_sync(
                run_process, "state", "sku", "SKU-1", "--raw", "--server", nats_server.url
            )
    finally:
        await nc.close()
    assert pretty.returncode == 0, pretty.stderr
    assert json.loads(pretty.stdout) == reply
    assert '\n  "kind": "sku"' in pretty.stdout
    assert raw.stdout == json.dumps(reply, separators=(",", ":")) + "\n"


EXC = {
    "id": "sku:SKU-1:stockout:BLR-DS-4:raised:7",
    "kind": "sku",
    "key": "SKU-1",
    "rule": "stockout",
    "status": "raised",
    "severity": "critical",
    "location": "BLR-DS-4",
    "value": 0,
    "threshold": 0,
    "seq": 7,
    "event_ts": "2026-11-20T10:00:00Z",
    "detected_at": "2026-11-20T10:00:00.120000Z",
    "message": "SKU-1 out of stock at BLR-DS-4 (available 0)",
}


@pytest.mark.anyio
async def test_watch_replays_and_formats_exceptions(nats_server: NatsServer) -> None:
    await _add_stream(nats_server.url, "EXCEPTIONS", ["exceptions.>"])
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    cleared = {
        **EXC,
        "status": "cleared",
        "id": EXC["id"].replace("raised", "cleared"),
        "message": "SKU-1 back",
    }
    await js.publish("exceptions.sku.stockout.SKU-1", json.dumps(EXC).encode())
    await js.publish("exceptions.sku.stockout.SKU-1", json.dumps(cleared).encode())
    await js.publish(
        "exceptions.shipment.delivery_failed.S-1", json.dumps({**EXC, "kind": "shipment"}).encode()
    )
    await nc.close()
    with anyio.fail_after(60):
        lines = await anyio.to_thread.run_sync(
            run_process, "watch", "sku", "--all", "--count", "2", "--server", nats_server.url
        )
        as_json = await anyio.to_thread.run_sync(
            run_process, "watch", "--all", "--count", "3", "--json", "--server", nats_server.url
        )
    assert lines.returncode == 0, lines.stderr
    first, second = lines.stdout.splitlines()
    for part in (
        "2026-11-20T10:00:00.120000Z",
        "CRITICAL",
        "raised",
        "stockout",
        "sku:SKU-1 @ BLR-DS-4",
        "SKU-1 out of stock at BLR-DS-4 (available 0)",
    ):
        assert part in first
    assert "cleared" in second
    assert "SKU-1 back" in second
    assert [json.loads(x)["kind"] for x in as_json.stdout.splitlines()] == ["sku", "sku", "shipment"]


def test_watch_without_the_stream_is_a_clear_error(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["watch", "--server", nats_server.url], capsys)
    assert code == 1
    assert "stream EXCEPTIONS not found" in err


def test_watch_says_so_and_exits_1_when_the_server_goes_away(nats_server: NatsServer, tmp_path: Path) -> None:
    """It used to end silently with status 0, as if it had been asked to stop."""
    import time

    add_stream(nats_server.url, "EXCEPTIONS", ["exceptions.>"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    env.pop("NATS_URL", None)
    out_path, err_path = tmp_path / "watch.out", tmp_path / "watch.err"

    def wait_for_text(path: Path, text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in path.read_text():
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, f"no {text!r} from router watch within 30s"
            time.sleep(0.05)

    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "watch", "--server", nats_server.url],
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
            text=True,
            env=env,
        )
    try:
        wait_for_text(err_path, "Ctrl-C to stop")
        anyio.run(_publish_exception, nats_server.url)
        wait_for_text(out_path, "SKU-1 out of stock")
        nats_server.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_path.read_text()
    assert proc.returncode == 1, err
    assert (
        f"router: lost the connection to {nats_server.url} after 1 exception: the server went away; "
        "run `router watch` again once the router is back"
    ) in err


async def _publish_exception(url: str) -> None:
    nc = await nats.connect(url)
    try:
        payload = {
            "id": "sku:SKU-1:stockout:BLR-DS-4:raised:2", "kind": "sku", "key": "SKU-1", "rule": "stockout",
            "status": "raised", "severity": "critical", "location": "BLR-DS-4", "value": 0, "threshold": 0,
            "seq": 2, "event_ts": "2026-11-22T18:41:24.512000Z", "detected_at": "2026-11-22T18:41:24.514210Z",
            "message": "SKU-1 out of stock at BLR-DS-4 (available 0)",
        }
        await nc.jetstream().publish("exceptions.sku.stockout.SKU-1", json.dumps(payload).encode())
    finally:
        await nc.close()


async def _dead_letters(url: str, n: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(1, n + 1):
        await js.publish(
            "deadletter.sku" if i % 2 else "deadletter.unknown",
            b'{"type":"received","qty":"2"}' if i % 2 else b"\xff not json",
            headers={
                "Router-Error": "invalid" if i % 2 else "malformed",
                "Router-Detail": "Expected `int`, got `str` - at `$.qty`"
                if i % 2
                else "invalid UTF-8 at byte 0",
                "Router-Subject": "events.sku.A" if i % 2 else "events.pallet.B",
                "Router-Seq": str(100 + i),
                "Nats-Msg-Id": f"dead:{100 + i}",
            },
        )
    await nc.close()


def test_dlq_list_and_show(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    url = nats_server.url
    code, _, err = run(["dlq", "--server", url], capsys)
    assert code == 1
    assert "stream DEADLETTER not found" in err
    add_stream(url, "DEADLETTER", ["deadletter.>"])
    code, out, _ = run(["dlq", "--server", url], capsys)
    assert code == 0
    assert "no dead letters" in out
    anyio.run(_dead_letters, url, 5)

    code, out, _ = run(["dlq", "list", "--limit", "2", "--server", url], capsys)
    assert code == 0
    assert "5 dead letters; showing the last 2" in out
    assert "#4 " in out
    assert "#5 " in out
    assert "#3 " not in out
    assert "events.sku.A  (EVENTS seq 105)" in out
    assert "Expected `int`, got `str` - at `$.qty`" in out
    assert 'payload: {"type":"received","qty":"2"}' in out

    code, out, _ = run(["dlq", "--kind", "unknown", "--server", url], capsys)
    assert code == 0
    assert "2 dead letters for unknown" in out
    assert "#2 " in out
    assert "#4 " in out
    assert "events.sku.A" not in out

    code, out, _ = run(["dlq", "show", "2", "--server", url], capsys)
    assert code == 0
    assert "Router-Error: malformed" in out
    assert "Router-Subject: events.pallet.B" in out
    assert "Router-Seq: 102" in out
    assert "\\xff not json" in out

    code, _, err = run(["dlq", "show", "99", "--server", url], capsys)
    assert code == 1
    assert "no dead letter #99 in stream DEADLETTER" in err
    code, _, err = run(["dlq", "show", "--server", url], capsys)
    assert code == 2


def test_dlq_show_takes_what_dlq_list_shows(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    """list names each dead letter by #N and by the EVENTS sequence; show takes either."""
    url = nats_server.url
    add_stream(url, "DEADLETTER", ["deadletter.>"])
    anyio.run(_dead_letters, url, 5)
    code, out, err = run(["dlq", "list", "--server", url], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("#4 "))
    assert "events.pallet.B  (EVENTS seq 104)" in row
    assert "router dlq show N, the #N above (e.g. router dlq show 5), or by the event: router dlq show --events-seq 105" in err
    for argv in (["4"], ["#4"], ["--events-seq", "104"]):
        code, out, err = run(["dlq", "show", *argv, "--server", url], capsys)
        assert code == 0, (argv, err)
        assert out.startswith("dead letter #4 (DEADLETTER seq 4)  of EVENTS seq 104  subject deadletter.unknown")
        assert "Router-Seq: 104" in out
    code, _, err = run(["dlq", "show", "--events-seq", "4", "--server", url], capsys)
    assert code == 1
    assert "no dead letter of EVENTS sequence 4 in DEADLETTER" in err
    code, _, err = run(["dlq", "show", "x4", "--server", url], capsys)
    assert code == 2
    assert "the #N of `router dlq list`" in err
    code, _, err = run(["dlq", "show", "4", "--events-seq", "104", "--server", url], capsys)
    assert code == 2


def test_dlq_show_raw_writes_the_exact_bytes(
    nats_server: NatsServer, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    add_stream(nats_server.url, "DEADLETTER", ["deadletter.>"])
    anyio.run(_dead_letters, nats_server.url, 2)
    assert cli.main(["dlq", "show", "2", "--raw", "--server", nats_server.url]) == 0
    assert capfdbinary.readouterr().out == b"\xff not json"


# --- simulate --------------------------------------------------------------------------


def _digest(items: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for subject, data in items:
        h.update(subject.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def test_workload_is_deterministic_for_a_seed_and_time_base() -> None:
    a = list(workload(7, now_us=T0_US, count=3000, bad_share=0.02))
    b = list(workload(7, now_us=T0_US, count=3000, bad_share=0.02))
    assert a == b
    assert list(workload(8, now_us=T0_US, count=3000, bad_share=0.02)) != a
    shifted = list(workload(7, now_us=T0_US + 1_000_000, count=3000, bad_share=0.02))
    assert [s for s, _ in shifted] == [s for s, _ in a]
    assert shifted != a
    # A prefix does not depend on how many are asked for.
    assert list(workload(7, now_us=T0_US, count=500, bad_share=0.02)) == a[:500]


def test_workload_does_not_depend_on_hash_randomization() -> None:
    code = (
        "import hashlib,sys; from router.workload import workload\n"
        "h = hashlib.sha256()\n"
        f"for s, d in workload(3, now_us={T0_US}, count=2000, bad_share=0.05): h.update(s.encode()+b'\\0'+d+b'\\0')\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        digests.add(proc.stdout.strip())
    assert digests == {_digest(list(workload(3, now_us=T0_US, count=2000, bad_share=0.05)))}


def _valid(subject: str, data: bytes) -> bool:
    try:
        decode_event(subject, data)
    except DecodeError:
        return False
    return True


def test_workload_mix_times_and_bad_share() -> None:
    items = list(workload(11, now_us=T0_US, count=12_000, rate=200, bad_share=0.03))
    tally = Tally()
    last_ts = 0
    future = 0
    for subject, data in items:
        tally.add(subject, data)
        try:
            _kind, _key, event = decode_event(subject, data)
        except DecodeError:
            continue
        assert event.ts is not None, "every valid event carries its time"
        us = to_us(event.ts)
        if us > T0_US + 86_400_000_000:  # a producer clock weeks ahead: the router dead-letters it
            future += 1
            continue
        assert us >= last_ts, "event times never go back"
        last_ts = us
    assert last_ts <= T0_US + 60 * 1_000_000 + 1  # 12,000 at 200/s: one minute
    assert future > 0
    bad = sum(tally.bad.values())
    assert 0.02 * len(items) < bad < 0.04 * len(items)
    assert set(tally.bad) == {"malformed", "invalid", "unknown_type", "bad_subject"}
    kinds = {k for k, _ in tally.good}
    assert kinds == set(KINDS)
    types = {t for _, t in tally.good}
    assert {"received", "ordered", "picked", "booked", "picked_up", "in_transit", "started", "spend"} <= types
    assert "settings" in types
    # The scripted first minute: the hot SKU sells out while promoted, a delayed and a too-warm shipment.
    text = b"\n".join(d for _, d in items)
    assert b'"type":"delayed"' in text
    assert b'"celsius":9.8' in text
    assert b'"type":"delivery_failed"' in text
    hot = [msgspec.json.decode(d) for s, d in items if s == f"events.sku.{HOT_SKU}" and _valid(s, d)]
    assert hot[0] == {"type": "received", "ts": hot[0]["ts"], "location": "BLR-DS-4", "qty": 14}
    before_restock = hot[: next(i for i, e in enumerate(hot) if e["type"] == "received" and i > 0)]
    assert sum(e["qty"] for e in before_restock if e["type"] == "ordered") == 16  # two past zero


def test_simulate_publishes_what_it_says(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    add_stream(nats_server.url, "EVENTS", ["events.>"])
    code, out, err = run(
        [
            "simulate",
            "--server",
            nats_server.url,
            "--rate",
            "3000/s",
            "--duration",
            "1",
            "--seed",
            "4",
            "--bad-share",
            "2%",
            "--progress",
            "0",
            "--linger",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    assert "exceptions seen: none yet (is the router running?" in out
    msgs = stored(nats_server.url, "EVENTS")
    closing = re.search(r"closing the day: (\d+) shipments under way delivered, (\d+) campaigns ended", err)
    assert closing is not None, err
    assert len(msgs) == 3000 + int(closing[1]) + int(closing[2])  # the day, then what closes it
    assert f"sent {len(msgs):,} events" in out
    tally = Tally()
    for m in msgs:
        tally.add(m.subject, m.data)
    bad = sum(tally.bad.values())
    assert f"{len(msgs) - bad:,} valid, {bad:,} bad input" in out
    assert re.search(rf"^  bad +{bad} +\(", out, re.MULTILINE)


def test_simulate_warns_when_no_stream_stores_events(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        [
            "simulate",
            "--server",
            nats_server.url,
            "--rate",
            "500",
            "--duration",
            "0.2",
            "--progress",
            "0",
            "--linger",
            "0",
        ],
        capsys,
    )
    assert code == 0
    assert "stream EVENTS does not exist" in err


# --- logging ---------------------------------------------------------------------------


def test_logging_json_lines_with_utc_iso_timestamps(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    try:
        log = structlog.get_logger()
        log.debug("not_shown")
        log.info("embedded_server_started", url="nats://127.0.0.1:1")
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        line = json.loads(err[0])
        assert line["event"] == "embedded_server_started"
        assert line["url"] == "nats://127.0.0.1:1"
        assert line["level"] == "info"
        assert line["timestamp"].endswith("Z")
        assert "T" in line["timestamp"]
        configure_logging("warning", "console")
        log.info("hidden")
        log.warning("nats_unavailable", url="x")
        err = capsys.readouterr().err
        assert "hidden" not in err
        assert "nats_unavailable" in err
        assert "url=x" in err
    finally:
        configure_logging("warning", "auto")


# --- router run ------------------------------------------------------------------------


def _start_router(folder: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NATS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", "run", "--log-format", "json"],
        cwd=folder,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_run_on_a_busy_port_names_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        (tmp_path / "config.toml").write_text(f"[nats]\nembedded_port = {port}\n[http]\nlisten = \"127.0.0.1:0\"\n")
        proc = _start_router(tmp_path)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    (line,) = [json.loads(x) for x in err.splitlines() if '"router_failed"' in x]
    assert line["error"].startswith(f"[nats] embedded_port {port}: ")


def test_run_embedded_then_clients_find_it_by_the_url_file(tmp_path: Path) -> None:
    """`router run` with the embedded server; pub and state find it without flags; Ctrl-C stops both."""
    import signal
    import time

    (tmp_path / "config.toml").write_text('[nats]\nembedded_port = 0\n[http]\nlisten = "127.0.0.1:0"\n')
    proc = _start_router(tmp_path)
    url_file = tmp_path / "data" / "nats.url"
    try:
        deadline = time.monotonic() + 30
        while not url_file.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no data/nats.url after 30s"
            time.sleep(0.05)
        pid = int((tmp_path / "data" / "nats-server.pid").read_text())
        pub = run_process("pub", "events.sku.SKU-7", GOOD, cwd=tmp_path)
        assert pub.returncode == 0, pub.stderr
        for _ in range(100):
            state = run_process("state", "sku", "SKU-7", cwd=tmp_path)
            if state.returncode == 0 and json.loads(state.stdout)["seq"] == 1:
                break
            time.sleep(0.1)
        assert state.returncode == 0, state.stderr
        assert json.loads(state.stdout)["state"]["available"] == 20
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not url_file.exists()
    from router.jetstream.embedded import _pid_alive

    assert not _pid_alive(pid), "the embedded server stops with the router"
    gone = run_process("state", "sku", "SKU-7", cwd=tmp_path)
    assert gone.returncode == 1
    assert "no router running with the embedded server found at" in gone.stderr
