"""The cluster copy of partition state: a JetStream KV bucket, one key per actor, last value kept.

Bucket `<[router] consumer>_state` (`router_state` by default; file storage, `[streams]
replicas` replicas, history 1: the server keeps only the newest value of each key), keys:

- `p<partition>.a.<kind>.<key>`: one actor, its stored record (`CopiedActor`: the sequence of
  the last event it applied, its encoded state, its timers), as the snapshot store holds it.
- `p<partition>.m`: the partition's marks (`CopyMarks`: applied-through, effects-confirmed,
  delivered-through), written by compare-and-set on the revision its writer last read or wrote.

The snapshot store on the instance's disk is the working copy; this bucket is the copy that
outlives the instance. Actors are written before the marks that cover them, and both before
the local store (see `router.engine.clustercopy`). Actor writes are plain publishes with a
reply subject, sent in windows and confirmed by their PubAcks (no `Nats-Msg-Id`: writing the
same value twice is harmless, and 100k ids per snapshot would fill the duplicate window).

Reading a partition back uses batched direct gets (`$JS.API.DIRECT.GET`, nats-server 2.11+;
KV buckets allow direct gets) filtered on `p<partition>.a.>`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

import anyio
import anyio.lowlevel
import msgspec
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from router.jetstream.parser import FastParser

BUCKET_SUFFIX: Final = "_state"
# Actor writes outstanding at once (sent, PubAck not yet received). Small enough that a snapshot's
# burst does not hold the drain: 4,000 doubled the exception latency p99 (15.2 ms vs 8.9 ms at 500).
WINDOW: Final = 500
# Actor records per direct-get batch when reading a partition back.
READ_BATCH: Final = 100_000  # (1M actors read: 21.3 s in batches of 20,000, 8.5 s of 100,000; 100k: 3.5 s of 5,000)
# How long one window of actor writes may wait for its PubAcks before the missing ones are sent again.
ACK_WAIT_S: Final = 3.0


def bucket_name(consumer: str) -> str:
    return f"{consumer}{BUCKET_SUFFIX}"


def actor_key(partition: int, kind: str, key: str) -> str:
    return f"p{partition}.a.{kind}.{key}"


def marks_key(partition: int) -> str:
    return f"p{partition}.m"


class CopyMarks(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """How far the copy of one partition goes: events <= applied are in its actors, effects of
    events <= effects are confirmed published, the router received events up to delivered."""

    applied: int
    effects: int
    delivered: int = 0
    epoch: int = 0  # the ownership epoch of the writer (informational)
    instance: str = ""  # the writer


class CopiedActor(msgspec.Struct, array_like=True, gc=False):
    """One actor's value in the bucket: what `snapshots.ActorRecord` holds, minus kind and key (in the key)."""

    last_seq: int
    state: bytes
    timers: dict[str, int] | None = None


_MARKS_ENC: Final = msgspec.json.Encoder()
_MARKS_DEC: Final = msgspec.json.Decoder(CopyMarks)
_ACTOR_ENC: Final = msgspec.msgpack.Encoder()
_ACTOR_DEC: Final = msgspec.msgpack.Decoder(CopiedActor)
# A key's open exceptions (p<partition>.o.<kind>.<key>): the whole set, [(rule, location, severity, payload)].
OpenSet = list[tuple[str, str, str, str]]
_OPEN_ENC: Final = msgspec.msgpack.Encoder()
_OPEN_DEC: Final = msgspec.msgpack.Decoder(list[tuple[str, str, str, str]])


def encode_open_set(rows: OpenSet) -> bytes:
    return _OPEN_ENC.encode(rows)


class CopyUnavailable(Exception):
    """The copy could not be read or written now (NATS away, a timeout, a refused write)."""


class CopyConflict(Exception):
    """The marks changed since the revision this writer knows: another instance wrote them."""


def encode_actor(last_seq: int, state: bytes, timers: Mapping[str, int] | None) -> bytes:
    return _ACTOR_ENC.encode(CopiedActor(last_seq, state, dict(timers) if timers is not None else None))


def decode_actor(data: bytes) -> CopiedActor:
    return _ACTOR_DEC.decode(data)


class _Window:
    __slots__ = ("done", "left")

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = anyio.Event()


class StateCopy:
    """The bucket, for every partition of this instance. Open with `await StateCopy.open(...)`."""

    def __init__(self, nc: NATS, kv: KeyValue, name: str, timeout: float = 5.0) -> None:
        self.nc = nc
        self.kv = kv
        self.name = name
        self.stream = f"KV_{name}"
        self.prefix = f"$KV.{name}."
        self.timeout = timeout
        self._inbox = nc.new_inbox() + ".sc"
        self._sub: Any = None
        self._next = 0
        self._waiting: dict[int, _Window] = {}  # token -> the window of writes it belongs to
        self.bytes_written = 0  # payload and subject bytes of every actor and marks write
        self.actors_written = 0

    @classmethod
    async def open(cls, nc: NATS, name: str, *, replicas: int, io_timeout: float = 5.0) -> StateCopy:
        js = nc.jetstream(timeout=io_timeout)
        try:
            kv = await js.key_value(name)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                api.KeyValueConfig(
                    bucket=name, history=1, storage=api.StorageType.FILE, replicas=replicas, direct=True,
                    description="ops-router: the cluster copy of each partition's state",
                )
            )
        return cls(nc, kv, name, io_timeout)

    async def start(self, raw_path: Callable[[Any, Callable[..., None]], None] | None = None) -> None:
        """Subscribe the PubAck inbox (before the first write)."""
        self._sub = await self.nc.subscribe(
            self._inbox + ".*", cb=self._on_ack, pending_msgs_limit=0, pending_bytes_limit=0
        )
        if raw_path is not None:
            raw_path(self._sub, self.on_ack_raw)

    async def close(self) -> None:
        if self._sub is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    # ------------------------------------------------------------------ marks

    async def read_marks(self, partition: int) -> tuple[CopyMarks | None, int]:
        """(marks, revision) of a partition; (None, 0) when it has none yet."""
        try:
            with anyio.fail_after(self.timeout):
                entry = await self.kv.get(marks_key(partition))
        except KeyNotFoundError:
            return None, 0
        except Exception as exc:
            raise CopyUnavailable(f"reading {self.name} {marks_key(partition)}: {exc!r}") from exc
        if not entry.value:
            return None, int(entry.revision or 0)
        return _MARKS_DEC.decode(entry.value), int(entry.revision or 0)

    async def write_marks(self, partition: int, marks: CopyMarks, last: int) -> int:
        """Write the marks if their revision is still `last` (0: none yet); the new revision.

        CopyConflict when another writer changed them since."""
        data = _MARKS_ENC.encode(marks)
        key = marks_key(partition)
        try:
            with anyio.fail_after(self.timeout):
                if last:
                    rev = await self.kv.update(key, data, last=last)
                else:
                    rev = await self.kv.create(key, data)
        except KeyWrongLastSequenceError as exc:
            raise CopyConflict(f"{self.name} {key} changed since revision {last}: {exc}") from exc
        except Exception as exc:
            if "wrong last sequence" in str(exc) or "key exists" in str(exc):
                raise CopyConflict(f"{self.name} {key} changed since revision {last}: {exc}") from exc
            raise CopyUnavailable(f"writing {self.name} {key}: {exc!r}") from exc
        self.bytes_written += len(data) + len(self.prefix) + len(key)
        return int(rev)

    # ------------------------------------------------------------------ actors

    async def write_actors(
        self, partition: int, rows: Sequence[Any], fence: Callable[[], None] | None = None,
        *, within: float = 30.0, open_sets: Sequence[tuple[str, str, bytes]] = (),
    ) -> None:
        """Write actor records (`snapshots.ActorRecord`s) and wait until the stream stored all.

        Sent in windows of WINDOW; what is not confirmed within ACK_WAIT_S is sent again. Raises
        CopyUnavailable when they are not all stored within `within` seconds; `fence()` is asked
        before every window (what it raises stops the write)."""
        if not rows and not open_sets:
            return
        nc = self.nc
        prefix = f"{self.prefix}p{partition}.a."
        inbox = self._inbox
        deadline = time.monotonic() + within
        pending: list[tuple[bytes, bytes]] = []  # (subject, payload) still to be confirmed
        enc = _ACTOR_ENC.encode
        head = prefix.encode()
        for i, r in enumerate(rows):
            timers = r.timers
            payload = enc(CopiedActor(r.last_seq, r.state, dict(timers) if timers is not None else None))
            subject = b"%s%s.%s" % (head, r.kind.encode(), r.key.encode())
            pending.append((subject, payload))
            self.bytes_written += len(payload) + len(subject)
            if not i & 1023:
                await anyio.lowlevel.checkpoint()
        self.actors_written += len(rows)
        head_open = f"{self.prefix}p{partition}.o.".encode()
        for kind, key, payload in open_sets:
            subject = b"%s%s.%s" % (head_open, kind.encode(), key.encode())
            pending.append((subject, payload))
            self.bytes_written += len(payload) + len(subject)
        reply = inbox.encode()
        while pending:
            if time.monotonic() >= deadline:
                raise CopyUnavailable(
                    f"{len(pending)} of {len(rows)} actor writes to {self.name} were not confirmed in {within:.0f} s"
                )
            if fence is not None:
                fence()
            window, pending = pending[:WINDOW], pending[WINDOW:]
            tokens: dict[int, tuple[bytes, bytes]] = {}
            w = _Window(len(window))
            buf: list[bytes] = []
            for subject, payload in window:
                # PUB <subject> <reply> <length>: the reply's last token names this write.
                self._next += 1
                tok = self._next
                tokens[tok] = (subject, payload)
                self._waiting[tok] = w
                buf.append(b"PUB %s %s.%d %d\r\n%s\r\n" % (subject, reply, tok, len(payload), payload))
            try:
                if not nc.is_connected:
                    raise CopyUnavailable(f"not connected to NATS (writing {self.name})")
                await nc._send_command(b"".join(buf))
                await nc._flush_pending()
                with anyio.move_on_after(min(ACK_WAIT_S, max(0.1, deadline - time.monotonic()))):
                    await w.done.wait()
            finally:
                missed = [tok for tok in tokens if self._waiting.pop(tok, None) is not None]
            if missed:
                pending = [tokens[t] for t in missed] + pending
                await anyio.sleep(0.05)

    async def _on_ack(self, msg: Any) -> None:
        self.on_ack_raw(msg.subject.encode(), b"", msg.data, msg.headers)

    def on_ack_raw(self, subject: bytes, reply: bytes, data: bytes, hdr: dict[str, str] | None) -> None:
        """A PubAck of an actor write: confirmed unless empty (no responders) or an error (sent again)."""
        try:
            tok = int(subject[subject.rfind(b".") + 1 :])
        except ValueError:
            return
        if not data or b'"error"' in data:
            return
        w = self._waiting.pop(tok, None)
        if w is not None:
            w.left -= 1
            if not w.left:
                w.done.set()

    async def read_actors(self, partition: int) -> AsyncIterator[list[tuple[str, str, CopiedActor]]]:
        """The partition's actors in the copy, in batches of (kind, key, value)."""
        async for batch in self.read_section(partition, "a"):
            yield [(kind, key, _ACTOR_DEC.decode(data)) for kind, key, data in batch]

    async def read_open_sets(self, partition: int) -> dict[tuple[str, str], list[tuple[str, str, str, str]]]:
        """{(kind, key): [(rule, location, severity, payload)]} of the partition's open exceptions."""
        out: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {}
        async for batch in self.read_section(partition, "o"):
            for kind, key, data in batch:
                rows = _OPEN_DEC.decode(data)
                if rows:
                    out[(kind, key)] = rows
        return out

    async def read_section(self, partition: int, section: str) -> AsyncIterator[list[tuple[str, str, bytes]]]:
        """The values under `p<partition>.<section>.>`, in batches of (kind, key, raw value);
        CopyUnavailable when the server does not answer or refuses."""
        try:
            async for batch in self._read_section(partition, section):
                yield batch
        except (TimeoutError, NatsError) as exc:
            raise CopyUnavailable(f"reading {self.name} p{partition}.{section}.>: {exc!r}") from exc

    async def _read_section(self, partition: int, section: str) -> AsyncIterator[list[tuple[str, str, bytes]]]:
        info = await self.nc.jsm().stream_info(self.stream)
        upto = int(info.state.last_seq or 0)
        if not upto:
            return
        filt = f"{self.prefix}p{partition}.{section}.>"
        skip = len(self.prefix) + len(f"p{partition}.{section}.")
        # (status, subject, stream sequence, payload) of each reply.
        replies: list[tuple[bytes, str, int, bytes]] = []
        arrived = anyio.Event()

        def on_raw(subject: bytes, reply: bytes, data: bytes, hdr: Any) -> None:
            # The header block unparsed (FastParser.raw_headers): only three fields are wanted.
            status, subj, seq = b"", "", 0
            if hdr:
                lines = bytes(hdr).split(b"\r\n")
                status = lines[0][9:12]
                for line in lines[1:]:
                    if line.startswith(b"Nats-Subject:"):
                        subj = line[13:].strip().decode()
                    elif line.startswith(b"Nats-Sequence:"):
                        seq = int(line[14:])
            replies.append((status, subj, seq, data))
            arrived.set()

        async def on_msg(msg: Any) -> None:  # nats-py's own path (a client without FastParser)
            h = msg.headers or {}
            replies.append((
                h.get("Status", "").encode(), h.get("Nats-Subject", ""), int(h.get("Nats-Sequence", 0) or 0), msg.data,
            ))
            arrived.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=0, pending_bytes_limit=0)
        parser = self.nc._ps
        if isinstance(parser, FastParser):
            parser.handlers[sub._id] = on_raw
            parser.raw_headers.add(sub._id)
        try:
            seq = 1
            while seq <= upto:
                req = msgspec.json.encode({"seq": seq, "next_by_subj": filt, "batch": READ_BATCH})
                await self.nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", req, reply=inbox)
                batch: list[tuple[str, str, bytes]] = []
                last = 0
                done = False
                with anyio.fail_after(max(30.0, self.timeout * 2)):  # (a batch of 100k under load)
                    while True:
                        while not replies:
                            arrived = anyio.Event()
                            await arrived.wait()
                        got = replies
                        replies = []
                        for status, subj, mseq, data in got:
                            if status == b"204":  # the end of this batch
                                break
                            if status:
                                if status != b"404":
                                    raise CopyUnavailable(f"direct get on {self.stream}: status {status.decode()}")
                                done = True
                                break
                            last = mseq
                            kind, _, key = subj[skip:].partition(".")
                            batch.append((kind, key, data))
                        else:
                            continue
                        break
                if batch:
                    yield batch
                if done or not last or last >= upto:
                    return
                seq = last + 1
        finally:
            if isinstance(parser, FastParser):
                parser.handlers.pop(sub._id, None)
                parser.raw_headers.discard(sub._id)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def stream_bytes(self) -> int:
        """Bytes the bucket's stream stores now."""
        info = await self.nc.jsm().stream_info(self.stream)
        return int(info.state.bytes or 0)


__all__ = [
    "CopiedActor",
    "CopyConflict",
    "CopyMarks",
    "CopyUnavailable",
    "StateCopy",
    "actor_key",
    "bucket_name",
    "decode_actor",
    "encode_actor",
    "encode_open_set",
    "marks_key",
]
