"""docs/deploy in force: TLS and the least-privilege users of docs/deploy/accounts.conf.

A real nats-server with TLS (certificates from tests/support/tls.py) and the accounts file
exactly as shipped (included, passwords from the server's environment), the router running
as its `router` user, a producer and a reader with their own users: the router applies a
workload exactly once; a producer publishing on `exceptions.>` (or the reader on `events.>`)
is refused by the server and nothing reaches the streams.
"""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest

from tests.router.test_faults import future_workload
from tests.support.natsserver import NatsServer
from tests.support.procs import (
    assert_exactly_once,
    check_all_states,
    router_process,
    settle_process,
    write_config,
)
from tests.support.tls import make_certs

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
PASSWORDS = {
    "ROUTER_NATS_PASSWORD": "router-s3cret",
    "PRODUCER_NATS_PASSWORD": "producer-s3cret",
    "READER_NATS_PASSWORD": "reader-s3cret",
    "ONCALL_NATS_PASSWORD": "oncall-s3cret",
    "SYS_NATS_PASSWORD": "sys-s3cret",
}


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    certs = make_certs(tmp_path / "certs")
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)  # the server reads them from its environment, as in the unit
    # Clients of this process (the checks below, nats-py's default TLS context) trust the test CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    shutil.copy(DEPLOY / "accounts.conf", tmp_path / "accounts.conf")
    conf = tmp_path / "nats-server.conf"
    conf.write_text(
        "tls {\n"
        f'  cert_file: "{certs.server_cert}"\n  key_file: "{certs.server_key}"\n  ca_file: "{certs.ca}"\n'
        "  verify: false\n  timeout: 5\n}\n"
        'include "accounts.conf"\n'
    )
    srv = NatsServer(tmp_path / "store", config=conf, ready_in_log=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def as_user(url: str, user: str) -> str:
    password = PASSWORDS[f"{user.upper()}_NATS_PASSWORD"]
    return url.replace("nats://", f"nats://{user}:{password}@")


async def connect(url: str, user: str, errors: list[str]) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(as_user(url, user), tls=ssl.create_default_context(), error_cb=on_error)


async def refused(errors: list[str], subject: str) -> None:
    """Until the server's permissions violation for a publish on `subject` reached the client."""
    try:
        with anyio.fail_after(10):
            while not any("permissions violation for publish" in e.lower() and subject.lower() in e.lower() for e in errors):
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no refusal of {subject} seen; errors: {errors}") from None


async def test_router_as_its_user_and_the_producer_refused_on_exceptions(server: NatsServer, tmp_path: Path) -> None:
    url = server.url
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "nats-password").write_text(PASSWORDS["ROUTER_NATS_PASSWORD"])
    config = tmp_path / "router" / "config.toml"
    cfg = write_config(
        config, url,
        nats={"user": "router", "password_file": "nats-password", "tls_ca": str(Path(str(server.config)).parent / "certs" / "ca.pem")},
    )
    checker = as_user(url, "router")  # the fold's reads: EVENTS and the router's streams
    with router_process(config) as rp:
        try:
            producer_errors: list[str] = []
            producer = await connect(url, "producer", producer_errors)
            try:
                js = producer.jetstream()
                with anyio.fail_after(30):  # until the router made the streams
                    while True:
                        try:
                            await js.publish("events.sku.DEPLOY-0", b'{"type":"received","location":"L","qty":1}')
                            break
                        except Exception:
                            assert rp.running, rp.tail()
                            await anyio.sleep(0.1)
                for subject, data in future_workload(seed=41, count=3_000):
                    await producer.publish(subject, data)
                await producer.flush()
                # The producer may not publish an exception: the server refuses it.
                await producer.publish("exceptions.sku.low_stock.FAKE", b'{"id":"forged"}')
                await producer.flush()
                await refused(producer_errors, "exceptions.sku.low_stock.FAKE")
                with pytest.raises(nats.errors.TimeoutError):  # no PubAck: refused before any stream saw it
                    await js.publish("exceptions.sku.low_stock.FAKE2", b'{"id":"forged2"}', timeout=1.0)
            finally:
                await producer.close()

            await settle_process(checker, cfg, rp, timeout=90)
            exp = await assert_exactly_once(checker, cfg)  # nothing forged among the exceptions
            assert exp.exception_ids

            reader_errors: list[str] = []
            reader = await connect(url, "reader", reader_errors)
            try:
                # Reads: the state of a key, live exceptions.
                reply = await reader.request("router.state.sku.DEPLOY-0", b"", timeout=5)
                assert b'"DEPLOY-0"' in reply.data
                sub = await reader.subscribe("exceptions.>")
                await sub.unsubscribe()
                # No writes: an event from the reader is refused.
                await reader.publish("events.sku.DEPLOY-1", b'{"type":"received","location":"L","qty":1}')
                await reader.flush()
                await refused(reader_errors, "events.sku.DEPLOY-1")
            finally:
                await reader.close()
            await check_all_states(checker, await assert_exactly_once(checker, cfg))
            assert "permissions violation" not in rp.log_text().lower(), "the router user lacks a permission"
        except BaseException:
            print(rp.tail(60))
            raise
