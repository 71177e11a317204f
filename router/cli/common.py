"""What the `router` command's subcommands share: exit codes, usage errors, running async code until interrupted."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final, TextIO

import anyio
import anyio.lowlevel

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


class UsageError(Exception):
    """Bad arguments that argparse cannot see (exit 2)."""


# --- running async code ----------------------------------------------------------------


def _backend_options() -> dict[str, Any]:
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def run_async(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """anyio on asyncio, with uvloop when installed."""
    return anyio.run(fn, *args, backend="asyncio", backend_options=_backend_options())


async def until_interrupted(body: Callable[[], Awaitable[None]]) -> bool:
    """Run `body` until it returns or SIGINT/SIGTERM arrives; True when interrupted."""
    try:
        return await _body_or_signal(body)
    except BaseExceptionGroup as group:
        # One task failed (for example a ClientError): report that, not the group.
        inner = single_exception(group)
        if inner is not group:
            raise inner from None
        raise


async def _body_or_signal(body: Callable[[], Awaitable[None]]) -> bool:
    interrupted = False
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            nonlocal interrupted
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    interrupted = True
                    tg.cancel_scope.cancel()
                    return

        async def main() -> None:
            await body()
            tg.cancel_scope.cancel()

        tg.start_soon(on_signal)
        tg.start_soon(main)
    return interrupted


def err(message: str) -> None:
    print(f"router: {message}", file=sys.stderr)


def color(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) and "NO_COLOR" not in os.environ



def single_exception(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else `exc`."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc

