"""The installed `router` as a subprocess: config file, start, SIGKILL, SIGTERM, health, settling.

Fault-injection tests run the real daemon (`router run --config ...`) so that a SIGKILL
really is one. Every process started here runs in a session of its own and is killed by
process group in `close()`, which the `router_process` context manager calls on any exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats

from contracts.config import Config, load_config
from tests.support.harness import all_applied, check_against_fold
from tests.support.oracle import Expected, expected_reply, read_stream

# A per-key state query waits at most this long for a reply.
QUERY_TIMEOUT = 5.0


def router_executable() -> str:
    """The `router` console script of the environment running the tests."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "router"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("the `router` console script is not installed next to this interpreter")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, url: str, **sections: dict[str, Any]) -> Config:
    """Write a config.toml for a test router (snapshots in the file's folder) and return it parsed."""
    tables: dict[str, dict[str, Any]] = {
        "nats": {"url": url},
        "snapshots": {"path": "data/router.db", "every": "200ms"},
        "router": {"shutdown_timeout": "10s"},
        "log": {"level": "info", "format": "json"},
        # The seeded workloads of these tests lie a day ahead (so that no timer fires during a
        # test): a skew guard of two days lets them through. A test of the guard sets its own.
        "rules": {"max_future_skew": "2d"},
        # Never the default 127.0.0.1:8080: tests run in parallel (the URL is in data/http.url).
        "http": {"listen": "127.0.0.1:0"},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return load_config(path)


class RouterProcess:
    """One `router run` subprocess at a time for a config file; restartable; logs appended to one file."""

    def __init__(self, config_path: Path, log_path: Path | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path or config_path.with_name("router.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [router_executable(), "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.config_path.parent,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL the router's whole process group and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.kills += 1
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop_signal(self) -> None:
        """SIGSTOP the router: frozen mid-work, as a crash would leave it (SIGKILL still works)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM the router; (exit code or None when it outlived `timeout`, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - started

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Leave nothing running (the router and anything in its process group)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines (structlog) written so far."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@contextlib.contextmanager
def router_process(config_path: Path, *, start: bool = True) -> Iterator[RouterProcess]:
    rp = RouterProcess(config_path)
    try:
        if start:
            rp.start()
        yield rp
    finally:
        rp.close()


# --- talking to it --------------------------------------------------------------------------


async def health(nc: Any) -> dict[str, Any] | None:
    """The `router.health` reply, or None when no router answers."""
    try:
        reply = await nc.request("router.health", b"", timeout=1.0)
    except Exception:
        return None
    try:
        return json.loads(reply.data)  # type: ignore[no-any-return]
    except ValueError:
        return None


async def wait_healthy(url: str, rp: RouterProcess, timeout: float = 20.0) -> dict[str, Any]:
    """Until the router answers `router.health` with status ok; fails early when it exits."""
    nc = await nats.connect(url)
    try:
        with anyio.fail_after(timeout):
            while True:
                if not rp.running:
                    raise AssertionError(
                        f"router exited with {rp.proc.returncode if rp.proc else None}:\n{rp.tail()}"
                    )
                h = await health(nc)
                if h is not None and h.get("status") == "ok":
                    return h
                await anyio.sleep(0.05)
    finally:
        await nc.close()


async def settle_process(url: str, cfg: Config, rp: RouterProcess, timeout: float = 60.0) -> dict[str, Any]:
    """Until the subprocess router applied all of EVENTS (its own actor messages too) and confirmed every effect."""
    nc = await nats.connect(url)
    try:
        jsm = nc.jsm()
        quiet = 0
        last_seen = -1
        with anyio.fail_after(timeout):
            while True:
                if not rp.running:
                    raise AssertionError(
                        f"router exited with {rp.proc.returncode if rp.proc else None}:\n{rp.tail()}"
                    )
                last = int((await jsm.stream_info(cfg.streams.events)).state.last_seq or 0)
                h = await health(nc)
                done = (
                    h is not None
                    and h.get("status") == "ok"
                    and h.get("unconfirmed_publishes") == 0
                    and await all_applied(jsm, cfg, [p["applied_seq"] for p in h["partitions"]], last)
                )
                quiet = quiet + 1 if done and last == last_seen else 0
                last_seen = last
                if quiet >= 3:
                    assert h is not None
                    return h
                await anyio.sleep(0.1)
    finally:
        await nc.close()


async def settled_exactly_once(url: str, cfg: Config, rp: RouterProcess, timeout: float = 60.0) -> Expected:
    """settle_process, then assert_exactly_once and check_all_states: what every crash test ends with."""
    await settle_process(url, cfg, rp, timeout=timeout)
    exp = await assert_exactly_once(url, cfg)
    await check_all_states(url, exp)
    return exp


async def query_states(url: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """`router.state.<kind>.<key>` replies for many keys over one connection."""
    nc = await nats.connect(url)
    out: dict[tuple[str, str], Any] = {}
    try:
        for kind, key in keys:
            reply = await nc.request(f"router.state.{kind}.{key}", b"", timeout=QUERY_TIMEOUT)
            out[(kind, key)] = json.loads(reply.data)
    finally:
        await nc.close()
    return out


async def assert_exactly_once(url: str, cfg: Config) -> Expected:
    """check_against_fold, plus: no exception id twice, timer-caused ones included."""
    exp = await check_against_fold(url, cfg)
    ids = Counter(json.loads(m.data)["id"] for m in await read_stream(url, cfg.streams.exceptions))
    repeated = [i for i, n in ids.items() if n > 1]
    assert not repeated, f"exceptions published twice: {repeated[:5]}"
    return exp


async def check_all_states(url: str, exp: Expected) -> int:
    """Every folded key's state reply from the live router equals the fold's; returns how many."""
    keys = sorted(exp.states)
    got = await query_states(url, keys)
    bad = []
    for k in keys:
        want = json.loads(json.dumps(expected_reply(k[0], k[1], exp.states[k], exp.th)))
        if got[k] != want:
            bad.append(f"{k[0]}:{k[1]}\n got {got[k]}\nwant {want}")
    assert not bad, f"{len(bad)} of {len(keys)} states differ from the fold, e.g.\n" + "\n".join(bad[:3])
    return len(keys)


__all__ = [
    "RouterProcess",
    "assert_exactly_once",
    "check_all_states",
    "health",
    "query_states",
    "router_executable",
    "router_process",
    "settle_process",
    "wait_healthy",
    "write_config",
]
