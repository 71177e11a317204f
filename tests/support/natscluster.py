"""A real 3-node JetStream nats-server cluster on loopback for one test.

Each node is a `NatsServer` (tests/support/natsserver.py) with a config file naming the
cluster and routes to the other two: free client and route ports, one temporary store each.
`start()` returns once JetStream answers API requests (a meta leader is elected);
`kill(i)` / `start_node(i)` crash and bring back one node on the same ports and store;
`close()` kills every node and is what the fixture calls at teardown, also on failure.
`url` lists the three client URLs comma-separated, as `[nats] url` takes them.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import nats

from tests.support.natsserver import HOST, NatsServer, free_port

CLUSTER = "router-test"


class NatsCluster:
    """Three nats-server nodes `n0`, `n1`, `n2` routed to each other on loopback."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = Path(base)
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.nodes: list[NatsServer] = []
        for i in range(size):
            conf = self.base / f"n{i}.conf"
            routes = ", ".join(
                f'"nats-route://{HOST}:{p}"' for j, p in enumerate(self.route_ports) if j != i
            )
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f'server_name: "n{i}"\n'
                f"cluster {{\n  name: {CLUSTER}\n  listen: \"{HOST}:{self.route_ports[i]}\"\n"
                f"  routes: [{routes}]\n}}\n"
            )
            self.nodes.append(
                NatsServer(self.base / f"n{i}" / "store", self.client_ports[i], config=conf,
                           log_path=self.base / f"n{i}.log", ready_in_log=True)
            )

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, then wait until JetStream answers (the meta leader is elected)."""
        for node in self.nodes:
            node.start(timeout)
        self.wait_ready(timeout)

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        self.nodes[i].start(timeout)

    def kill(self, i: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.nodes[i].kill()

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()

    def node_of(self, server_name: str) -> int:
        return int(server_name.removeprefix("n"))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a JetStream account info request succeeds through a running node."""
        anyio.run(self._wait_ready, timeout)

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.running:
                    continue
                try:
                    nc = await nats.connect(node.url, connect_timeout=1, max_reconnect_attempts=0)
                except Exception as exc:
                    last = exc
                    continue
                try:
                    await nc.jsm().account_info()
                    return
                except Exception as exc:
                    last = exc
                finally:
                    await nc.close()
            await anyio.sleep(0.1)
        raise RuntimeError(f"the NATS cluster did not become ready in {timeout}s: {last!r}")

    async def stream_leader(self, stream: str, timeout: float = 30.0) -> int:
        """The node index that leads `stream` now (waits while it is being elected)."""
        with anyio.fail_after(timeout):
            while True:
                info = await self._stream_info(stream)
                if info is not None and info.cluster is not None and info.cluster.leader:
                    return self.node_of(info.cluster.leader)
                await anyio.sleep(0.1)

    async def _stream_info(self, stream: str) -> Any:
        for node in self.nodes:
            if not node.running:
                continue
            try:
                nc = await nats.connect(node.url, connect_timeout=1, max_reconnect_attempts=0)
            except Exception:
                continue
            try:
                return await nc.jsm().stream_info(stream)
            except Exception:
                continue
            finally:
                await nc.close()
        return None

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NatsCluster({self.url})"
