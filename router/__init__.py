"""The router's I/O shell: NATS JetStream in, pure actors in the middle, exceptions out.

Layers, from the outside in:

- `router.cli`        the `router` command (run, check-config, pub, state, watch, dlq,
                      schema, simulate); `router.client` finds and connects to the server
                      for the client commands; `router.logs` configures logging once.
- `router.runtime`    the daemon's lifecycle (server, connection, streams, store,
                      partitions, queries, graceful stop); `router.embedded` runs the
                      bundled nats-server when `[nats] url = "embedded"`.
- `router.partition`, `router.publisher`, `router.service`, `router.streams`
                      the pipeline: fetch, decode, apply, publish effects, ack, snapshot.
- `router.simulate`   a seeded, realistic workload for demos, tests and benchmarks.

The domain itself lives in `actors` (pure functions) and the wire contract in `contracts`.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__: str = _metadata.version("ops-router")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
