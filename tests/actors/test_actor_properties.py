"""Properties of every actor: idempotent redelivery, snapshot-then-resume, alternating alerts, models."""

from __future__ import annotations

from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import actors
from actors import Alert, Send, SetTimer, Thresholds
from contracts.events import (
    Adjusted,
    Booked,
    CampaignLinked,
    CampaignUnlinked,
    Cancelled,
    Conversion,
    Counted,
    Delayed,
    Delivered,
    DeliveryFailed,
    Ended,
    InTransit,
    Ordered,
    OutForDelivery,
    Paused,
    Picked,
    PickedUp,
    Received,
    Resumed,
    Returned,
    SkuBackInStock,
    SkuOutOfStock,
    Spend,
    Started,
    Temperature,
)
from contracts.rules import RULES
from contracts.times import from_us, to_us

H = 3_600_000_000
T0 = 472_222 * H
SETTINGS = settings(max_examples=200, deadline=None)

# Small thresholds make crossings common; the defaults keep the real numbers honest.
THRESHOLDS = st.sampled_from(
    [
        Thresholds(),
        Thresholds(
            low_stock_threshold=2,
            return_window_hours=3,
            return_spike_min_units=3,
            return_spike_ratio=0.5,
            stall_after_us=2 * H,
            cpa_min_spend=5.0,
        ),
    ]
)

# Times on a 37-minute grid over ~2 days: ties, late events, hour and window edges.
TS = st.integers(0, 80).map(lambda n: T0 + n * 37 * 60_000_000)
WHEN = TS.map(from_us)

LOCS = st.sampled_from(["A", "B"])
QTY = st.integers(1, 12)
CAMPAIGNS = st.sampled_from(["C1", "C2", "C3"])
SKUS = st.sampled_from(["S1", "S2", "S3"])

SKU_EVENTS = st.one_of(
    st.builds(Received, location=LOCS, qty=QTY),
    st.builds(Ordered, location=LOCS, qty=QTY, order_id=st.just("o")),
    st.builds(Cancelled, location=LOCS, qty=QTY, order_id=st.just("o")),
    st.builds(Picked, location=LOCS, qty=QTY),
    st.builds(Returned, location=LOCS, qty=QTY, restockable=st.sampled_from([None, True, False])),
    st.builds(Adjusted, location=LOCS, delta=st.integers(-10, 10).filter(bool)),
    st.builds(Counted, location=LOCS, on_hand=st.integers(0, 15)),
    st.builds(CampaignLinked, campaign=CAMPAIGNS),
    st.builds(CampaignUnlinked, campaign=CAMPAIGNS),
)
BOUND = st.none() | st.sampled_from([2.0, 8.0])
SHIPMENT_EVENTS = st.one_of(
    st.builds(Booked, promised_by=WHEN, temp_min=BOUND, temp_max=BOUND),
    st.builds(PickedUp),
    st.builds(InTransit, eta=st.none() | WHEN),
    st.builds(Delayed, eta=WHEN),
    st.builds(OutForDelivery, eta=st.none() | WHEN),
    st.builds(DeliveryFailed),
    st.builds(Delivered),
    st.builds(Temperature, celsius=st.sampled_from([0.0, 2.0, 5.0, 8.0, 9.5])),
)
MONEY = st.sampled_from([0.1, 1.0, 2.5, 10.0, 40.0])
CAMPAIGN_EVENTS = st.one_of(
    st.builds(
        Started,
        skus=st.none() | st.lists(SKUS, max_size=3),
        cpa_limit=st.none() | st.sampled_from([1.0, 5.0, 20.0]),
        budget=st.none() | st.sampled_from([5.0, 50.0, 200.0]),
    ),
    st.builds(Spend, amount=MONEY),
    st.builds(Conversion, count=st.none() | st.integers(1, 3), revenue=st.none() | MONEY),
    st.builds(Paused),
    st.builds(Resumed),
    st.builds(Ended),
    st.builds(SkuOutOfStock, sku=SKUS),
    st.builds(SkuBackInStock, sku=SKUS),
)
EVENTS = {"sku": SKU_EVENTS, "shipment": SHIPMENT_EVENTS, "campaign": CAMPAIGN_EVENTS}

# A timer firing: the deadline the state wants now (None), or an arbitrary (stale) one.
FIRES = st.tuples(st.just("fire"), st.sampled_from(["sla", "stall"]), st.none() | TS)


def actions(kind: str) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    event = st.tuples(st.just("event"), EVENTS[kind], TS)
    return st.lists(event | FIRES if kind == "shipment" else event, max_size=40)


KIND_ACTIONS = st.sampled_from(["sku", "shipment", "campaign"]).flatmap(
    lambda kind: st.tuples(st.just(kind), actions(kind), THRESHOLDS)
)


def play(
    kind: str, acts: list[tuple[Any, ...]], th: Thresholds, snapshot_at: int = -1, redeliver: bool = False
) -> tuple[Any, list[list[Any]]]:
    """Fold the actions; event i has stream sequence i. Returns the state and effects per action."""
    state: Any = None
    log: list[list[Any]] = []
    for i, act in enumerate(acts, 1):
        if i == snapshot_at and state is not None:
            state = actors.decode_state(kind, actors.encode_state(state))
        if act[0] == "event":
            state, effects = actors.step(kind, state, "K-1", i, act[1], act[2], th)
            if redeliver:
                before = actors.encode_state(state)
                for seq in (i, i - 1):
                    again, more = actors.step(kind, state, "K-1", seq, act[1], act[2], th)
                    assert again is state
                    assert more == []
                    assert actors.encode_state(state) == before
        elif state is None:
            effects = []
        else:
            _, name, deadline = act
            if deadline is None:
                deadline = actors.timers(kind, state).get(name)
            effects = [] if deadline is None else actors.fire(kind, state, name, deadline, th)
        log.append(effects)
    return state, log


@SETTINGS
@given(KIND_ACTIONS)
def test_a_redelivered_event_changes_nothing(case: tuple[str, list[Any], Thresholds]) -> None:
    kind, acts, th = case
    state, log = play(kind, acts, th, redeliver=True)
    plain_state, plain_log = play(kind, acts, th)
    assert log == plain_log
    if state is not None:
        assert actors.encode_state(state) == actors.encode_state(plain_state)


@SETTINGS
@given(KIND_ACTIONS, st.integers(0, 41))
def test_snapshot_then_resume_equals_a_full_fold(case: tuple[str, list[Any], Thresholds], at: int) -> None:
    kind, acts, th = case
    state, log = play(kind, acts, th)
    resumed, resumed_log = play(kind, acts, th, snapshot_at=at)
    assert resumed_log == log
    if state is not None:
        assert actors.encode_state(resumed) == actors.encode_state(state)


_RULES = {(r.kind, r.name): r for r in RULES}
_ORDER = {r.name: i for i, r in enumerate(RULES)}


@SETTINGS
@given(KIND_ACTIONS)
def test_alerts_alternate_and_agree_with_raised_and_timers(case: tuple[str, list[Any], Thresholds]) -> None:
    kind, acts, th = case
    state: Any = None
    last: dict[tuple[str, str | None], str] = {}
    wanted: dict[str, int] = {}
    for i, act in enumerate(acts, 1):
        if act[0] == "event":
            state, effects = actors.step(kind, state, "K-1", i, act[1], act[2], th)
        elif state is not None:
            deadline = act[2] if act[2] is not None else actors.timers(kind, state).get(act[1])
            effects = [] if deadline is None else actors.fire(kind, state, act[1], deadline, th)
        else:
            continue
        seen = set()
        for e in effects:
            if isinstance(e, Alert):
                rule = _RULES[(kind, e.rule)]
                assert (e.location is not None) == (rule.scope == "location")
                k = (e.rule, e.location)
                assert k not in seen  # at most one alert per rule and location per step
                seen.add(k)
                expected = "cleared" if last.get(k) == "raised" else "raised"
                assert e.status == expected, (k, e.status)
                assert not (e.rule == "sla_breached" and e.status == "cleared")
                last[k] = e.status
                assert e.message.startswith("K-1 ")
            elif isinstance(e, SetTimer):
                if e.deadline_us is None:
                    assert e.name in wanted
                    del wanted[e.name]
                else:
                    assert wanted.get(e.name) != e.deadline_us
                    wanted[e.name] = e.deadline_us
        now = [{"rule": r, "location": loc} for (r, loc), status in last.items() if status == "raised"]
        now.sort(key=lambda x: (_ORDER[x["rule"]], x["location"] or ""))
        assert actors.raised(kind, state) == now
        assert actors.timers(kind, state) == wanted


@SETTINGS
@given(KIND_ACTIONS)
def test_only_timed_kinds_ever_want_timers(case: tuple[str, list[Any], Thresholds]) -> None:
    """Snapshots skip the timer rows of kinds outside TIMED_KINDS: they must never want one."""
    kind, acts, th = case
    state: Any = None
    for i, act in enumerate(acts, 1):
        if act[0] != "event":
            continue
        state, effects = actors.step(kind, state, "K-1", i, act[1], act[2], th)
        if kind not in actors.TIMED_KINDS:
            assert actors.timers(kind, state) == {}
            assert not any(isinstance(e, SetTimer) for e in effects)


def test_timed_kinds() -> None:
    assert sorted(actors.TIMED_KINDS) == ["shipment"]


# --- models: the incremental state equals a naive recomputation from the history ----------


def _sku_model(history: list[tuple[Any, int]], th: Thresholds) -> dict[str, Any]:
    locs: dict[str, list[int]] = {}
    campaigns: set[str] = set()
    for ev, _ in history:
        t = type(ev)
        if t is CampaignLinked:
            campaigns.add(ev.campaign)
            continue
        if t is CampaignUnlinked:
            campaigns.discard(ev.campaign)
            continue
        c = locs.setdefault(ev.location, [0, 0])
        if t is Received:
            c[0] += ev.qty
        elif t is Ordered:
            c[1] += ev.qty
        elif t is Cancelled:
            c[1] = max(0, c[1] - ev.qty)
        elif t is Picked:
            c[0] -= ev.qty
            c[1] = max(0, c[1] - ev.qty)
        elif t is Returned:
            c[0] += ev.qty if ev.restockable is not False else 0
        elif t is Adjusted:
            c[0] += ev.delta
        elif t is Counted:
            c[0] = ev.on_hand
    latest = max(ts // H for _, ts in history)
    start = latest - th.return_window_hours + 1
    returned = sum(ev.qty for ev, ts in history if type(ev) is Returned and ts // H >= start)
    picked = sum(ev.qty for ev, ts in history if type(ev) is Picked and ts // H >= start)
    total = sum(a - b for a, b in locs.values())
    return {
        "locations": {k: (a, b) for k, (a, b) in locs.items()},
        "campaigns": sorted(campaigns),
        "available": total,
        "out_of_stock": not locs or total <= 0,
        "returned": returned,
        "picked": picked,
        "return_spike": returned >= th.return_spike_min_units and returned >= th.return_spike_ratio * picked,
    }


@SETTINGS
@given(actions("sku").filter(bool), THRESHOLDS)
def test_sku_state_matches_a_naive_model(acts: list[tuple[Any, ...]], th: Thresholds) -> None:
    state: Any = None
    history: list[tuple[Any, int]] = []
    for i, (_, ev, ts) in enumerate(acts, 1):
        state, _effects = actors.step("sku", state, "K-1", i, ev, ts, th)
        history.append((ev, ts))
        m = _sku_model(history, th)
        assert {k: (v.on_hand, v.reserved) for k, v in state.locations.items()} == m["locations"]
        assert list(state.campaigns) == m["campaigns"]
        assert (state.available, state.out_of_stock) == (m["available"], m["out_of_stock"])
        assert (state.returned, state.picked, state.return_spike) == (
            m["returned"],
            m["picked"],
            m["return_spike"],
        )
        for v in state.locations.values():
            a = v.on_hand - v.reserved
            assert (v.stockout, v.low_stock, v.oversold) == (a <= 0, a <= th.low_stock_threshold, a < 0)


_RANK = {
    "booked": 0,
    "picked_up": 1,
    "in_transit": 2,
    "out_for_delivery": 3,
    "delivery_failed": 3,
    "delivered": 4,
}
_TAG = {Booked: "booked", PickedUp: "picked_up", InTransit: "in_transit", OutForDelivery: "out_for_delivery"}
_TAG |= {DeliveryFailed: "delivery_failed", Delivered: "delivered"}


@SETTINGS
@given(actions("shipment").filter(bool), THRESHOLDS)
def test_shipment_state_matches_a_naive_model(acts: list[tuple[Any, ...]], th: Thresholds) -> None:
    state: Any = None
    history: list[tuple[int, Any, int]] = []
    for i, act in enumerate(acts, 1):
        if act[0] != "event":
            continue
        _, ev, ts = act
        state, _effects = actors.step("shipment", state, "K-1", i, ev, ts, th)
        history.append((i, ev, ts))
        statuses = [(_RANK[_TAG[type(e)]], j, _TAG[type(e)]) for j, e, _ in history if type(e) in _TAG]
        status = max(statuses)[2] if statuses else None
        etas = [(t, j, to_us(e.eta)) for j, e, t in history if getattr(e, "eta", None) is not None]
        eta = max(etas)[2] if etas else None
        moves = [t for _, e, t in history if type(e) in (PickedUp, InTransit, OutForDelivery, Delivered)]
        delivered = [t for _, e, t in history if type(e) is Delivered]
        booked = [e for _, e, _ in history if type(e) is Booked]
        promised_by = to_us(booked[-1].promised_by) if booked else None
        temp_min = next((e.temp_min for e in reversed(booked) if e.temp_min is not None), None)
        temp_max = next((e.temp_max for e in reversed(booked) if e.temp_max is not None), None)
        temps = [e.celsius for _, e, _ in history if type(e) is Temperature]
        assert state.status == status
        assert state.eta == eta
        assert state.last_movement == (max(moves) if moves else None)
        assert state.delivered_at == (delivered[0] if delivered else None)
        assert (state.promised_by, state.temp_min, state.temp_max) == (promised_by, temp_min, temp_max)
        at_risk = status != "delivered" and eta is not None and promised_by is not None and eta > promised_by
        assert state.sla_at_risk == at_risk
        out = bool(temps) and (
            (temp_min is not None and temps[-1] < temp_min) or (temp_max is not None and temps[-1] > temp_max)
        )
        assert state.temperature_excursion == out
        assert state.delivery_failed == (status == "delivery_failed")
        if status == "delivered" and promised_by is not None and delivered[0] > promised_by:
            assert state.sla_breached


@SETTINGS
@given(actions("campaign").filter(bool), THRESHOLDS)
def test_campaign_state_matches_a_naive_model(acts: list[tuple[Any, ...]], th: Thresholds) -> None:
    state: Any = None
    spend = revenue = 0.0
    conversions = 0
    for i, (_, ev, ts) in enumerate(acts, 1):
        state, _effects = actors.step("campaign", state, "K-1", i, ev, ts, th)
        if type(ev) is Spend:
            spend += ev.amount
        elif type(ev) is Conversion:
            conversions += ev.count or 1
            revenue += ev.revenue or 0.0
        assert (state.spend, state.conversions, state.revenue) == (spend, conversions, revenue)
        limit, budget = state.cpa_limit, state.budget
        assert state.cpa_exceeded == (
            limit is not None
            and spend >= th.cpa_min_spend
            and (conversions == 0 or spend / conversions > limit)
        )
        assert state.budget_exhausted == (budget is not None and spend >= budget)
        oos = [s for s, out in state.skus.items() if out]
        assert state.out_of_stock == len(oos)
        assert state.promoting_out_of_stock == (state.active and bool(oos))
        if state.ended:
            assert not state.active
            assert state.skus == {}


# --- SKUs and campaigns together ----------------------------------------------------------

WORLD_ACTIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("sku"),
            SKUS,
            SKU_EVENTS.filter(lambda e: not isinstance(e, (CampaignLinked, CampaignUnlinked))),
        ),
        st.tuples(
            st.just("campaign"),
            st.sampled_from(["C1", "C2"]),
            st.one_of(
                st.builds(Started, skus=st.lists(SKUS, max_size=3)), st.builds(Ended), st.builds(Paused)
            ),
        ),
    ),
    max_size=40,
)


@SETTINGS
@given(WORLD_ACTIONS, TS)
def test_campaigns_learn_the_stock_of_their_skus(acts: list[tuple[str, str, Any]], ts: int) -> None:
    """Deliver every message in order: once quiet, each campaign knows its linked SKUs' stock."""
    th = Thresholds()
    states: dict[tuple[str, str], Any] = {}
    seq = 0
    for kind, key, event in acts:
        queue: deque[tuple[str, str, Any, int]] = deque([(kind, key, event, ts)])
        while queue:
            k, key_, ev, t = queue.popleft()
            seq += 1
            states[(k, key_)], effects = actors.step(k, states.get((k, key_)), key_, seq, ev, t, th)
            for e in effects:
                if isinstance(e, Send):
                    assert e.event.ts is not None
                    queue.append((e.kind, e.key, e.event, to_us(e.event.ts)))
        for (k, c), cs in states.items():
            if k != "campaign":
                continue
            for s, out in cs.skus.items():
                ss = states[("sku", s)]
                assert c in ss.campaigns
                assert out == ss.out_of_stock
        for (k, s), ss in states.items():
            if k == "sku":
                for c in ss.campaigns:
                    cs = states[("campaign", c)]
                    assert not cs.ended
                    assert s in cs.skus
