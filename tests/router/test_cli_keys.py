"""The CLI checks a key with the contract's one key pattern before it asks the router (pure, fast)."""

from __future__ import annotations

import pytest

from router.cli.commands import _check_key
from router.cli.common import UsageError


@pytest.mark.parametrize("key", ["SKU-1", "a_b", "K" * 128])
def test_a_good_key_passes(key: str) -> None:
    _check_key(key)


@pytest.mark.parametrize("key", ["", "K" * 129, "A.B", "A B", "A\n", "Ä"])
def test_a_bad_key_is_a_usage_error(key: str) -> None:
    with pytest.raises(UsageError, match="is not 1-128 characters of A-Z a-z 0-9 _ -"):
        _check_key(key)
