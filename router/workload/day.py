"""The simulation state of one operations day; `Day.run()` yields (subject, payload) pairs."""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from contracts.times import rfc3339
from router.workload.catalog import (
    CAMPAIGN_NAMES,
    CARRIERS,
    DESTINATIONS,
    FAIL_REASONS,
    HOT_LOCATION,
    HOT_SKU,
    HUBS,
    LOCATIONS,
    RETURN_REASONS,
    RETURN_SHARE,
    SEC,
    SPIKE_SKU,
    Item,
    Payload,
    sku_keys,
)
from router.workload.settings import bad_settings_or_future, settings_event

_ENCODE: Final = msgspec.json.Encoder().encode

@dataclass
class _Stock:
    on_hand: int
    reserved: int = 0
    reorder_point: int = 10
    reorder_qty: int = 40
    replenishing: bool = False

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


@dataclass
class _Campaign:
    key: str
    skus: list[str]
    true_cpa: float
    price: float
    cpa_limit: float | None = None
    budget: float | None = None
    spend: float = 0.0
    owed: float = 0.0  # conversions earned by spend and not yet reported
    paused: bool = False
    ended: bool = False


@dataclass
class Shipment:
    key: str
    promised_by: int
    cold: bool
    steps_left: int = 0


@dataclass(order=True)
class _Due:
    at: int
    n: int
    action: Callable[[int], Item | None] = field(compare=False)


class Day:
    """The simulation state; `run()` yields messages. Only list/dict iteration: deterministic."""

    def __init__(
        self,
        seed: int,
        now_us: int,
        rate: float,
        skus: int,
        shipments: int,
        campaigns: int,
        bad_share: float,
        scenario: bool,
        incidents: Callable[[Day, int], int] | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if not 0.0 <= bad_share < 1.0:
            raise ValueError("bad_share must be in [0, 1)")
        self.rng = random.Random(seed)
        self.now_us = now_us
        self.step_us = SEC / rate
        self.rate = rate
        self.bad_share = bad_share
        self.scenario = scenario
        self.incidents = incidents  # schedules the scripted first minute; returns campaigns started
        self.target_shipments = max(0, shipments)
        self.n_campaigns = max(0, campaigns)
        self.queue: list[_Due] = []
        self.counter = itertools.count()
        self.order_n = itertools.count(1)
        self.ship_n = itertools.count(1)
        self.camp_n = itertools.count(1)

        rng = self.rng
        self.skus = sku_keys(max(skus, 2 if scenario else 1))
        # Popularity: a long tail over a seeded order; the return-spike kurta sells little.
        ranked = self.skus[:]
        rng.shuffle(ranked)
        if scenario:
            ranked.remove(SPIKE_SKU)
            ranked.append(SPIKE_SKU)
        weights = [1.0 / (i + 1) ** 0.9 for i in range(len(ranked))]
        self.ranked = ranked
        self.cum = list(itertools.accumulate(weights))
        share = {k: w / self.cum[-1] for k, w in zip(ranked, weights, strict=True)}
        self.held: dict[str, bool] = {}  # SKUs the script drives alone for a while

        # Expected order flow per SKU, to size reorder points like a planner would.
        orders_per_s = rate * 0.55
        self.stock: dict[str, dict[str, _Stock]] = {}
        for key in self.skus:
            locs = [HOT_LOCATION] if scenario and key == HOT_SKU else rng.sample(LOCATIONS, rng.randint(2, 4))
            per_loc = orders_per_s * share[key] * 1.5 / len(locs)  # units per second
            point = max(12, math.ceil(per_loc * 40 * 1.5))
            qty = max(40, math.ceil(per_loc * 150))
            self.stock[key] = {loc: _Stock(on_hand=0, reorder_point=point, reorder_qty=qty) for loc in locs}
        self.picked_units: dict[str, int] = {}
        self.returned_units: dict[str, int] = {}
        self.campaigns: dict[str, _Campaign] = {}
        self.active_campaigns: list[str] = []
        self.shipments: dict[str, Shipment] = {}  # under way, counted against `shipments`
        # Booked and not delivered, as the router sees them (forgotten ones too: their
        # timers are still set there); `finish()` delivers them.
        self.undelivered: dict[str, Shipment] = {}
        self.next_us = now_us  # the time of the next message
        self.finished = False

    # --- plumbing --------------------------------------------------------------------

    def at(self, t: int, action: Callable[[int], Item | None]) -> None:
        heapq.heappush(self.queue, _Due(t, next(self.counter), action))

    def emit(self, kind: str, key: str, t: int, etype: str, **fields: Any) -> Item:
        payload: Payload = {"type": etype, "ts": rfc3339(t)}
        payload.update(fields)
        return f"events.{kind}.{key}", _ENCODE(payload)

    def popular_sku(self) -> str:
        rng = self.rng
        for _ in range(8):
            i = bisect.bisect_right(self.cum, rng.random() * self.cum[-1])
            key = self.ranked[min(i, len(self.ranked) - 1)]
            if key not in self.held:
                return key
        return next((k for k in self.ranked if k not in self.held), self.ranked[0])

    # --- the run ---------------------------------------------------------------------

    def run(self, count: int | None) -> Iterator[Item]:
        self.setup()
        rng = self.rng
        bad_share = self.bad_share
        queue = self.queue
        i = 0
        while (count is None or i < count) and not self.finished:
            t = self.now_us + int(i * self.step_us)
            self.next_us = self.now_us + int((i + 1) * self.step_us)
            if bad_share and rng.random() < bad_share:
                yield self.bad(t)
                i += 1
                continue
            item: Item | None = None
            while queue and queue[0].at <= t:
                item = heapq.heappop(queue).action(t)
                if item is not None:
                    break
            if item is None:
                item = self.spontaneous(t)
            yield item
            i += 1

    def finish(self) -> list[Item]:
        """Close what the day opened, at the time of the next message onward: every shipment
        booked and not delivered is delivered, every campaign still running ends.

        Without it a demo leaves work behind in the router: undelivered shipments breach
        their promise minutes later and stall hours later, each by a timer. After `finish()`
        nothing is due: the router holds no timer that would fire. `run()` yields nothing more.
        """
        self.finished = True
        self.queue.clear()
        t = self.next_us
        items: list[Item] = []
        for key in list(self.undelivered):
            items.append(self.scan(key, "delivered", {}, final=True)(t + int(len(items) * self.step_us)))
        for key in list(self.active_campaigns):
            item = self._end_campaign(key, replace=False)(t + int(len(items) * self.step_us))
            if item is not None:
                items.append(item)
        self.next_us = t + int(len(items) * self.step_us)
        return items

    def setup(self) -> None:
        t0 = self.now_us
        rng = self.rng
        for key, locs in self.stock.items():
            for loc, st in locs.items():
                qty = st.reorder_qty + rng.randint(0, st.reorder_qty)
                if self.scenario and key == HOT_SKU:
                    qty = 14
                self.at(t0, self.receive(key, loc, qty))
        n_script = 0
        if self.scenario:
            n_script = self.incidents(self, t0) if self.incidents is not None else 0
        for j in range(max(0, self.n_campaigns - n_script)):
            self.at(t0 + SEC + j * SEC // 4, lambda t: self.start_campaign(t))

    def spontaneous(self, t: int) -> Item:
        rng = self.rng
        r = rng.random() * 100
        if r < 10:
            if len(self.shipments) < self.target_shipments:
                return self.book(t)
        elif r < 22:
            if self.active_campaigns:
                item = self.campaign_activity(t)
                if item is not None:
                    return item
        elif r < 24.5:
            return self.returned(t)
        elif r < 25.5:
            return self.counted(t)
        elif r < 26:
            return self.adjusted(t)
        elif r < 26.3:
            return settings_event(self, t)
        return self.order(t)

    # --- sku -------------------------------------------------------------------------

    def receive(self, key: str, loc: str, qty: int) -> Callable[[int], Item]:
        def run(t: int) -> Item:
            st = self.stock[key][loc]
            st.on_hand += qty
            st.replenishing = False
            return self.emit("sku", key, t, "received", location=loc, qty=qty)

        return run

    def reorder(self, key: str, loc: str, t: int) -> None:
        st = self.stock[key][loc]
        if st.replenishing or st.available >= st.reorder_point or key in self.held:
            return
        st.replenishing = True
        rng = self.rng
        # Most replenishments arrive within half a minute; some suppliers are slow.
        lead = rng.uniform(8, 30) if rng.random() < 0.85 else rng.uniform(60, 240)
        self.at(t + int(lead * SEC), self.receive(key, loc, st.reorder_qty))

    def order(self, t: int, key: str | None = None, loc: str | None = None, qty: int | None = None) -> Item:
        rng = self.rng
        forced = key is not None
        if qty is None:
            qty = 1 if rng.random() < 0.72 else (2 if rng.random() < 0.8 else 3)
        if key is None:
            key = self.popular_sku()
            locs = self.stock[key]
            # A storefront hides what a location cannot serve; pick one that can.
            names = [n for n, s in locs.items() if s.available >= qty]
            if not names:
                return self.returned(t) if rng.random() < 0.5 else self.counted(t)
            loc = rng.choice(names)
        assert loc is not None
        st = self.stock[key][loc]
        st.reserved += qty
        oid = f"ORD-{next(self.order_n):07d}"
        if not forced and rng.random() < 0.04:
            self.at(t + int(rng.uniform(1, 10) * SEC), self.cancel(key, loc, qty, oid))
        elif not forced:
            self.at(t + int(rng.uniform(2, 20) * SEC), self.pick(key, loc, qty, oid))
        self.reorder(key, loc, t)
        return self.emit("sku", key, t, "ordered", location=loc, qty=qty, order_id=oid)

    def pick(self, key: str, loc: str, qty: int, oid: str) -> Callable[[int], Item]:
        def run(t: int) -> Item:
            st = self.stock[key][loc]
            st.on_hand -= qty
            st.reserved = max(0, st.reserved - qty)
            self.picked_units[key] = self.picked_units.get(key, 0) + qty
            self.reorder(key, loc, t)
            return self.emit("sku", key, t, "picked", location=loc, qty=qty, order_id=oid)

        return run

    def cancel(self, key: str, loc: str, qty: int, oid: str) -> Callable[[int], Item]:
        def run(t: int) -> Item:
            st = self.stock[key][loc]
            st.reserved = max(0, st.reserved - qty)
            return self.emit("sku", key, t, "cancelled", location=loc, qty=qty, order_id=oid)

        return run

    def returned(self, t: int, key: str | None = None, reason: str | None = None) -> Item:
        rng = self.rng
        if key is None:
            key = self.popular_sku()
            # Returns follow sales: a few percent of what was picked, never a spike by chance.
            if self.returned_units.get(key, 0) + 1 > RETURN_SHARE * self.picked_units.get(key, 0):
                return self.counted(t)
        self.returned_units[key] = self.returned_units.get(key, 0) + 1
        loc = rng.choice(list(self.stock[key]))
        restockable = rng.random() < 0.8
        if restockable:
            self.stock[key][loc].on_hand += 1
        return self.emit(
            "sku",
            key,
            t,
            "returned",
            location=loc,
            qty=1,
            restockable=restockable,
            reason=reason or rng.choice(RETURN_REASONS),
        )

    def counted(self, t: int) -> Item:
        rng = self.rng
        key = self.popular_sku()
        loc = rng.choice(list(self.stock[key]))
        st = self.stock[key][loc]
        shrink = 0 if rng.random() < 0.85 else rng.randint(1, 2)
        st.on_hand = max(0, st.on_hand - shrink)
        self.reorder(key, loc, t)
        return self.emit("sku", key, t, "counted", location=loc, on_hand=st.on_hand)

    def adjusted(self, t: int) -> Item:
        rng = self.rng
        key = self.popular_sku()
        loc = rng.choice(list(self.stock[key]))
        st = self.stock[key][loc]
        if rng.random() < 0.75:
            delta, reason = -rng.randint(1, 2), "damaged"
        else:
            delta, reason = 1, "found"
        st.on_hand += delta
        self.reorder(key, loc, t)
        return self.emit("sku", key, t, "adjusted", location=loc, delta=delta, reason=reason)

    # --- campaign --------------------------------------------------------------------

    def start_campaign(
        self,
        t: int,
        key: str | None = None,
        skus: list[str] | None = None,
        cpa_limit: float | None = None,
        budget: float | None = None,
        true_cpa: float | None = None,
    ) -> Item:
        rng = self.rng
        if key is None:
            name = CAMPAIGN_NAMES[rng.randrange(len(CAMPAIGN_NAMES))]
            key = f"CMP-{name}-{next(self.camp_n):03d}"
            # Promote SKUs that are in stock, as a marketer would.
            pool = [k for k in self.ranked[:40] if k not in self.held and self._in_stock(k)] or self.ranked[
                :1
            ]
            skus = rng.sample(pool, min(len(pool), rng.randint(1, 3)))
            profile = rng.random()
            if profile < 0.12:  # poor targeting: will trip its CPA limit
                cpa_limit, true_cpa = round(rng.uniform(150, 250), 2), rng.uniform(400, 700)
            elif profile < 0.22:  # a small budget it will use up
                cpa_limit, true_cpa = None, rng.uniform(30, 80)
                budget = float(rng.randrange(300, 900, 50))
            else:
                cpa_limit, true_cpa = round(rng.uniform(250, 500), 2), rng.uniform(30, 80)
            self.at(t + int(rng.uniform(600, 1800) * SEC), self._end_campaign(key))
        assert skus is not None
        assert true_cpa is not None
        c = _Campaign(
            key=key,
            skus=list(skus),
            true_cpa=true_cpa,
            price=round(rng.uniform(299, 1499), 0),
            cpa_limit=cpa_limit,
            budget=budget,
        )
        self.campaigns[key] = c
        self.active_campaigns.append(key)
        fields: Payload = {"skus": c.skus}
        if cpa_limit is not None:
            fields["cpa_limit"] = cpa_limit
        if budget is not None:
            fields["budget"] = budget
        return self.emit("campaign", key, t, "started", **fields)

    def _in_stock(self, key: str) -> bool:
        return sum(s.available for s in self.stock[key].values()) > 0

    def campaign_activity(self, t: int, key: str | None = None, amount: float | None = None) -> Item | None:
        rng = self.rng
        if key is None:
            key = self.active_campaigns[rng.randrange(len(self.active_campaigns))]
        c = self.campaigns[key]
        if c.ended:
            return None
        if c.paused:
            return None
        if c.owed >= 1:
            n = min(int(c.owed), 5)
            c.owed -= n
            return self.emit("campaign", key, t, "conversion", count=n, revenue=round(n * c.price, 2))
        if rng.random() < 0.004 and t > self.now_us + 90 * SEC:
            c.paused = True
            self.at(t + int(rng.uniform(10, 60) * SEC), self._resume(key))
            return self.emit("campaign", key, t, "paused")
        if c.budget is not None and c.spend >= c.budget:
            return None  # the ad platform stops delivery at the budget
        if amount is None:
            amount = round(rng.uniform(2, 12), 2)
        c.spend += amount
        c.owed += amount / c.true_cpa
        return self.emit("campaign", key, t, "spend", amount=amount)

    def _resume(self, key: str) -> Callable[[int], Item | None]:
        def run(t: int) -> Item | None:
            c = self.campaigns[key]
            if c.ended or not c.paused:
                return None
            c.paused = False
            return self.emit("campaign", key, t, "resumed")

        return run

    def _end_campaign(self, key: str, replace: bool = True) -> Callable[[int], Item | None]:
        def run(t: int) -> Item | None:
            c = self.campaigns[key]
            if c.ended:
                return None
            c.ended = True
            self.active_campaigns.remove(key)
            if replace:  # a new campaign takes its slot a little later
                self.at(t + int(self.rng.uniform(5, 30) * SEC), lambda t2: self.start_campaign(t2))
            return self.emit("campaign", key, t, "ended")

        return run

    # --- shipment --------------------------------------------------------------------

    def book(
        self,
        t: int,
        key: str | None = None,
        window_s: float | None = None,
        outcome: str | None = None,
        cold: bool | None = None,
    ) -> Item:
        rng = self.rng
        key = key or f"SHP-{next(self.ship_n):06d}"
        window = window_s if window_s is not None else rng.uniform(150, 420)
        promised = t + int(window * SEC)
        cold = cold if cold is not None else rng.random() < 0.15
        if outcome is None:
            outcome = rng.choices(
                ("on_time", "delayed", "failed_once", "rto", "stuck", "late"),
                weights=(80, 10, 5, 1.5, 1.5, 2),
            )[0]
        s = Shipment(key=key, promised_by=promised, cold=cold)
        self.shipments[key] = s
        self.undelivered[key] = s
        self.plan(s, t, window * SEC, outcome)
        fields: Payload = {
            "promised_by": rfc3339(promised),
            "carrier": rng.choice(CARRIERS),
            "origin": rng.choice(LOCATIONS),
            "destination": rng.choice(DESTINATIONS),
            "order_id": f"ORD-{next(self.order_n):07d}",
        }
        if cold:
            fields["temp_min"], fields["temp_max"] = 2.0, 8.0
        return self.emit("shipment", key, t, "booked", **fields)

    def plan(self, s: Shipment, t0: int, w: float, outcome: str) -> None:
        """Schedule a shipment's scans as fractions of its promise window `w` (microseconds)."""
        rng = self.rng

        def at(frac: float, etype: str, **fields: Any) -> None:
            jitter = rng.uniform(-0.02, 0.02)
            self.at(t0 + int(max(0.01, frac + jitter) * w), self.scan(s.key, etype, fields))

        at(0.08, "picked_up", location=rng.choice(LOCATIONS))
        hops = rng.randint(1, 3)
        eta = s.promised_by - int(rng.uniform(0.03, 0.12) * w)
        for h in range(hops):
            fields: Payload = {"location": rng.choice(HUBS)}
            if h == 0:
                fields["eta"] = rfc3339(eta)
            at(0.2 + 0.35 * h / hops, "in_transit", **fields)
        if s.cold:
            for j in range(rng.randint(3, 6)):
                celsius = round(rng.uniform(2.8, 6.8), 1)
                at(0.1 + 0.12 * j, "temperature", celsius=celsius)
            if rng.random() < 0.06:  # a reefer door left open, then back in range
                at(0.33, "temperature", celsius=round(rng.uniform(9.0, 12.5), 1))
                at(0.42, "temperature", celsius=round(rng.uniform(3.0, 6.0), 1))
        if outcome == "stuck":
            # No scan after the hubs: the promise passes (sla_breached by timer).
            self.at(s.promised_by + 30 * SEC, self.forget(s.key))
            return
        if outcome == "delayed":
            late = int(rng.uniform(0.15, 0.5) * w)
            at(
                0.45,
                "delayed",
                eta=rfc3339(s.promised_by + late),
                reason=rng.choice(("weather", "hub_congestion", "vehicle_breakdown")),
            )
            at(0.9, "out_for_delivery")
            self.at(s.promised_by + late, self.scan(s.key, "delivered", {}, final=True))
            return
        at(0.7, "out_for_delivery", eta=rfc3339(eta))
        if outcome in ("failed_once", "rto"):
            at(0.78, "delivery_failed", reason=rng.choice(FAIL_REASONS))
            if outcome == "rto":
                self.at(t0 + int(0.8 * w), self.forget(s.key))
                return
            at(0.86, "out_for_delivery")
        if outcome == "late":
            # No delay notice: delivered after the promise (sla_breached when it arrives).
            self.at(
                s.promised_by + int(rng.uniform(0.05, 0.2) * w),
                self.scan(s.key, "delivered", {}, final=True),
            )
            return
        self.at(t0 + int(rng.uniform(0.9, 0.97) * w), self.scan(s.key, "delivered", {}, final=True))

    def scan(self, key: str, etype: str, fields: Payload, final: bool = False) -> Callable[[int], Item]:
        def run(t: int) -> Item:
            if final:
                self.shipments.pop(key, None)
                self.undelivered.pop(key, None)
            return self.emit("shipment", key, t, etype, **fields)

        return run

    def forget(self, key: str) -> Callable[[int], None]:
        def run(t: int) -> None:
            self.shipments.pop(key, None)

        return run

    # --- bad input -------------------------------------------------------------------

    def bad(self, t: int) -> Item:
        rng = self.rng
        key = self.popular_sku()
        loc = rng.choice(list(self.stock[key]))
        ts = rfc3339(t)
        sku = f"events.sku.{key}"
        choice = rng.randrange(12)
        if choice >= 10:  # a wrong settings event, or a ts weeks ahead
            return bad_settings_or_future(self, t, key, loc)
        if choice == 0:  # truncated JSON
            return sku, f'{{"type":"ordered","ts":"{ts}","location":"{loc}","qty":2'.encode()
        if choice == 1:  # not JSON at all
            return sku, b"ordered,2," + loc.encode()
        if choice == 2:  # a JSON array
            return f"events.shipment.SHP-{rng.randrange(1, 999999):06d}", b'["picked_up"]'
        if choice == 3:  # a quantity as a string
            return sku, _ENCODE(
                {"type": "ordered", "ts": ts, "location": loc, "qty": "2", "order_id": "ORD-X"}
            )
        if choice == 4:  # a fractional quantity
            return sku, _ENCODE({"type": "received", "ts": ts, "location": loc, "qty": 2.5})
        if choice == 5:  # a required field missing
            return sku, _ENCODE({"type": "ordered", "ts": ts, "location": loc, "qty": 1})
        if choice == 6:  # a time without an offset
            return sku, _ENCODE(
                {"type": "picked", "ts": ts.rstrip("Z").split(".")[0], "location": loc, "qty": 1}
            )
        if choice == 7:  # an event type nobody defined
            return sku, _ENCODE({"type": "teleported", "ts": ts, "location": loc})
        if choice == 8:  # an unknown kind
            return f"events.pallet.{loc}", _ENCODE({"type": "received", "ts": ts, "qty": 4})
        # too many tokens
        return f"{sku}.extra", _ENCODE({"type": "received", "ts": ts, "location": loc, "qty": 4})
