"""The on-call sink's SQLite state closes cleanly when the sink is stopped (cancelled)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SCRIPT = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from router.oncall.state import TargetState

    async def main() -> None:
        st = await TargetState.open(Path(sys.argv[1]))
        with anyio.CancelScope() as scope:
            scope.cancel()  # as at SIGTERM: the sink's scope is cancelled while it unwinds
            await st.close()

    anyio.run(main, backend_options={"use_uvloop": True})
    print("closed")
    """
)


def test_a_cancelled_close_finishes_before_the_loop_ends(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "alertmanager.db")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "closed"
    assert "Traceback" not in out.stderr, out.stderr
    assert "Event loop is closed" not in out.stderr


def test_status_tells_held_for_min_open_from_due_and_not_sent(tmp_path: Path) -> None:
    import anyio

    from contracts.oncall import OncallConfig
    from router.oncall.state import TargetState
    from router.oncall.status import TargetStatus, format_status
    from router.oncall.targets import Entry
    from router.oncall.worker import Worker

    now = 1_790_000_000_000_000

    async def main() -> TargetStatus:
        state = await TargetState.open(tmp_path / "webhook.db")
        try:
            for i, eligible in enumerate([now + 60_000_000, now - 1, now - 5_000_000]):
                key = f"sku|SKU-{i}|low_stock|L"
                state.entries[key] = Entry(key, {}, b"{}", {}, "held", eligible)
            status = TargetStatus()
            target: Any = SimpleNamespace(name="webhook")
            nc: Any = None
            worker = Worker(target, state, nc, "EXCEPTIONS", OncallConfig(), status, clock=lambda: now)
            worker._update_status()
            return status
        finally:
            await state.close()

    status = anyio.run(main)
    assert (status.held, status.due) == (1, 2)
    data = {"pid": 1, "started_at": "t0", "updated_at": "t1", "targets": {"webhook": status.as_json()}}
    assert data["targets"]["webhook"]["pending"] == {"stream": 0, "held": 1, "due": 2}
    assert "1 held for min_open, 2 due and not sent yet; open 0" in format_status(data)
    status.due = 0
    assert "1 held for min_open; open 0" in format_status({**data, "targets": {"webhook": status.as_json()}})
