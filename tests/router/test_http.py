"""The HTTP server of `router run` (CONTRACT.md section 7): served in-process, its config keys,
/healthz and /readyz, against a real router process and nats-server."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.config import ConfigError, config_from_dict
from router.http.server import read_url_file
from tests.support.natsserver import NatsServer
from tests.support.procs import RouterProcess, router_executable, router_process, write_config


def wait_url(rp: RouterProcess, data_dir: Path, timeout: float = 20.0) -> str:
    """The URL the router wrote to <data>/http.url (it binds port 0 in tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert rp.running, f"router exited:\n{rp.tail()}"
        url = read_url_file(data_dir)
        if url:
            return url
        time.sleep(0.05)
    raise AssertionError(f"no http.url after {timeout}s:\n{rp.tail()}")


def wait_status(client: httpx.Client, path: str, status: int, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(path)
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, f"{path}: {r.status_code} {r.text}"
            return r
        time.sleep(0.05)


@contextlib.contextmanager
def served(
    tmp_path: Path, url: str, **sections: dict[str, Any]
) -> Iterator[tuple[RouterProcess, httpx.Client]]:
    """A router process serving HTTP on a free port, and a client for it."""
    config = tmp_path / "config.toml"
    write_config(config, url, **sections)
    with router_process(config) as rp:
        base = wait_url(rp, tmp_path / "data")
        with httpx.Client(base_url=base, timeout=10) as client:
            yield rp, client


def test_port_0_writes_http_url_and_the_probes_answer(tmp_path: Path, nats_server: NatsServer) -> None:
    with served(tmp_path, nats_server.url) as (rp, client):
        url = read_url_file(tmp_path / "data")
        assert url is not None
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        r = client.get("/healthz")
        assert r.status_code == 200
        assert r.json()["status"] == "alive"
        assert r.json()["pid"] == rp.pid
        ready = wait_status(client, "/readyz", 200).json()
        assert ready["ready"] is True
        assert ready["partitions"][0]["caught_up"] is True
        rc, _ = rp.terminate(timeout=20)
        assert rc == 0, rp.tail()
    assert read_url_file(tmp_path / "data") is None  # removed at a graceful stop
    assert "Uvicorn running" not in rp.log_text()


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("8080", "http.listen: '8080' is not host:port"),
        ("127.0.0.1:99999", "port 99999 is above 65535"),
        ("localhost:http", "is not host:port"),
        ("0.0.0.0:8080", "http.listen: '0.0.0.0:8080' is not a loopback address and no http.token is set"),
        ("[::]:8080", "is not a loopback address and no http.token is set"),
        ("10.1.2.3:8080", "Set a token"),
    ],
)
def test_bad_listen_values_fail_with_the_key(listen: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"http": {"listen": listen}})
    assert message in str(info.value)
    assert "e.g." in str(info.value)


def test_listen_forms_that_are_accepted() -> None:
    for listen in ("off", "127.0.0.1:0", "[::1]:8080", "localhost:9000", "127.0.0.2:1"):
        assert config_from_dict({"http": {"listen": listen}}).http.listen == listen
    cfg = config_from_dict({"http": {"listen": "0.0.0.0:8080", "token_env": "ROUTER_HTTP_TOKEN"}})
    assert cfg.http.listen == "0.0.0.0:8080"
    assert config_from_dict({}).http.listen == "127.0.0.1:8080"
    with pytest.raises(
        ConfigError, match=r'http.idempotency_ttl: "soon" is not a duration.*e.g. idempotency_ttl = "24h"'
    ):
        config_from_dict({"http": {"idempotency_ttl": "soon"}})
    with pytest.raises(ConfigError, match=r"http.trusted_proxies\[0\]: 'proxy' is not an IP address"):
        config_from_dict({"http": {"trusted_proxies": ["proxy"]}})


def test_non_loopback_without_token_refuses_to_start(tmp_path: Path, nats_server: NatsServer) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[nats]\nurl = "{nats_server.url}"\n[http]\nlisten = "0.0.0.0:0"\n')
    proc = subprocess.run(
        [router_executable(), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        "config error: http.listen: '0.0.0.0:0' is not a loopback address and no http.token is set"
        in proc.stderr
    )
    assert "anyone who reaches it could read every entity's state" in proc.stderr


def test_a_port_in_use_stops_the_start_with_the_key(tmp_path: Path, nats_server: NatsServer) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        write_config(config, nats_server.url, http={"listen": f"127.0.0.1:{port}"})
        with router_process(config) as rp:
            assert rp.wait(timeout=30) == 1, rp.tail()
            assert f"cannot listen on 127.0.0.1:{port} (http.listen)" in rp.log_text()


def test_listen_off_serves_nothing(tmp_path: Path, nats_server: NatsServer) -> None:
    import anyio

    from tests.support.procs import wait_healthy

    config = tmp_path / "config.toml"
    write_config(config, nats_server.url, http={"listen": "off"})
    with router_process(config) as rp:
        anyio.run(wait_healthy, nats_server.url, rp)
        assert read_url_file(tmp_path / "data") is None
        assert "http_listening" not in rp.log_text()
