"""The delivered mark a restart checks stored effects up to outlives the consumer it came from.

Every start recreates the partition's consumer, whose delivered mark then covers only the run
after it. A run that crashed having received less than an earlier one must still check the
earlier run's stored-but-unacknowledged effects (seen in the SIGKILL + SIGSTOP fault test: an
exception published twice once the duplicate window had passed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from router.engine.startup import delivered_through
from snapshots import Store

pytestmark = pytest.mark.anyio


async def test_the_highest_delivered_mark_of_any_run_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "router.db"
    async with await Store.open(path) as store:
        assert await delivered_through(store, 0, 0, 0) == 0
        assert await delivered_through(store, 0, 4000, 10) == 4000  # run 1 received through 4000
        assert await delivered_through(store, 0, 8000, 700) == 8000  # run 2 got further
    async with await Store.open(path) as store:
        # Run 3's consumer, recreated at start, received only through 4000 before it died.
        assert await delivered_through(store, 0, 4000, 1300) == 8000
        assert await delivered_through(store, 1, 10, 0) == 10  # each partition its own
        assert await delivered_through(store, 0, 0, 1300) == 8000


async def test_a_start_with_nothing_unconfirmed_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "router.db"
    async with await Store.open(path) as store:
        assert await delivered_through(store, 0, 1500, 1500) == 1500
        assert await store.read_blob("delivered_through.0") is None
