"""SIGKILLs of `router oncall` under a stream of raises and clears (CONTRACT.md section 8).

The router runs in this process; `router oncall` runs as a subprocess (its own session, killed
by process group) and is SIGKILLed again and again while SKUs cross their thresholds back and
forth. Afterwards Alertmanager holds exactly one alert per open exception, for that raise, and
none for the cleared ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import hypothesis  # noqa: F401  (see tests/support/alertmanager.py)
import pytest

from tests.support.alertmanager import Alertmanager, running_alertmanager
from tests.support.harness import publish_all, running_router, wait_for
from tests.support.natsserver import NatsServer
from tests.support.oracle import read_stream
from tests.support.procs import router_executable, write_config

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


class SinkProcess:
    """`router oncall --config PATH` as a subprocess in a session of its own."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.with_name("oncall.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [router_executable(), "oncall", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.config.parent,
            )

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.kills += 1

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""


@contextlib.contextmanager
def sink_process(config: Path) -> Iterator[SinkProcess]:
    sp = SinkProcess(config)
    try:
        sp.start()
        yield sp
    finally:
        sp.close()


def open_set(exceptions: list[dict[str, Any]]) -> dict[tuple[str, ...], str]:
    """(alertname, kind, key, location) -> raise id, for the exceptions whose last word is a raise."""
    last: dict[tuple[str, ...], dict[str, Any]] = {}
    for e in exceptions:
        last[(e["rule"], e["kind"], e["key"], e["location"] or "")] = e
    return {k: e["id"] for k, e in last.items() if e["status"] == "raised"}


async def am_alerts(am: Alertmanager) -> dict[tuple[str, ...], str]:
    out = {}
    for a in await anyio.to_thread.run_sync(am.alerts):
        lab = a["labels"]
        key = (lab["alertname"], lab["kind"], lab["key"], lab.get("location", ""))
        assert key not in out, f"two alerts for {key}"
        out[key] = a["annotations"]["id"]
    return out


async def test_sigkills_of_the_sink_leave_one_alert_per_open_exception(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    rng = random.Random(13)
    with running_alertmanager(tmp_path / "am") as am:
        config = tmp_path / "router" / "config.toml"
        cfg = write_config(config, nats_server.url, oncall={
            "alertmanager": am.url, "resend_every": "2s", "reconcile_every": "1s", "in_router": False,
        })
        async with running_router(cfg):
            with sink_process(config) as sink:

                skus = [f"SKU-{i}" for i in range(12)]
                for _round in range(10):
                    # Every SKU gets a new count at one of two locations: low, out, or plenty.
                    batch = []
                    for s in skus:
                        for _ in range(5):
                            level = rng.choice([0, 3, 20])
                            loc = rng.choice(["BLR-DS-4", "DEL-WH-1"])
                            batch.append((f"events.sku.{s}", json.dumps(
                                {"type": "counted", "location": loc, "on_hand": level}).encode()))
                    before = await am_alerts(am)
                    await publish_all(nats_server.url, batch)

                    async def changed(b: dict[tuple[str, ...], str] = before) -> bool:
                        return await am_alerts(am) != b

                    # Killed as soon as Alertmanager shows some of this round: mid-stream.
                    await wait_for(changed, 60, "the sink posting this round")
                    sink.kill()
                    sink.start()
                assert sink.kills == 10
                stored = [json.loads(m.data) for m in await read_stream(nats_server.url, cfg.streams.exceptions)]
                want = open_set(stored)
                assert want, "the stream left some exceptions open"
                assert len(want) < len({(e["rule"], e["key"], e["location"]) for e in stored}), "and some cleared"

                async def matches() -> bool:
                    return await am_alerts(am) == want

                try:
                    await wait_for(matches, 60, "Alertmanager equal to the open exceptions")
                except TimeoutError:
                    got = await am_alerts(am)
                    raise AssertionError(
                        f"missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}, "
                        f"other ids {[(k, got[k], want[k]) for k in set(got) & set(want) if got[k] != want[k]][:3]}\n"
                        f"{sink.tail()}"
                    ) from None

                # What was sent, pending and failed: from the running sink, then from its file.
                def status(*extra: str) -> subprocess.CompletedProcess[str]:
                    return subprocess.run(
                        [router_executable(), "oncall", "status", "--config", str(config), *extra],
                        capture_output=True, text=True, timeout=30, check=False,
                    )

                done = await anyio.to_thread.run_sync(status, "--json")
                assert done.returncode == 0, done.stderr
                am_status = json.loads(done.stdout)["targets"]["alertmanager"]
                assert am_status["open"] == len(want)
                assert am_status["failed"] == 0
                assert am_status["pending"] == {"stream": 0, "held": 0, "due": 0}
                assert am_status["done_seq"] == len(stored)
                text = await anyio.to_thread.run_sync(status)
                assert text.stdout.startswith("# from router.oncall.status\n")
                assert f"open {len(want)}; caught up (through seq {len(stored)})" in text.stdout
                sink.kill()
                text = await anyio.to_thread.run_sync(status)
                assert text.stdout.startswith("# from the status file (no sink answered)\n"), text.stdout


def test_router_oncall_without_a_target_or_with_a_bad_value(tmp_path: Path) -> None:
    """Nothing to do: exit 1 saying what to set. A bad value: exit 2 with the key's path and an example."""
    (tmp_path / "none.toml").write_text('[nats]\nurl = "nats://127.0.0.1:1"\n')
    done = subprocess.run([router_executable(), "oncall", "--config", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "[oncall] names no target" in done.stdout + done.stderr
    (tmp_path / "bad.toml").write_text('[oncall]\nalertmanager = "http://127.0.0.1:9093"\nmin_open = { low_stock = "2 m" }\n')
    done = subprocess.run([router_executable(), "oncall", "--config", str(tmp_path / "bad.toml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "config error: oncall.min_open.low_stock: '2 m' is not a duration, e.g. min_open = { low_stock = \"2m\" }"
    )
    (tmp_path / "secret.toml").write_text('[oncall.pagerduty]\nrouting_key_env = "NO_SUCH_VARIABLE_SET"\n')
    done = subprocess.run([router_executable(), "oncall", "--config", str(tmp_path / "secret.toml")],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={k: v for k, v in os.environ.items() if k != "NO_SUCH_VARIABLE_SET"})
    assert done.returncode == 2
    assert "oncall.pagerduty.routing_key_env: environment variable NO_SUCH_VARIABLE_SET is not set" in done.stderr
