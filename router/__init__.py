"""The router's I/O shell: NATS JetStream in, pure actors in the middle, exceptions out.

Wings, each importing only the ones below it (cli -> engine -> jetstream -> the pure core):

- `router.cli`        what a user can type: `router run` (composed here), check-config, pub,
                      state, watch, dlq, schema, simulate; finding and connecting to a server.
- `router.engine`     the daemon: lifecycle (`daemon`, `startup`), one partition's loop and
                      hot path (`partition`) beside parts that know nothing of it: effects out
                      (`outbox`), writes to the store (`snapshotter`), what is due (`timers`),
                      the key filter, the `actor_error` rebuild; state and health queries;
                      ownership leases.
- `router.jetstream`  everything that knows nats-py internals or the JetStream API: the
                      connection, the protocol parser, pull requests (`pull`), the effect
                      publisher, stream set-up, recovery of stored but unconfirmed effects,
                      ownership records, the bundled nats-server.
- `router.workload`   pure, like `actors`: a seeded operations day for demos, tests and the
                      benchmark.
- `router.errors`, `router.logs`, `router.metrics`, `router.health`, `router.secrets`:
                      usable from every wing (tests/test_layers.py keeps the order).

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
