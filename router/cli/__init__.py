"""What a user can type: the `router` command. `router run` composes the daemon here."""

from __future__ import annotations

from router.cli.main import main

__all__ = ["main"]
