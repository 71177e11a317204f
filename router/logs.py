"""One structlog configuration for the whole process: console lines on a TTY, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any, Final, Literal, TextIO

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, Processor, WrappedLogger

from contracts.secrets import redact, redact_text

LogFormat = Literal["auto", "console", "json"]

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _StderrLogger:
    """Writes each rendered line to the current `sys.stderr` (so a swapped stream is honoured)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _StderrHandler(logging.Handler):
    """A stdlib handler for the current `sys.stderr` (or a fixed stream)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self._stream or sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Every log line's fields through `contracts.secrets.redact`: secret keys masked, and URL
    credentials, nkey seeds, JWTs and private keys masked inside any text."""
    out: EventDict = redact(event_dict)
    return out


def redact_rendered(_logger: WrappedLogger, _method: str, line: Any) -> Any:
    """The rendered line once more (a traceback the console renderer formats itself)."""
    return redact_text(line) if isinstance(line, str) else line


# A traceback's local variables can hold anything, secrets included: frames without them.
_dict_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _no_starttls_eof_warning(record: logging.LogRecord) -> bool:
    """Drop asyncio's "returning true from eof_received() has no effect when using ssl".

    nats-py upgrades a plain connection to TLS (`loop.start_tls`), so asyncio's stream protocol
    does not know it is over TLS and asyncio warns each time such a connection closes: one noise
    line per client command and per reconnect against a TLS server, saying nothing wrong.
    """
    return not (record.name == "asyncio" and str(record.msg).startswith("returning true from eof_received()"))


def _renderer(fmt: LogFormat, stream: TextIO) -> tuple[Processor, bool]:
    """The final processor and whether the output is for people."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "console" if isatty is not None and isatty() else "json"
    if fmt == "console":
        isatty = getattr(stream, "isatty", None)
        colors = bool(isatty is not None and isatty())
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, sort_keys=False, exception_formatter=structlog.dev.plain_traceback
        )
        return renderer, True
    return structlog.processors.JSONRenderer(), False


QUIET_LIBRARIES: Final = ("aiosqlite", "httpcore", "hpack")


def configure_logging(level: str = "info", fmt: LogFormat = "auto", *, stream: TextIO | None = None) -> None:
    """Configure structlog (and route stdlib `logging` through it) to write to stderr.

    `fmt="auto"` renders human-readable lines when stderr is a terminal and JSON lines
    otherwise. Timestamps are ISO 8601 in UTC. `level` is debug, info, warning or error.
    Secrets never reach the output: every line, the router's and the libraries', passes
    `redact_secrets` before it is rendered and `redact_rendered` after.
    """
    try:
        level_no = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (use one of {', '.join(LEVELS)})") from None
    out = stream or sys.stderr
    renderer, human = _renderer(fmt, out)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Processor] = [
        *([] if human else [_dict_tracebacks]),
        redact_secrets,
        renderer,
        redact_rendered,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=lambda *_args: _StderrLogger(stream),
        # Not cached, so that a later configure_logging (tests, `router run` after
        # argument parsing) takes effect for module-level loggers too.
        cache_logger_on_first_use=False,
    )

    # Libraries that log through the standard library (asyncio, nats-py) render the same way.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = _StderrHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_no_starttls_eof_warning)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
    # At debug, these libraries log every SQL statement (aiosqlite) and every step of every HTTP
    # request (httpcore, hpack): most of the log, none of it about events. They say what matters
    # at info and above.
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(level_no, logging.INFO))
