"""The router's I/O shell: NATS JetStream in, pure actors in the middle, exceptions out.

Wings, each importing only the ones below it (cli -> engine -> jetstream -> the pure core):

- `router.cli`        what a user can type: `router run` (composed here), check-config, pub,
                      state, watch, dlq, schema, simulate; finding and connecting to a server.
- `router.engine`     the daemon: lifecycle (`daemon`), one partition's loop (`partition`),
                      durable timers, the key filter, state and health queries.
- `router.jetstream`  everything that knows nats-py internals or the JetStream API: the
                      protocol parser, the effect publisher, stream set-up, recovery of stored
                      but unconfirmed effects, the bundled nats-server.
- `router.workload`   pure, like `actors`: a seeded operations day for demos, tests and the
                      benchmark.
- `router.logs`       one structlog configuration.

The domain itself lives in `actors` (pure functions), the wire contract in `contracts` and
the SQLite store in `snapshots`.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__: str = _metadata.version("ops-router")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
