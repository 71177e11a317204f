"""The router's wire contract as msgspec types: events, exceptions, rules, config, times.

Pure data, no I/O. `contracts.events` holds one tagged union per kind, `contracts.decode`
turns a stored message into an event or a dead-letter reason.
"""

from contracts.config import Config, ConfigError, duration_us, load_config
from contracts.decode import DecodeError, decode_event, parse_subject
from contracts.events import DECODERS, EVENT_TYPES, KEY_RE, KINDS
from contracts.exceptions import ExceptionEvent, exception_id, timer_cause
from contracts.rules import RULES, SEVERITY

__all__ = [
    "DECODERS",
    "EVENT_TYPES",
    "KEY_RE",
    "KINDS",
    "RULES",
    "SEVERITY",
    "Config",
    "ConfigError",
    "DecodeError",
    "ExceptionEvent",
    "decode_event",
    "duration_us",
    "exception_id",
    "load_config",
    "parse_subject",
    "timer_cause",
]
