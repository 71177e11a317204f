"""One target's worker: its durable consumer on EXCEPTIONS, its open entries, and its deliveries.

Each target (alertmanager, pagerduty, webhook) has a durable pull consumer of its own,
`<[oncall] consumer>_<target>`, so a target that is down holds back only itself. Messages are
handled one at a time in stream order:

- a raise (routed to the target) becomes an entry; it is sent once it has been open for its
  rule's `min_open` (counted from `detected_at`): at once when that has passed, else by the
  tick, unless a clear comes first (then nothing is sent at all). A back-fill raise (see
  `alerts.is_backfill`) is kept as `skipped`: never sent, and neither is its clear.
- a clear closes the entry: the target is told only when the raise was sent.
- every delivery is retried with exponential backoff (0.5 s doubling to 30 s) until the target
  accepts it; a message is acknowledged only once everything it caused was accepted (or refused
  for good, a 4xx, recorded as failed). While a delivery is retried the worker sends
  in-progress acks, so `ack_wait` (60 s) never lapses and the server redelivers nothing out of
  order; `max_ack_pending` (512) is above the fetch batch (100), so the consumer never stalls on
  its own limit. `max_deliver` is unlimited: nothing is ever dropped. A target away for an hour
  leaves its messages in the stream (the stream's retention bounds how long that may be) and
  the worker catches up in order once it is back.
- `done_seq` and the entries are written to `<data>/oncall/<target>.db` before the messages are
  acknowledged; on start the consumer is recreated at `done_seq + 1`, so a crash replays exactly
  the messages it may have half done (targets take repeats idempotently). The first start of a
  target folds what EXCEPTIONS already holds without sending, then sends what is still open.

Alertmanager and PagerDuty also close entries of finished entities (a delivered shipment, an
ended campaign: no clear is published for them), by comparing with `router.exceptions.open`
every `reconcile_every` once caught up: an entry missing from two complete replies in a row is
closed, an open exception missing here in two replies in a row is added. Alertmanager's entries
are re-posted every `resend_every`, and a raise is posted to it only if the router still lists
it open when it comes due (`_still_open`).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import NotFoundError

from contracts.oncall import OncallConfig, duration_us
from router.oncall import alerts
from router.oncall.openset import all_open
from router.oncall.state import TargetState
from router.oncall.status import TargetStatus, now_iso
from router.oncall.targets import Entry, Outcome, Target

log = structlog.get_logger()

FETCH_BATCH: Final = 100
MAX_ACK_PENDING: Final = 512
ACK_WAIT_S: Final = 60.0
KEEPALIVE_S: Final = 15.0
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
TICK_S: Final = 0.5
ROUTER_AWAY_S: Final = 15.0
RECENT_CLOSE_US: Final = 3_600_000_000  # see _clear: clears this recent are sent after a first start's fold
FINISHING_KINDS: Final = frozenset({"shipment", "campaign"})  # the kinds whose entities finish


def wall_us() -> int:
    return time.time_ns() // 1000


class Worker:
    def __init__(
        self, target: Target, state: TargetState, nc: NATS, stream: str, cfg: OncallConfig,
        status: TargetStatus, clock: Callable[[], int] = wall_us,
    ) -> None:
        self.target = target
        self.state = state
        self.nc = nc
        self.stream = stream
        self.cfg = cfg
        self.status = status
        self.now_us = clock
        self.consumer = f"{cfg.consumer}_{target.name}"
        self.min_open_us = {rule: duration_us(text) for rule, text in cfg.min_open.items()}
        self.backfill_us = duration_us(cfg.backfill_age)
        self.lock = anyio.Lock()
        self.unacked: list[Msg] = []
        self.last_keepalive = 0.0
        self.caught_up = False
        self.missing: dict[str, int] = {}
        self.extra: dict[str, int] = {}
        self.carriers: dict[str, str | None] = {}
        self.router_away_until = 0.0
        self.recent_closes: list[tuple[Entry, bytes]] = []

    @property
    def seeding(self) -> bool:
        return self.state.done_seq < self.state.seed_through

    # --- the consumer -------------------------------------------------------------------

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        sub = await self._bind()
        task_status.started()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._tick_loop)
            if self.target.resends:
                tg.start_soon(self._resend_loop)
            if self.target.reconciles:
                tg.start_soon(self._reconcile_loop)
            await self._consume(sub)

    async def _bind(self) -> Any:
        js = self.nc.jetstream()
        jsm = self.nc.jsm()
        while True:
            try:
                info = await jsm.stream_info(self.stream)
                break
            except (NatsError, NotFoundError, TimeoutError) as exc:
                log.warning("oncall_waiting_for_stream", stream=self.stream, error=repr(exc))
                await anyio.sleep(2.0)
        if self.state.created:
            # First start: what EXCEPTIONS holds now is folded silently, then what is open is sent.
            self.state.seed_through = int(info.state.last_seq or 0)
            await self.state.set_meta("seed_through", self.state.seed_through)
            await self.state.commit()
            self.state.created = False
        start = self.state.done_seq + 1
        with contextlib.suppress(NotFoundError):
            await jsm.delete_consumer(self.stream, self.consumer)
        await jsm.add_consumer(self.stream, api.ConsumerConfig(
            durable_name=self.consumer,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=MAX_ACK_PENDING,
            max_deliver=-1,
        ))
        log.info("oncall_target_started", target=self.target.name, consumer=self.consumer, from_seq=start,
                 seeding_through=self.state.seed_through if self.seeding else None, open=len(self.state.entries))
        return await js.pull_subscribe_bind(durable=self.consumer, stream=self.stream)

    async def _consume(self, sub: Any) -> None:
        while True:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
            except (NatsTimeout, TimeoutError):  # nothing new within the second
                msgs = []
            except (NatsError, OSError) as exc:
                log.warning("oncall_fetch_failed", target=self.target.name, error=repr(exc))
                await anyio.sleep(1.0)
                continue
            if not msgs:
                if self.seeding and await self._nothing_pending(sub):
                    # Nothing left to fold: what the stream held up to seed_through has gone (retention).
                    async with self.lock:
                        await self.state.commit(self.state.seed_through)
                    await self._seeded()
                self.caught_up = not self.seeding
                self.status.pending_stream = 0
                self._update_status()
                continue
            self.unacked = list(msgs)
            last = self.state.done_seq
            for msg in msgs:
                seq = int(msg.metadata.sequence.stream)
                if seq > self.state.done_seq and seq > last:
                    await self._handle(msg.data, silent=seq <= self.state.seed_through)
                    last = seq
            was_seeding = self.seeding
            async with self.lock:
                await self.state.commit(last)
            for msg in msgs:
                try:
                    await msg.ack()
                except NatsError as exc:  # redelivered later; done_seq skips it then
                    log.warning("oncall_ack_failed", target=self.target.name, error=repr(exc))
            self.unacked = []
            pending = int(msgs[-1].metadata.num_pending or 0)
            self.status.pending_stream = pending
            self.caught_up = pending == 0 and not self.seeding
            if was_seeding and not self.seeding:
                await self._seeded()
            self._update_status()

    async def _nothing_pending(self, sub: Any) -> bool:
        try:
            info = await sub.consumer_info()
        except (NatsError, TimeoutError) as exc:
            log.info("oncall_consumer_info_failed", target=self.target.name, error=repr(exc))
            return False
        return int(info.num_pending or 0) == 0 and int(info.num_ack_pending or 0) == 0

    async def _seeded(self) -> None:
        """A first start's fold is done: close what cleared lately, compare with the router."""
        log.info("oncall_seeded", target=self.target.name, through=self.state.seed_through,
                 open=len(self.state.entries))
        for entry, raw in self.recent_closes:
            async with self.lock:
                await self._close_now(entry, raw)
        self.recent_closes.clear()
        if self.target.reconciles:
            await self._reconcile(rounds_needed=1)

    def _update_status(self) -> None:
        s = self.status
        entries = self.state.entries.values()
        now = self.now_us()
        # Held: open for less than their rule's min_open. Due: past it and not sent yet (behind
        # the delivery being retried, or until the next check): not "held for min_open".
        s.held = sum(1 for e in entries if e.state == "held" and e.eligible_us > now)
        s.due = sum(1 for e in entries if e.state == "held" and e.eligible_us <= now)
        s.open = sum(1 for e in entries if e.state in ("sent", "sending"))
        s.skipped_backfill = sum(1 for e in entries if e.state == "skipped")
        s.done_seq = self.state.done_seq
        s.caught_up = self.caught_up

    async def _handle(self, data: bytes, *, silent: bool) -> None:
        try:
            exc = json.loads(data)
            status = exc["status"]
            alerts.alert_key(exc)
            alerts.parse_time_us(exc["detected_at"])
        except (ValueError, KeyError, TypeError) as error:
            log.warning("oncall_bad_exception", target=self.target.name, error=repr(error), payload=data[:200])
            return
        async with self.lock:
            if status == "raised":
                await self._raise(exc, data, silent=silent)
            elif status == "cleared":
                await self._clear(exc, data, silent=silent)

    # --- raise, clear, finish ----------------------------------------------------------

    async def _raise(self, exc: dict[str, Any], raw: bytes, *, silent: bool) -> None:
        if not self.target.routed(exc):
            return
        akey = alerts.alert_key(exc)
        old = self.state.entries.get(akey)
        if old is not None and old.exc.get("id") == exc.get("id"):
            return  # the same raise again (a replay, or the router's open set): nothing new
        was_sent = old is not None and old.state in ("sent", "sending")
        if alerts.is_backfill(exc, self.backfill_us) and not was_sent:
            await self.state.put(Entry(akey, exc, raw, {}, "skipped", 0))
            log.info("oncall_backfill_skipped", target=self.target.name, id=exc["id"])
            return
        eligible = alerts.parse_time_us(exc["detected_at"]) + self.min_open_us.get(str(exc["rule"]), 0)
        entry = Entry(akey, exc, raw, old.labels if old is not None and was_sent else {}, "held", eligible)
        await self.state.put(entry)
        if not silent and (was_sent or eligible <= self.now_us()):
            await self._open(entry)

    async def _clear(self, exc: dict[str, Any], raw: bytes | None, *, silent: bool) -> None:
        akey = alerts.alert_key(exc)
        old = self.state.entries.get(akey)
        if old is None:
            return
        if old.state in ("sent", "sending") and not silent:
            await self._deliver("close", old, lambda: self.target.close(old, raw, self.now_us()))
        elif silent and self.target.closes_recent_on_first_start and raw is not None:
            # A first start folds silently; a sink before it (elsewhere) may have opened what
            # cleared lately: closed once the fold is done (a close of nothing is a no-op).
            with contextlib.suppress(KeyError, ValueError, TypeError):
                if alerts.parse_time_us(exc["detected_at"]) >= self.now_us() - RECENT_CLOSE_US:
                    self.recent_closes.append((old, raw))
        await self.state.remove(akey)

    async def _close_now(self, entry: Entry, raw: bytes) -> None:
        if not entry.labels:
            entry.labels = alerts.labels(entry.exc, await self._carrier(entry.exc))
        await self._deliver("close", entry, lambda: self.target.close(entry, raw, self.now_us()))

    async def _still_open(self, exc: dict[str, Any]) -> bool:
        """Whether the router still lists the raise as open (Alertmanager only, which mirrors the
        open set): a raise on an entity that finished at the same event (a late delivery's
        `sla_breached`, spend after a campaign ended) never is, nor is one raised and cleared
        while Alertmanager was away; neither is posted. True when the router does not answer
        (better a page than none)."""
        if not self.target.checks_open or time.monotonic() < self.router_away_until:
            return True
        if exc["kind"] not in FINISHING_KINDS:
            # A SKU never finishes; if it cleared meanwhile, its clear follows in the stream and
            # resolves the alert at once (well inside Alertmanager's group_wait): asking would cost
            # more than the brief alert it spares (measured: half the delivery rate).
            return True
        found = await all_open(self.nc, {"kind": exc["kind"], "key": exc["key"], "rule": exc["rule"]}, wait_s=2.0)
        if found is None:
            # Not asked again for a while: a backlog must not wait for a router that is away.
            self.router_away_until = time.monotonic() + ROUTER_AWAY_S
            return True
        akey = alerts.alert_key(exc)
        return any(alerts.alert_key(e) == akey for e in found)

    async def _open(self, entry: Entry, *, check: bool = True) -> None:
        if entry.state == "held" and check and not await self._still_open(entry.exc):
            log.info("oncall_not_open", target=self.target.name, alert=entry.akey, id=entry.exc.get("id"))
            await self.state.set_state(entry, "closed")
            await self.state.db.commit()
            return
        if not entry.labels:
            entry.labels = alerts.labels(entry.exc, await self._carrier(entry.exc))
        await self.state.set_state(entry, "sending")
        await self.state.put(entry)
        await self.state.db.commit()  # before the call: a crash now is followed by the call again
        await self._deliver("open", entry, lambda: self.target.open(entry, self.now_us()))
        # Committed with the next batch: a crash before that sends it again (idempotent), no more.
        await self.state.set_state(entry, "sent")

    async def _carrier(self, exc: dict[str, Any]) -> str | None:
        """A shipment's carrier (a label, so alerts route to the right 3PL team), asked of the router
        once per shipment; None when the router does not answer (the label is then left out)."""
        if exc["kind"] != "shipment":
            return None
        key = str(exc["key"])
        if key not in self.carriers:
            if time.monotonic() < self.router_away_until:
                return None
            carrier = None
            try:
                reply = await self.nc.request(f"router.state.shipment.{key}", b"", timeout=2.0)
                state = json.loads(reply.data).get("state") or {}
                carrier = state.get("carrier") if isinstance(state.get("carrier"), str) else None
            except (NatsError, ValueError, TimeoutError, AttributeError) as error:
                log.info("oncall_carrier_unknown", key=key, error=repr(error))
                self.router_away_until = time.monotonic() + ROUTER_AWAY_S
                return None
            if len(self.carriers) > 10_000:
                self.carriers.clear()
            self.carriers[key] = carrier
        return self.carriers[key]

    async def _deliver(self, action: str, entry: Entry, call: Callable[[], Awaitable[Outcome]]) -> None:
        """Call until the target accepts (or refuses for good); in-progress acks meanwhile."""
        delay = BACKOFF_FIRST_S
        attempts = 0
        since = now_iso()
        exc_id = str(entry.exc.get("id", ""))
        while True:
            outcome = await call()
            attempts += 1
            if outcome.kind != "retry":
                self.status.record(action, entry.akey, exc_id, outcome.kind, outcome.detail)
                if outcome.kind == "rejected":
                    log.error("oncall_rejected", target=self.target.name, action=action, alert=entry.akey,
                              id=exc_id, detail=outcome.detail)
                elif attempts > 1:
                    log.info("oncall_delivered_after_retry", target=self.target.name, action=action,
                             alert=entry.akey, attempts=attempts)
                return
            self.status.retrying = {"what": f"{action} {entry.akey}", "attempts": attempts, "since": since,
                                    "error": outcome.detail}
            if attempts == 1 or attempts % 10 == 0:
                log.warning("oncall_retrying", target=self.target.name, action=action, alert=entry.akey,
                            attempts=attempts, error=outcome.detail)
            await self._keepalive()
            await anyio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _keepalive(self) -> None:
        if not self.unacked or time.monotonic() - self.last_keepalive < KEEPALIVE_S:
            return
        self.last_keepalive = time.monotonic()
        for msg in self.unacked:
            try:
                await msg.in_progress()
            except NatsError:
                return

    # --- timers: min_open, resend, reconcile ---------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await anyio.sleep(TICK_S)
            if self.seeding:
                continue
            now = self.now_us()
            due = [e for e in list(self.state.entries.values()) if e.state == "held" and e.eligible_us <= now]
            due += [e for e in list(self.state.entries.values()) if e.state == "sending"]  # a crash mid-call
            due.sort(key=lambda e: e.eligible_us)
            for e in due:
                async with self.lock:
                    if self.state.entries.get(e.akey) is e and e.state in ("held", "sending"):
                        await self._open(e)
            self._update_status()

    async def _resend_loop(self) -> None:
        every = duration_us(self.cfg.resend_every) / 1e6
        while True:
            await anyio.sleep(every)
            # Under the lock: a firing re-post must not overtake the resolve of a clear handled meanwhile.
            async with self.lock:
                entries = [e for e in self.state.entries.values() if e.state == "sent"]
                if not entries:
                    continue
                outcome = await self.target.resend(entries, self.now_us())
            if outcome.kind == "accepted":
                self.status.record("resend", f"{len(entries)} alerts", "", "accepted")
            else:
                log.warning("oncall_resend_failed", target=self.target.name, alerts=len(entries), error=outcome.detail)

    async def _reconcile_loop(self) -> None:
        every = duration_us(self.cfg.reconcile_every) / 1e6
        while True:
            await anyio.sleep(every)
            if self.caught_up and not self.seeding:
                await self._reconcile(rounds_needed=2)

    async def _reconcile(self, rounds_needed: int) -> None:
        """Close entries of exceptions no longer open (finished entities), add open ones missing."""
        router_open = await all_open(self.nc)
        if router_open is None:
            return
        present = {alerts.alert_key(e): e for e in router_open}
        for akey in list(self.state.entries):
            if akey in present:
                self.missing.pop(akey, None)
                continue
            self.missing[akey] = self.missing.get(akey, 0) + 1
            if self.missing[akey] >= rounds_needed:
                self.missing.pop(akey, None)
                async with self.lock:
                    entry = self.state.entries.get(akey)
                    if entry is not None:
                        log.info("oncall_finished", target=self.target.name, alert=akey, id=entry.exc.get("id"))
                        await self._clear(entry.exc, None, silent=False)
                        await self.state.db.commit()
        for akey, exc in present.items():
            known = self.state.entries.get(akey)
            if (known is not None and known.state != "closed") or not self.target.routed(exc):
                self.extra.pop(akey, None)
                continue
            self.extra[akey] = self.extra.get(akey, 0) + 1
            if self.extra[akey] >= rounds_needed:
                self.extra.pop(akey, None)
                async with self.lock:
                    known = self.state.entries.get(akey)
                    if known is not None and known.state == "closed":
                        log.info("oncall_open_again", target=self.target.name, alert=akey, id=exc.get("id"))
                        known.state = "held"
                        await self._open(known, check=False)
                    elif known is None:
                        log.info("oncall_added_from_router", target=self.target.name, alert=akey, id=exc.get("id"))
                        await self._raise(exc, json.dumps(exc).encode(), silent=False)
                    await self.state.db.commit()
        for gone in [k for k in self.missing if k not in self.state.entries]:
            self.missing.pop(gone, None)
        self.status.reconciled_at = now_iso()
        self._update_status()
