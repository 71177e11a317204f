"""Stream and consumer setup: EVENTS, EXCEPTIONS, DEADLETTER, and the durable partition consumers."""

from __future__ import annotations

import contextlib
from typing import Any, Final

import structlog
from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.manager import JetStreamManager

from contracts.config import Config, duration_us
from contracts.events import KINDS

log = structlog.get_logger()


class StreamSetupError(Exception):
    """A stream exists but cannot serve the router; the message names the setting to change."""


def partition_of(key: str, partitions: int) -> int:
    """The partition of a key, as the server's `{{partition(N, ...)}}` transform computes it."""
    if partitions <= 1:
        return 0
    h = 0x811C9DC5  # FNV-1a, 32 bit
    for b in key.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


# With more than one partition, the stream's transform maps `events.<kind>.<key>` (exactly
# two tokens) to `events.<partition>.<kind>.<key>`; a subject of any other shape is stored as
# published. Partition 0 also takes the ones that cannot be an event, so that they are
# dead-lettered as bad_subject: one token, or a kind followed by other than one key token.
# (A consumer's filters may not overlap, and none can say "a first token that is not a
# partition number": `events.pallet.a.b` or `events.99.sku.K` with fewer partitions are
# stored but taken by no partition.)
STRAY_FILTERS: Final = ("events.*", *(f"events.{kind}.>" for kind in KINDS))


def events_filters(cfg: Config, partition: int) -> list[str]:
    """The consumer filters of one partition."""
    if cfg.router.partitions <= 1:
        return ["events.>"]
    if partition == 0:
        return ["events.0.>", *STRAY_FILTERS]
    return [f"events.{partition}.>"]


def stored_subject_filter(subject: str, partitions: int) -> str:
    """The filter matching the stored copies of messages published on `subject`
    (`events.<kind>.<key>`): with more than one partition the stream stores them with the
    partition's number after `events.` (see the transform in `_stream_configs`)."""
    if partitions <= 1:
        return subject
    return "events.*." + subject[len("events.") :]


def consumer_name(cfg: Config, partition: int) -> str:
    if cfg.router.partitions <= 1:
        return cfg.router.consumer
    return f"{cfg.router.consumer}-p{partition}"


def _stream_configs(cfg: Config) -> list[tuple[api.StreamConfig, str]]:
    s = cfg.streams
    common: dict[str, Any] = {
        "retention": api.RetentionPolicy.LIMITS,
        "storage": api.StorageType.FILE,
        "max_age": duration_us(s.max_age) / 1e6,
        "duplicate_window": duration_us(s.duplicate_window) / 1e6,
        "num_replicas": s.replicas,
        "allow_direct": True,
    }
    events = api.StreamConfig(name=s.events, subjects=["events.>"], **common)
    if cfg.router.partitions > 1:
        n = cfg.router.partitions
        events.subject_transform = api.SubjectTransform(
            src="events.*.*", dest=f"events.{{{{partition({n},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
        )
    return [
        (events, "streams.events"),
        (api.StreamConfig(name=s.exceptions, subjects=["exceptions.>"], **common), "streams.exceptions"),
        (api.StreamConfig(name=s.deadletter, subjects=["deadletter.>"], **common), "streams.deadletter"),
    ]


def _covers(have: list[str], need: str) -> bool:
    need_t = need.split(".")
    for pattern in have:
        pt = pattern.split(".")
        ok = True
        for i, tok in enumerate(pt):
            if tok == ">":
                ok = i < len(need_t)
                break
            if i >= len(need_t) or (tok != "*" and tok != need_t[i]) or (tok == "*" and need_t[i] == ">"):
                ok = False
                break
        else:
            ok = ok and len(pt) == len(need_t)
        if ok:
            return True
    return False


def stores(patterns: list[str] | tuple[str, ...], subject: str) -> bool:
    """Whether a stream of these subject patterns stores `subject`."""
    return _covers(list(patterns), subject)


async def ensure_streams(jsm: JetStreamManager, cfg: Config) -> dict[str, api.StreamInfo]:
    """Create the three streams when missing; accept them when present and covering our subjects."""
    infos: dict[str, api.StreamInfo] = {}
    for want, setting in _stream_configs(cfg):
        assert want.name is not None
        assert want.subjects is not None
        try:
            info = await jsm.stream_info(want.name)
        except NotFoundError:
            info = await jsm.add_stream(want)
            log.info("stream_created", stream=want.name, subjects=want.subjects)
        else:
            have = info.config.subjects or []
            for need in want.subjects:
                if not _covers(have, need):
                    raise StreamSetupError(
                        f"stream {want.name} has subjects {have} which do not cover {need!r}: "
                        f"add {need!r} to the stream, or set `{setting}` to another stream name"
                    )
        infos[want.name] = info
    return infos


async def position_consumer(
    jsm: JetStreamManager, cfg: Config, partition: int, start_seq: int
) -> api.ConsumerInfo:
    """(Re)create the partition's durable pull consumer so it delivers from `start_seq`."""
    name = consumer_name(cfg, partition)
    with contextlib.suppress(NotFoundError):
        await jsm.delete_consumer(cfg.streams.events, name)
    config = api.ConsumerConfig(
        durable_name=name,
        ack_policy=api.AckPolicy.ALL,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        filter_subjects=events_filters(cfg, partition),
        max_ack_pending=cfg.router.max_ack_pending,
        ack_wait=60.0,
        max_waiting=64,
    )
    return await jsm.add_consumer(cfg.streams.events, config)


async def consumer_marks(jsm: JetStreamManager, cfg: Config, partition: int) -> tuple[int, int]:
    """(ack floor, last delivered) stream sequences of the partition's consumer; (0, 0) when none.

    Between the two lie events the last run received but did not acknowledge: their effects
    may be stored already (see `router.jetstream.recovery`).
    """
    try:
        info = await jsm.consumer_info(cfg.streams.events, consumer_name(cfg, partition))
    except NotFoundError:
        return 0, 0
    floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor is not None else 0
    delivered = int(info.delivered.stream_seq or 0) if info.delivered is not None else 0
    return floor, max(floor, delivered)
