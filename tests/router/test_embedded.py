"""The embedded nats-server: start and stop, the URL file, reuse after the owner was SIGKILLed, busy ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest

from router.jetstream.embedded import (
    OWNER_FILE,
    PID_FILE,
    URL_FILE,
    EmbeddedServerError,
    _pid_alive,
    embedded_server,
    find_nats_server,
    probe,
    read_url_file,
    start_embedded,
)
from tests.support.natsserver import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]

# A router stand-in: starts the embedded server, says its URL, then waits to be killed.
OWNER = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from router.jetstream.embedded import embedded_server
    from router.logs import configure_logging

    configure_logging("warning", "json")  # stderr; stdout carries only the URL

    async def main() -> None:
        async with embedded_server(Path(sys.argv[1]), int(sys.argv[2])) as url:
            print(url, flush=True)
            await anyio.sleep(600)

    anyio.run(main)
    """
)


_OWNERS: list[subprocess.Popen[str]] = []


def spawn_owner(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(data_dir), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    _OWNERS.append(proc)
    assert proc.stdout is not None
    with proc.stdout:
        url = proc.stdout.readline().strip()
    if not url:
        proc.kill()
        proc.wait(10)
        pytest.fail("the owner process did not start its embedded server")
    return proc, url


def server_pid(data_dir: Path) -> int:
    return int((data_dir / PID_FILE).read_text().strip())


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids of servers a test leaves behind on purpose; they and the owners are killed at teardown."""
    pids: list[int] = []
    yield pids
    while _OWNERS:
        owner = _OWNERS.pop()
        if owner.poll() is None:
            owner.kill()
        owner.wait(10)
    for pid in pids:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_binary_is_found_next_to_the_interpreter() -> None:
    path = Path(find_nats_server())
    assert path.name == "nats-server"
    assert os.access(path, os.X_OK)


async def test_start_writes_the_url_file_and_stop_removes_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with anyio.fail_after(30):
        async with embedded_server(data, 0) as url:
            assert url.startswith("nats://127.0.0.1:")
            assert (data / URL_FILE).read_text() == url + "\n"
            assert read_url_file(data) == url
            assert (data / "nats").is_dir()
            pid = server_pid(data)
            assert int((data / OWNER_FILE).read_text()) == os.getpid()
            nc = await nats.connect(url)
            try:
                js = nc.jetstream()
                await js.add_stream(name="T", subjects=["t.>"])
                ack = await js.publish("t.1", b"x")
                assert ack.seq == 1
            finally:
                await nc.close()
        assert not (data / URL_FILE).exists()
        assert not (data / OWNER_FILE).exists()
        assert not (data / PID_FILE).exists()
        assert wait_gone(pid)
        port = int(url.rsplit(":", 1)[1])
        assert await probe("127.0.0.1", port, within=0.5) is None


async def test_fixed_port_and_store_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    with anyio.fail_after(30):
        async with embedded_server(data, port) as url:
            assert url == f"nats://127.0.0.1:{port}"
            nc = await nats.connect(url)
            await nc.jetstream().add_stream(name="T", subjects=["t.>"])
            await nc.jetstream().publish("t.1", b"kept")
            await nc.close()
        async with embedded_server(data, port) as url2:
            assert url2 == url
            nc = await nats.connect(url2)
            msg = await nc.jsm().get_msg("T", 1)
            assert msg.data == b"kept"
            await nc.close()


async def test_reuses_the_server_left_by_a_sigkilled_owner(tmp_path: Path, leftovers: list[int]) -> None:
    data = tmp_path / "data"
    owner, url = spawn_owner(data, 0)
    pid = server_pid(data)
    leftovers.append(pid)
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name="T", subjects=["t.>"])
    await nc.jetstream().publish("t.1", b"before")
    await nc.close()

    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    assert _pid_alive(pid), "the server outlives its SIGKILLed owner (own session)"
    assert read_url_file(data) == url

    with anyio.fail_after(30):
        server = await start_embedded(data, 0)
        try:
            assert server.reused
            assert server.pid == pid
            assert server.url == url
            assert int((data / OWNER_FILE).read_text()) == os.getpid()
            nc = await nats.connect(server.url)
            assert (await nc.jsm().get_msg("T", 1)).data == b"before"
            await nc.close()
        finally:
            await server.stop()
    assert wait_gone(pid), "the adopted server is stopped with its new owner"
    assert not (data / URL_FILE).exists()


async def test_leftover_on_another_port_is_stopped_and_replaced(tmp_path: Path, leftovers: list[int]) -> None:
    data = tmp_path / "data"
    owner, url = spawn_owner(data, 0)
    old_pid = server_pid(data)
    leftovers.append(old_pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)

    port = free_port()
    with anyio.fail_after(30):
        async with embedded_server(data, port) as new_url:
            assert new_url == f"nats://127.0.0.1:{port}" != url
            assert wait_gone(old_pid)
            assert server_pid(data) != old_pid


async def test_leftover_that_does_not_answer_is_stopped(tmp_path: Path, leftovers: list[int]) -> None:
    data = tmp_path / "data"
    owner, url = spawn_owner(data, 0)
    old_pid = server_pid(data)
    leftovers.append(old_pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    os.kill(old_pid, signal.SIGSTOP)  # hung: accepts nothing
    try:
        with anyio.fail_after(30):
            async with embedded_server(data, 0, stop_timeout=0.3) as new_url:
                assert wait_gone(old_pid)
                assert new_url != url or server_pid(data) != old_pid
    finally:
        if _pid_alive(old_pid):
            os.kill(old_pid, signal.SIGCONT)


async def test_a_live_owner_is_not_taken_over(tmp_path: Path, leftovers: list[int]) -> None:
    data = tmp_path / "data"
    owner, _url = spawn_owner(data, 0)
    leftovers.append(server_pid(data))
    try:
        with pytest.raises(EmbeddedServerError, match=rf"another router \(pid {owner.pid}\)"):
            await start_embedded(data, 0)
        assert read_url_file(data) is not None, "the live owner's files are left alone"
        assert (data / OWNER_FILE).read_text().strip() == str(owner.pid)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)


async def test_the_router_that_adopted_a_server_owns_it(tmp_path: Path, leftovers: list[int]) -> None:
    data = tmp_path / "data"
    first, url = spawn_owner(data, 0)
    pid = server_pid(data)
    leftovers.append(pid)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    second, url2 = spawn_owner(data, 0)
    assert (url2, server_pid(data)) == (url, pid), "the second router adopted the orphan"
    with pytest.raises(EmbeddedServerError, match=rf"another router \(pid {second.pid}\)"):
        await start_embedded(data, 0)
    assert _pid_alive(pid)


async def test_busy_port_fails_with_one_line_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(EmbeddedServerError) as err:
            await start_embedded(tmp_path / "data", port)
    message = str(err.value)
    assert "[nats] embedded_port" in message
    assert str(port) in message
    assert "\n" not in message
    assert not (tmp_path / "data" / URL_FILE).exists()


async def test_stale_pid_file_of_another_process_is_ignored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / PID_FILE).write_text(f"{os.getpid()}\n")  # alive, but not a nats-server
    with anyio.fail_after(30):
        async with embedded_server(data, 0) as url:
            assert await probe("127.0.0.1", int(url.rsplit(":", 1)[1])) is not None
    assert _pid_alive(os.getpid())


async def test_a_server_that_cannot_start_reports_its_output(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "nats").write_text("a file where the store folder should be")
    with pytest.raises(EmbeddedServerError) as err:
        with anyio.fail_after(30):
            await start_embedded(data, 0, ready_timeout=10)
    message = str(err.value)
    assert "embedded nats-server" in message
    assert "nats-server.log" in message
    assert "\n" not in message
