"""A real Alertmanager for one test: free loopback port, temporary storage, no cluster, always stopped.

`alertmanager_binary()` finds Debian's `prometheus-alertmanager` (installed by .ci/run); without
it a test skips with the reason, or fails when CI=true (CI must run it). The config is
docs/alertmanager.yml with short group waits, so notifications and inhibitions show at once.

A test module that runs the router in its own process imports hypothesis first: pytest's
hypothesis plugin imports it at the end of the session otherwise, and its check of trio's random
generator, run after the router's `gc.freeze()`, cannot see the referrers and warns (an error here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.natsserver import HOST, free_port

DOCS_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "alertmanager.yml"


def alertmanager_binary() -> str:
    """The binary's path; skips the test without one (fails it under CI=true)."""
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found is None and Path("/usr/bin/prometheus-alertmanager").exists():
        found = "/usr/bin/prometheus-alertmanager"
    if found is None:
        reason = "prometheus-alertmanager is not installed (.ci/run installs Debian's package)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def am_test_config() -> str:
    """docs/alertmanager.yml with waits of a second instead of 30 s and minutes."""
    text = DOCS_CONFIG.read_text()
    for old, new in (("group_wait: 30s", "group_wait: 1s"), ("group_interval: 5m", "group_interval: 1s")):
        assert old in text, f"docs/alertmanager.yml no longer has {old!r}"
        text = text.replace(old, new)
    return text


class Alertmanager:
    def __init__(self, base: Path, config_text: str | None = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.config = base / "alertmanager.yml"
        self.config.write_text(config_text if config_text is not None else am_test_config())
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "alertmanager.log"

    def start(self, timeout: float = 20.0) -> None:
        binary = alertmanager_binary()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config}",
                    f"--storage.path={self.base / 'data'}",
                    f"--web.listen-address={HOST}:{self.port}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"alertmanager not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: the alerts Alertmanager holds that have not resolved (active,
        suppressed by an inhibition or a silence, and unprocessed ones), with their status."""
        query = "&".join(f"filter={urllib.request.quote(f'{k}={json.dumps(v)}')}" for k, v in filters.items())
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as resp:
            data = json.loads(resp.read())
        assert isinstance(data, list)
        return data


def by_labels(alerts: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Alerts keyed by (alertname, kind, key, location or '')."""
    out = {}
    for a in alerts:
        lab = a["labels"]
        out[(lab["alertname"], lab["kind"], lab["key"], lab.get("location", ""))] = a
    return out


@contextlib.contextmanager
def running_alertmanager(base: Path, config_text: str | None = None) -> Iterator[Alertmanager]:
    am = Alertmanager(base, config_text)
    try:
        am.start()
        yield am
    finally:
        am.stop()


__all__ = ["Alertmanager", "alertmanager_binary", "by_labels", "running_alertmanager"]
