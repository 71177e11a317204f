"""`--log-level debug` shows the router's own debug lines, not every SQL statement and HTTP step."""

from __future__ import annotations

import io
import logging

import structlog

from router.logs import configure_logging


def test_debug_keeps_library_chatter_out_and_the_routers_lines_in() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    try:
        logging.getLogger("aiosqlite").debug("executing functools.partial(SELECT 1)")
        logging.getLogger("httpcore.http11").debug("send_request_headers.started request=<Request [b'POST']>")
        logging.getLogger("aiosqlite").warning("aiosqlite_warning_kept")
        structlog.get_logger().debug("dead_lettered", seq=7)
        logging.getLogger("nats.aio.client").debug("nats_debug_kept")
    finally:
        configure_logging("info", "json", stream=io.StringIO())
    text = out.getvalue()
    assert "executing functools" not in text
    assert "send_request_headers" not in text
    assert "aiosqlite_warning_kept" in text
    assert '"dead_lettered"' in text
    assert "nats_debug_kept" in text
