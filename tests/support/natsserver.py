"""A real JetStream nats-server for one test: free loopback port, temporary store, restartable.

`NatsServer.start()` returns once the server accepts connections with JetStream on;
`stop()` is a graceful SIGTERM, `kill()` a SIGKILL, and `start()` again brings it back on
the same port and store (fault-injection tests). The fixture in tests/conftest.py always
stops it at teardown. `config=` adds a server config file (TLS, users); `ready_in_log=True`
waits for the log's "Server is ready" instead of a plain-text INFO (a server that speaks TLS
first sends none).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from router.jetstream.embedded import find_nats_server

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nothing listens on now (never the default 4222)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port != 4222:
            return port


def server_info(port: int, timeout: float = 0.5) -> dict[str, object] | None:
    """The INFO the server sends on connect, or None when nothing NATS-like answers."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            buf = b""
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return None
                buf += chunk
    except OSError:
        return None
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    with contextlib.suppress(ValueError):
        info = json.loads(line[5:])
        if isinstance(info, dict):
            return info
    return None


class NatsServer:
    """One nats-server process with JetStream on `127.0.0.1:<port>`, store in `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        *,
        log_path: Path | None = None,
        config: Path | None = None,
        ready_in_log: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.config = config
        self.ready_in_log = ready_in_log
        self.port = port if port is not None else free_port()
        self.url = f"nats://{HOST}:{self.port}"
        self.log_path = log_path or self.store_dir.with_name(self.store_dir.name + ".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 15.0) -> None:
        """Start (or restart) on the same port and store; return once JetStream answers."""
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        cmd = [find_nats_server(), "-js", "-a", HOST, "-p", str(self.port), "-sd", str(self.store_dir)]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.ready_in_log:
                if "Server is ready" in self._log_tail(offset, lines=1000):
                    return
            else:
                info = server_info(self.port)
                if info is not None and info.get("jetstream"):
                    return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"nats-server on {self.url} did not start: {self._log_tail(offset)}")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM); SIGKILL when it takes longer than `timeout`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._wait_port_released()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._wait_port_released()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _wait_port_released(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server_info(self.port, timeout=0.1) is not None:
            time.sleep(0.02)

    def _log_tail(self, offset: int, lines: int = 10) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return " | ".join(ln.strip() for ln in text.splitlines()[-lines:] if ln.strip()) or "(no output)"

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.kill()
        else:
            self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"NatsServer({self.url}, {state}, store={self.store_dir})"
