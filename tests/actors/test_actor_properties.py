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
    CampaignSettings,
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
    ShipmentSettings,
    SkuBackInStock,
    SkuOutOfStock,
    SkuSettings,
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



@st.composite
def settings_event(draw: st.DrawFn, cls: type, fields: dict[str, st.SearchStrategy[Any]], **fixed: Any) -> Any:
    """A valid `settings` event: each field set, reset or left alone (never both)."""
    values: dict[str, Any] = {}
    reset: list[str] = []
    for name, strategy in fields.items():
        choice = draw(st.sampled_from(["set", "reset", "absent"]))
        if choice == "set":
            values[name] = draw(strategy)
        elif choice == "reset":
            reset.append(name)
    return cls(**fixed, **values, reset=reset or None)


LOW = st.integers(-3, 12)
SKU_SETTINGS = st.one_of(
    settings_event(
        SkuSettings,
        {
            "low_stock_threshold": LOW,
            "return_spike_min_units": st.integers(0, 12),
            "return_spike_ratio": st.sampled_from([0.0, 0.2, 0.5, 1.0, 2.0]),
        },
    ),
    LOCS.flatmap(lambda loc: settings_event(SkuSettings, {"low_stock_threshold": LOW}, location=loc)),
    settings_event(SkuSettings, {"low_stock_threshold": LOW}, location="UNSEEN"),
)
SHIPMENT_SETTINGS = settings_event(ShipmentSettings, {"stall_after": st.sampled_from(["30m", "1.5h", "2h", "6h", "3d"])})
CAMPAIGN_SETTINGS = settings_event(
    CampaignSettings,
    {
        "cpa_limit": st.sampled_from([1.0, 5.0, 20.0]),
        "budget": st.sampled_from([5.0, 50.0, 200.0]),
        "cpa_min_spend": st.sampled_from([0.0, 5.0, 100.0]),
    },
)

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
    SKU_SETTINGS,
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
    SHIPMENT_SETTINGS,
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
    CAMPAIGN_SETTINGS,
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


def _sku_settings(history: list[tuple[Any, int]]) -> tuple[dict[str, Any], dict[str, int]]:
    """The SKU's own settings after `history`: SKU-wide fields, and location thresholds."""
    wide: dict[str, Any] = {}
    per_location: dict[str, int] = {}
    for ev, _ in history:
        if type(ev) is not SkuSettings:
            continue
        if ev.location is None:
            for name in ("low_stock_threshold", "return_spike_min_units", "return_spike_ratio"):
                if getattr(ev, name) is not None:
                    wide[name] = getattr(ev, name)
            for name in ev.reset or ():
                wide.pop(name, None)
        else:
            if ev.low_stock_threshold is not None:
                per_location[ev.location] = ev.low_stock_threshold
            if ev.reset:
                per_location.pop(ev.location, None)
    return wide, per_location


def _sku_model(history: list[tuple[Any, int]], th: Thresholds) -> dict[str, Any]:
    locs: dict[str, list[int]] = {}
    campaigns: set[str] = set()
    for ev, _ in history:
        t = type(ev)
        if t is SkuSettings:
            continue
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
    # Settings events are no event time for the window (CONTRACT 2.4).
    hours = [ts // H for ev, ts in history if type(ev) is not SkuSettings]
    start = max(hours) - th.return_window_hours + 1 if hours else 0
    returned = sum(ev.qty for ev, ts in history if type(ev) is Returned and ts // H >= start)
    picked = sum(ev.qty for ev, ts in history if type(ev) is Picked and ts // H >= start)
    total = sum(a - b for a, b in locs.values())
    wide, per_location = _sku_settings(history)
    minimum = wide.get("return_spike_min_units", th.return_spike_min_units)
    ratio = wide.get("return_spike_ratio", th.return_spike_ratio)
    sku_low = wide.get("low_stock_threshold", th.low_stock_threshold)
    return {
        "locations": {k: (a, b) for k, (a, b) in locs.items()},
        "low": {k: per_location.get(k, sku_low) for k in locs},
        "campaigns": sorted(campaigns),
        "available": total,
        "out_of_stock": not locs or total <= 0,
        "returned": returned,
        "picked": picked,
        "return_spike": returned >= minimum and returned >= ratio * picked,
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
        view = actors.view("sku", state, th)
        for name, v in state.locations.items():
            a = v.on_hand - v.reserved
            low = m["low"][name]
            assert (v.stockout, v.low_stock, v.oversold) == (a <= 0, a <= low, a < 0)
            assert view["locations"][name]["low_stock_threshold"] == low


def _conditions(kind: str, state: Any, th: Thresholds, history: list[tuple[Any, int]]) -> dict[Any, bool]:
    """Every location-scoped and SKU-wide condition recomputed from the history (sku only)."""
    m = _sku_model(history, th)
    out: dict[Any, bool] = {}
    for name, (on_hand, reserved) in m["locations"].items():
        a = on_hand - reserved
        out[("stockout", name)] = a <= 0
        out[("low_stock", name)] = a <= m["low"][name]
        out[("oversold", name)] = a < 0
    out[("return_spike", None)] = m["return_spike"]
    return out


@SETTINGS
@given(
    st.lists(
        st.tuples(st.just("event"), st.one_of(SKU_SETTINGS, SKU_SETTINGS, SKU_EVENTS), TS), min_size=1, max_size=50
    ),
    THRESHOLDS,
)
def test_each_crossing_raises_or_clears_once_and_only_crossings_do(
    acts: list[tuple[Any, ...]], th: Thresholds
) -> None:
    """Settings and counter events mixed: an alert for (rule, location) exactly when its condition flips."""
    state: Any = None
    history: list[tuple[Any, int]] = []
    before: dict[Any, bool] = {}
    for i, (_, ev, ts) in enumerate(acts, 1):
        state, effects = actors.step("sku", state, "K-1", i, ev, ts, th)
        history.append((ev, ts))
        now = _conditions("sku", state, th, history)
        flipped = {k for k, v in now.items() if v != before.get(k, False)}
        got = [(e.rule, e.location) for e in effects if isinstance(e, Alert)]
        assert len(got) == len(set(got))
        assert set(got) == flipped
        for e in effects:
            if isinstance(e, Alert):
                assert e.status == ("raised" if now[(e.rule, e.location)] else "cleared")
                if e.rule == "low_stock":
                    assert e.threshold == _sku_model(history, th)["low"][e.location]
        before = now


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
        own = [e.cpa_min_spend for _, e, _ in acts[:i] if type(e) is CampaignSettings and e.cpa_min_spend is not None]
        resets = [j for j, (_, e, _) in enumerate(acts[:i]) if type(e) is CampaignSettings and "cpa_min_spend" in (e.reset or ())]
        sets = [j for j, (_, e, _) in enumerate(acts[:i]) if type(e) is CampaignSettings and e.cpa_min_spend is not None]
        min_spend = own[-1] if sets and (not resets or sets[-1] > resets[-1]) else th.cpa_min_spend
        assert state.cpa_exceeded == (
            limit is not None
            and spend >= min_spend
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


# --- settings: set, then reset, is the inherited behaviour again ----------------------------

_SET = {
    "sku": st.one_of(
        st.builds(
            SkuSettings,
            low_stock_threshold=st.none() | LOW,
            return_spike_min_units=st.none() | st.integers(0, 12),
            return_spike_ratio=st.none() | st.sampled_from([0.0, 0.5, 2.0]),
        ),
        st.builds(SkuSettings, location=LOCS, low_stock_threshold=LOW),
    ),
    "shipment": st.builds(ShipmentSettings, stall_after=st.sampled_from(["30m", "2h", "3d"])),
    # cpa_limit and budget inherit nothing (a reset removes them): only cpa_min_spend inherits.
    "campaign": st.builds(CampaignSettings, cpa_min_spend=st.sampled_from([0.0, 5.0, 1000.0])),
}


def _reset_of(event: Any) -> Any:
    fields = [f for f in ("low_stock_threshold", "return_spike_min_units", "return_spike_ratio",
                          "stall_after", "cpa_min_spend") if getattr(event, f, None) is not None]
    if type(event) is SkuSettings:
        return SkuSettings(location=event.location, reset=fields)
    return type(event)(reset=fields)


def _plain(kind: str) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    return st.lists(
        st.tuples(st.just("event"), EVENTS[kind].filter(lambda e: "Settings" not in type(e).__name__), TS),
        max_size=30,
    )


SET_RESET_CASES = st.sampled_from(["sku", "shipment", "campaign"]).flatmap(
    lambda kind: st.tuples(st.just(kind), _plain(kind), _SET[kind], st.integers(0, 30), st.integers(0, 30), THRESHOLDS)
)


@SETTINGS
@given(SET_RESET_CASES)
def test_set_then_reset_returns_exactly_the_inherited_behaviour(case: tuple[Any, ...]) -> None:
    kind, acts, setting, i, j, th = case
    i, j = sorted((min(i, len(acts)), min(j, len(acts))))
    changed = [*acts[:i], ("event", setting, T0), *acts[i:j], ("event", _reset_of(setting), T0), *acts[j:]]
    base_state, base_log = play(kind, acts, th)
    state, log = play(kind, changed, th)
    # Every event after the reset has exactly the effects it has without the setting...
    assert log[j + 2 :] == base_log[j:]
    if base_state is None:
        return
    # ...and the state is the same but for the two extra sequence numbers.
    state.seq = base_state.seq
    assert actors.encode_state(state) == actors.encode_state(base_state)
    assert actors.raised(kind, state) == actors.raised(kind, base_state)
    assert actors.timers(kind, state) == actors.timers(kind, base_state)
    assert actors.view(kind, state, th) == actors.view(kind, base_state, th)


def _has_settings(case: tuple[str, list[Any], Thresholds]) -> bool:
    return any(act[0] == "event" and "Settings" in type(act[1]).__name__ for act in case[1])


@SETTINGS
@given(KIND_ACTIONS.filter(_has_settings), st.integers(0, 41))
def test_settings_then_snapshot_then_resume_equals_a_full_fold(
    case: tuple[str, list[Any], Thresholds], at: int
) -> None:
    kind, acts, th = case
    state, log = play(kind, acts, th)
    resumed, resumed_log = play(kind, acts, th, snapshot_at=at)
    assert resumed_log == log
    assert actors.encode_state(resumed) == actors.encode_state(state)
    assert actors.view(kind, resumed, th) == actors.view(kind, state, th)
