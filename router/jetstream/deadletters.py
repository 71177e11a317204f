"""Dead letters read back from DEADLETTER, and the durable record of which were redriven.

A dead letter (CONTRACT section 4) is the original payload of an event the router could not
apply, with `Router-Error`, `Router-Detail`, `Router-Subject` and `Router-Seq` headers.
`router dlq redrive` republishes it (as it was, or with fields replaced) to the event's
subject; the console lists dead letters by reason. Both read them with `read_dead_letters`.

Redrives are recorded in the JetStream KV bucket `<deadletter stream>_redriven`, one key
per dead letter, `dl.<its DEADLETTER sequence>`, written create-only: of two redrives of
the same dead letter (two terminals, two machines) exactly one claims it, and the record
outlives the stream's duplicate window. A record is written `pending` before the publish
and `sent` with the new EVENTS sequence after the stream acknowledged it; a redrive that
died between the two leaves `pending`, which the next redrive resolves by looking for its
`Nats-Msg-Id` (`redrive:<N>`) in EVENTS (see `router.cli.redrive`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, Final, Literal

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

BUCKET_SUFFIX: Final = "_redriven"
# The Nats-Msg-Id of a redriven event: the stream drops a second copy within its
# duplicate window, and a redrive that died before recording its sequence finds it by this.
MSG_ID_PREFIX: Final = "redrive:"


def bucket_name(deadletter_stream: str) -> str:
    return f"{deadletter_stream}{BUCKET_SUFFIX}"


def record_key(dead_letter: int) -> str:
    return f"dl.{dead_letter}"


def msg_id(dead_letter: int) -> str:
    return f"{MSG_ID_PREFIX}{dead_letter}"


class Redriven(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """What was redriven: the dead letter, where it went, when, from where."""

    dead_letter: int  # its DEADLETTER sequence (the #N of `router dlq list`)
    events_seq: int  # the EVENTS sequence of the event that was dead-lettered (Router-Seq)
    subject: str  # where it was republished
    state: Literal["pending", "sent"] = "pending"
    seq: int = 0  # the new EVENTS sequence, once sent
    events_last: int = 0  # EVENTS' last sequence before the publish: the new copy is after it
    at: str = ""  # RFC 3339 UTC, when claimed (the redriving machine's clock)
    host: str = ""
    changed: list[str] = msgspec.field(default_factory=list)  # the --set fields


_ENC: Final = msgspec.json.Encoder()
_DEC: Final = msgspec.json.Decoder(Redriven)


class AlreadyRedriven(Exception):
    """The dead letter has a record: it was redriven (or a redrive of it is under way)."""

    def __init__(self, record: Redriven | None, revision: int) -> None:
        super().__init__(f"dead letter #{record.dead_letter if record else '?'} already redriven")
        self.record = record
        self.revision = revision


class RedriveLedger:
    """The KV bucket of redrive records."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        self.kv = kv
        self.name = name

    @classmethod
    async def open(cls, nc: NATS, deadletter_stream: str, *, replicas: int = 1, create: bool = True) -> RedriveLedger:
        """Bind the bucket; create it when missing and `create` (else BucketNotFoundError)."""
        name = bucket_name(deadletter_stream)
        js = nc.jetstream(timeout=5)
        for attempt in range(3):
            try:
                return cls(await js.key_value(name), name)
            except BucketNotFoundError:
                if not create:
                    raise
                try:
                    kv = await js.create_key_value(
                        api.KeyValueConfig(
                            bucket=name,
                            description="ops-router: dead letters redriven (one create-only key per dead letter)",
                            history=4,
                            replicas=replicas,
                            storage=api.StorageType.FILE,
                        )
                    )
                except Exception:
                    if attempt == 2:
                        raise
                    continue  # created by another client meanwhile: bind to it
                return cls(kv, name)
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(self, dead_letter: int) -> tuple[Redriven, int] | None:
        """The record of a dead letter and its revision; None when it was never redriven."""
        try:
            entry = await self.kv.get(record_key(dead_letter))
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation is not None:
            return None  # a deleted key (a redrive whose publish failed released its claim)
        assert entry.revision is not None
        return self._decode(dead_letter, entry.value), int(entry.revision)

    def _decode(self, dead_letter: int, value: bytes) -> Redriven:
        try:
            return _DEC.decode(value)
        except msgspec.DecodeError:
            # Written by hand: still a record, so the dead letter counts as redriven.
            return Redriven(dead_letter=dead_letter, events_seq=0, subject="?", state="sent")

    async def claim(self, record: Redriven) -> int:
        """Create the record (it must not exist); its revision. AlreadyRedriven when it does."""
        try:
            return int(await self.kv.create(record_key(record.dead_letter), _ENC.encode(record)))
        except KeyWrongLastSequenceError:
            held = await self.get(record.dead_letter)
            raise AlreadyRedriven(held[0] if held else None, held[1] if held else 0) from None

    async def replace(self, record: Redriven, last: int) -> int:
        """Write `record` if the key is still at revision `last` (else AlreadyRedriven)."""
        try:
            return int(await self.kv.update(record_key(record.dead_letter), _ENC.encode(record), last=last))
        except KeyWrongLastSequenceError:
            held = await self.get(record.dead_letter)
            raise AlreadyRedriven(held[0] if held else None, held[1] if held else 0) from None

    async def release(self, dead_letter: int, last: int) -> None:
        """Delete a claim whose publish failed, so that the dead letter can be redriven again."""
        await self.kv.delete(record_key(dead_letter), last=last)

    async def numbers(self) -> set[int]:
        """The numbers of the dead letters with a record (one listing of the bucket's keys)."""
        try:
            keys = await self.kv.keys()
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            return set()
        return {int(k[3:]) for k in keys if k.startswith("dl.") and k[3:].isdigit()}

    async def all(self) -> dict[int, Redriven]:
        """Every record, by dead-letter number (the console marks redriven dead letters)."""
        out: dict[int, Redriven] = {}
        try:
            keys = await self.kv.keys()
        except Exception:  # nats-py raises NoKeysError on an empty bucket
            return out
        for key in keys:
            number = int(key.removeprefix("dl.")) if key.removeprefix("dl.").isdigit() else 0
            if number:
                held = await self.get(number)
                if held is not None:
                    out[number] = held[0]
        return out


async def read_dead_letters(
    nc: NATS,
    stream: str,
    *,
    subject: str = "deadletter.>",
    since: dt.datetime | None = None,
    start_seq: int | None = None,
    headers_only: bool = False,
    wait_s: float = 3.0,
) -> AsyncIterator[Any]:
    """The messages of the dead-letter stream from `since` (a time) or `start_seq`, oldest first.

    Stops at the stream's last message as of the call; NotFoundError when there is no stream.
    """
    filtered = subject != "deadletter.>"
    info = await nc.jsm().stream_info(stream, subjects_filter=subject if filtered else None)
    last = int(info.state.last_seq or 0)
    held = sum((info.state.subjects or {}).values()) if filtered else int(info.state.messages or 0)
    if not held or last == 0:
        return
    if since is not None:
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=since)
    elif start_seq is not None:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)
        )
        if start_seq > last:
            return
    else:
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
    config.headers_only = headers_only or None
    sub = await nc.jetstream().subscribe(subject, stream=stream, ordered_consumer=True, config=config)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=wait_s)
            except NatsTimeoutError:
                return  # nothing (more) matches: a filter or a start past every message
            md = msg.metadata
            if md.sequence.stream > last:
                return
            yield msg
            if md.num_pending == 0 or md.sequence.stream >= last:
                return
    finally:
        await sub.unsubscribe()


async def find_msg_id(
    nc: NATS, stream: str, subject: str, wanted: str, after: int, wait_s: float = 5.0
) -> int | None:
    """The sequence of the message of `subject` (a filter) after sequence `after` whose
    Nats-Msg-Id is `wanted`, or None. Reads headers only."""
    info = await nc.jsm().stream_info(stream)
    last = int(info.state.last_seq or 0)
    if last <= after:
        return None
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1, headers_only=True
    )
    sub = await nc.jetstream().subscribe(subject, stream=stream, ordered_consumer=True, config=config)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=wait_s)
            except NatsTimeoutError:
                return None
            if (msg.headers or {}).get("Nats-Msg-Id") == wanted:
                return int(msg.metadata.sequence.stream)
            if msg.metadata.num_pending == 0 or msg.metadata.sequence.stream >= last:
                return None
    finally:
        await sub.unsubscribe()
