"""The on-call sink's SQLite state closes cleanly when the sink is stopped (cancelled)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
