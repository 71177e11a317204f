"""The router's own errors: one root, so a caller can catch what the router raises on purpose."""

from __future__ import annotations


class RouterError(Exception):
    """Raised by the router on purpose; the message says what happened."""


class FatalError(RouterError):
    """The router cannot start or go on; the message says what to do."""


__all__ = ["FatalError", "RouterError"]
