"""Fixtures for the whole suite: asyncio as the anyio backend (the nats-server fixture is in tests/router)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
