"""Fixtures for the router tests: a real nats-server per test.

Here rather than in tests/conftest.py, so that the pure actor, contract and store tests do
not import the router's embedded-server module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.natscluster import NatsCluster
from tests.support.natsserver import NatsServer


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A JetStream nats-server on a free loopback port with a temporary store.

    `.url`, `.port`, `.store_dir`; `.stop()` / `.start()` restart it on the same port and
    store, `.kill()` crashes it. Always stopped at teardown.
    """
    base: Path = tmp_path_factory.mktemp("nats")
    server = NatsServer(base / "store")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three JetStream nats-server nodes routed to each other on loopback (free ports, temporary
    stores); `.url` lists the three. Every node is killed at teardown, also on failure."""
    cluster = NatsCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
