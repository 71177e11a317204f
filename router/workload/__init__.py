"""A seeded, realistic operations day of a D2C brand as (subject, payload) pairs, for `router simulate`.

`workload(seed, now_us=...)` is pure: the same seed, time base and parameters give the same
bytes, so tests and benchmarks can replay it. Event times advance by `1 / rate` seconds per
message from `now_us`; published at `rate` messages per second from `now_us`, they follow
the wall clock.

What it models:

- SKUs stocked at a few warehouses and dark stores (BLR-DS-4, DEL-WH-1, ...). Orders follow a
  long-tailed popularity; each is picked a few seconds later or, rarely, cancelled. A
  planner reorders when stock runs down, so stock mostly sits in the tens to hundreds.
  Returns, cycle counts and damage adjustments come in between.
- Shipments booked with a promise a few minutes ahead, then picked up, scanned through
  hubs, out for delivery and delivered; some are delayed past the promise, fail a
  delivery attempt, stall, or (cold chain, 2-8 C) see a temperature excursion.
- Campaigns started with linked SKUs, then spend and conversions; most convert well, a few
  have a CPA limit or budget that they trip.
- Unless `scenario=False`, a scripted first minute so that a new user sees exceptions
  fire: a hot serum at one dark store that sells out (low stock, stockout, oversold) while a
  campaign promotes it, a campaign over its CPA limit, a flash sale that exhausts its budget,
  a delayed shipment, a cold-chain excursion, a failed delivery, a shipment that misses its
  promise, and a return spike on a kurta that runs small. Most of it clears by minute two.
- With `bad_share`, that share of messages is bad input: malformed JSON, wrong field types,
  unknown event types, bad subjects.
- `Day.finish()` ends the day clean: shipments still under way are delivered and campaigns
  ended, so the router is left with no timer to fire (`router simulate` calls it at the end).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from contracts.decode import DecodeError, decode_event
from router.workload.catalog import HOT_LOCATION, HOT_SKU, SPIKE_SKU, Item, sku_keys
from router.workload.day import Day
from router.workload.script import schedule_incidents

__all__ = ["HOT_LOCATION", "HOT_SKU", "SPIKE_SKU", "Day", "Item", "Tally", "operations_day", "sku_keys", "workload"]


def operations_day(
    seed: int = 0,
    *,
    now_us: int,
    rate: float = 200.0,
    skus: int = 60,
    shipments: int = 2000,
    campaigns: int = 8,
    bad_share: float = 0.0,
    scenario: bool = True,
) -> Day:
    """The day behind `workload()`: `.run(count)` yields its messages, `.finish()` closes it."""
    return Day(seed, now_us, rate, skus, shipments, campaigns, bad_share, scenario, schedule_incidents)


def workload(
    seed: int = 0,
    *,
    now_us: int,
    count: int | None = None,
    rate: float = 200.0,
    skus: int = 60,
    shipments: int = 2000,
    campaigns: int = 8,
    bad_share: float = 0.0,
    scenario: bool = True,
) -> Iterator[Item]:
    """(subject, payload) pairs of a brand's operations, deterministic for its arguments.

    `now_us` is the time base (epoch microseconds) and message i has `ts` at
    `now_us + i / rate` seconds. `count=None` runs forever. `skus` SKUs (the two scripted
    ones included when `scenario`), about `shipments` shipments under way at once,
    `campaigns` campaigns running. `bad_share` of the messages are bad input.
    """
    day = operations_day(
        seed,
        now_us=now_us,
        rate=rate,
        skus=skus,
        shipments=shipments,
        campaigns=campaigns,
        bad_share=bad_share,
        scenario=scenario,
    )
    return day.run(count)


@dataclass
class Tally:
    """What was sent: counts per kind and type, and bad input per dead-letter reason."""

    good: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)

    def add(self, subject: str, data: bytes) -> None:
        try:
            kind, _key, event = decode_event(subject, data)
        except DecodeError as exc:
            self.bad[exc.code] += 1
            return
        self.good[(kind, type(event).__struct_config__.tag)] += 1

    @property
    def total(self) -> int:
        return sum(self.good.values()) + sum(self.bad.values())

    def lines(self) -> list[str]:
        """A readable summary, one line per kind and one for bad input."""
        out: list[str] = []
        kinds: dict[str, Counter[str]] = {}
        for (kind, etype), n in self.good.items():
            kinds.setdefault(kind, Counter())[etype] = n
        for kind in ("sku", "shipment", "campaign"):
            if kind in kinds:
                c = kinds[kind]
                detail = ", ".join(f"{t} {n}" for t, n in c.most_common())
                out.append(f"  {kind:<9} {sum(c.values()):>8}  ({detail})")
        if self.bad:
            detail = ", ".join(f"{code} {n}" for code, n in self.bad.most_common())
            out.append(f"  {'bad':<9} {sum(self.bad.values()):>8}  ({detail})")
        return out

