"""Reaching a secured NATS for real: mutual TLS (certificates made with openssl), TLS first, nkey users,
user and password with hard characters. A `router run` process applies an event through each, a
client command's connection (the same connect options) reads the state back, a client without the
credential is refused, and neither the router's log nor `router check-config` shows a secret."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nkeys
import pytest

from contracts.config import Config, config_from_dict
from router.cli.client import ClientError, ServerURL, connect
from tests.support.natsjwt import decentralized
from tests.support.natsserver import NatsServer
from tests.support.procs import RouterProcess, router_process, write_config
from tests.support.tls import Certs, make_certs

ROOT = Path(__file__).resolve().parents[2]
EVENT = b'{"type":"received","location":"BLR-DS-4","qty":7}'


def _quoted(value: str) -> str:
    return json.dumps(value)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


def secured_server(tmp_path: Path, body: str, *, ready_in_log: bool = False) -> NatsServer:
    conf = tmp_path / "nats-server.conf"
    conf.write_text(body)
    return NatsServer(tmp_path / "store", config=conf, ready_in_log=ready_in_log)


@pytest.fixture
def started() -> Iterator[list[NatsServer]]:
    """Servers a test starts, killed at teardown whatever happens."""
    servers: list[NatsServer] = []
    try:
        yield servers
    finally:
        for s in servers:
            s.kill()


def tls_block(certs: Certs, *, handshake_first: bool = False) -> str:
    return (
        "tls {\n"
        f"  cert_file: {_quoted(str(certs.server_cert))}\n"
        f"  key_file: {_quoted(str(certs.server_key))}\n"
        f"  ca_file: {_quoted(str(certs.ca))}\n"
        "  verify: true\n"
        "  timeout: 5\n"
        f"  handshake_first: {'true' if handshake_first else 'false'}\n"
        "}\n"
    )


async def apply_one_event(cfg: Config, url: str, rp: RouterProcess, key: str) -> dict[str, Any]:
    """Through the client commands' connection: publish one event, then read the state it made."""
    async with connect(ServerURL(url, "[nats] url"), cfg=cfg, connect_timeout=5) as nc:
        with anyio.fail_after(30):
            while True:  # until the router created the streams and answers
                assert rp.running, rp.tail()
                try:
                    reply = await nc.request("router.health", b"", timeout=1.0)
                    if json.loads(reply.data).get("status") == "ok":
                        break
                except Exception:
                    await anyio.sleep(0.05)
            ack = await nc.jetstream().publish(f"events.sku.{key}", EVENT)
            while True:
                reply = await nc.request(f"router.state.sku.{key}", b"", timeout=2.0)
                state: dict[str, Any] = json.loads(reply.data)
                if state.get("seq") == ack.seq:
                    return state
                await anyio.sleep(0.05)


async def refused(cfg: Config, url: str) -> str:
    with pytest.raises(ClientError) as info:
        async with connect(ServerURL(url, "[nats] url"), cfg=cfg, connect_timeout=2):
            pass
    return str(info.value)


def stop_router(rp: RouterProcess) -> None:
    rc, _ = rp.terminate(20)
    assert rc == 0, rp.tail()


@pytest.mark.anyio
@pytest.mark.parametrize("handshake_first", [False, True], ids=["starttls", "tls-first"])
async def test_mutual_tls(
    tmp_path: Path, certs: Certs, started: list[NatsServer], handshake_first: bool
) -> None:
    server = secured_server(tmp_path, tls_block(certs, handshake_first=handshake_first), ready_in_log=handshake_first)
    started.append(server)
    server.start()
    url = f"tls://127.0.0.1:{server.port}" if handshake_first else server.url
    nats_keys: dict[str, Any] = {
        "tls_ca": "../certs/ca.pem",  # relative to the config file's folder
        "tls_cert": "../certs/client.pem",
        "tls_key": "../certs/client-key.pem",
    }
    if handshake_first:
        nats_keys["tls_handshake_first"] = True
    cfg = write_config(tmp_path / "router" / "config.toml", url, nats=nats_keys)
    with router_process(tmp_path / "router" / "config.toml") as rp:
        state = await apply_one_event(cfg, url, rp, "SKU-TLS")
        assert state["state"]["available"] == 7, state
        stop_router(rp)
    assert '"event": "router_started"' in rp.log_text()
    assert "eof_received" not in rp.log_text()  # asyncio's noise on closing an upgraded connection

    # No client certificate, one from a CA the server does not trust, no TLS at all: refused.
    only_ca = {"tls_ca": str(certs.ca), "tls_handshake_first": handshake_first}
    await refused(config_from_dict({"nats": {"url": url, **only_ca}}), url)
    rogue = {**only_ca, "tls_cert": str(certs.rogue_cert), "tls_key": str(certs.rogue_key)}
    await refused(config_from_dict({"nats": {"url": url, **rogue}}), url)
    await refused(config_from_dict({"nats": {"url": server.url}}), server.url)
    # ... and the certificate that worked still works (the refusals were about the credential).
    good = {**only_ca, "tls_cert": str(certs.client_cert), "tls_key": str(certs.client_key)}
    async with connect(ServerURL(url, "[nats] url"), cfg=config_from_dict({"nats": {"url": url, **good}})) as nc:
        assert nc.is_connected


@pytest.mark.anyio
async def test_nkey_user_with_the_seed_from_a_file(tmp_path: Path, started: list[NatsServer]) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    server = secured_server(tmp_path, f"authorization {{\n  users = [ {{ nkey: {_quoted(public)} }} ]\n}}\n")
    started.append(server)
    server.start()
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "router.nk").write_text(seed + "\n")
    config_path = tmp_path / "router" / "config.toml"
    cfg = write_config(config_path, server.url, nats={"nkey_seed_file": "router.nk"})
    with router_process(config_path) as rp:
        state = await apply_one_event(cfg, server.url, rp, "SKU-NKEY")
        assert state["state"]["available"] == 7, state
        stop_router(rp)
    assert seed not in rp.log_text()

    message = await refused(config_from_dict({"nats": {"url": server.url}}), server.url)
    assert "authorization" in message.lower(), message
    other = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    await refused(config_from_dict({"nats": {"url": server.url, "nkey_seed": other}}), server.url)

    config_path.write_text(config_path.read_text().replace('nkey_seed_file = "router.nk"', f'nkey_seed = "{seed}"'))
    code, out, err = await check_config(config_path)
    assert code == 0, err
    assert seed not in out + err
    assert 'nkey_seed = "***"' in out


@pytest.mark.anyio
async def test_creds_file_of_a_decentralized_user(tmp_path: Path, started: list[NatsServer]) -> None:
    """Operator mode (JWTs as `nsc` makes them): the router connects with `creds`, a client without is refused."""
    auth = decentralized()
    server = secured_server(tmp_path, auth.server_conf)
    started.append(server)
    server.start()
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "router.creds").write_text(auth.creds)
    config_path = tmp_path / "router" / "config.toml"
    cfg = write_config(config_path, server.url, nats={"creds": "router.creds"})
    with router_process(config_path) as rp:
        state = await apply_one_event(cfg, server.url, rp, "SKU-CREDS")
        assert state["state"]["available"] == 7, state
        stop_router(rp)
    assert auth.user_seed not in rp.log_text()
    assert auth.user_jwt not in rp.log_text()
    message = await refused(config_from_dict({"nats": {"url": server.url}}), server.url)
    assert "authorization" in message.lower(), message


@pytest.mark.anyio
async def test_user_and_password_with_hard_characters(
    tmp_path: Path, started: list[NatsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password holding `@` and `:`, from the environment and in the URL: the router connects, and
    neither its log (through a server restart: disconnect and reconnect lines) nor check-config shows it."""
    password = "p@ss:w0rd"
    server = secured_server(
        tmp_path, f"authorization {{\n  user: router\n  password: {_quoted(password)}\n}}\n"
    )
    started.append(server)
    server.start()
    monkeypatch.setenv("ROUTER_NATS_PASSWORD", password)
    env_cfg = write_config(
        tmp_path / "env" / "config.toml", server.url, nats={"user": "router", "password_env": "ROUTER_NATS_PASSWORD"}
    )
    with router_process(tmp_path / "env" / "config.toml") as rp:
        state = await apply_one_event(env_cfg, server.url, rp, "SKU-PW")
        assert state["state"]["available"] == 7, state
        stop_router(rp)

    in_url = f"nats://router:{password}@127.0.0.1:{server.port}"
    url_cfg = write_config(tmp_path / "url" / "config.toml", in_url)
    with router_process(tmp_path / "url" / "config.toml") as rp2:
        state = await apply_one_event(url_cfg, in_url, rp2, "SKU-PW")
        assert state["seq"] == 2, state
        server.stop()
        await wait_log(rp2, "nats_disconnected")
        server.start()
        await wait_log(rp2, "nats_reconnected")
        stop_router(rp2)

    for log in (rp.log_text(), rp2.log_text()):
        assert "p@ss" not in log, log
        assert "w0rd" not in log, log
    assert f"nats://***@127.0.0.1:{server.port}" in rp2.log_text()
    code, out, err = await check_config(tmp_path / "url" / "config.toml")
    assert code == 0, err
    assert "p@ss" not in out
    assert "w0rd" not in out
    assert f'url = "nats://***@127.0.0.1:{server.port}"' in out


async def check_config(path: Path) -> tuple[int, str, str]:
    """`router check-config --config PATH` as a user runs it."""
    done = await anyio.run_process(
        [sys.executable, "-m", "router.cli", "check-config", "--config", str(path)],
        check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def wait_log(rp: RouterProcess, event: str, timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not any(e.get("event") == event for e in rp.log_events()):
            assert rp.running, rp.tail()
            await anyio.sleep(0.05)
