"""The shipment actor: status, ETA and movements, its SLA/stall timers and rules (CONTRACT 2.2, 3)."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from actors.effects import ActorError, Alert, Effect, SetTimer, Thresholds
from contracts.config import duration_us
from contracts.events import (
    Booked,
    Delayed,
    Delivered,
    DeliveryFailed,
    InTransit,
    OutForDelivery,
    PickedUp,
    ShipmentEvent,
    ShipmentSettings,
    Temperature,
)
from contracts.rules import RULES_BY_KIND
from contracts.times import rfc3339, rfc3339_opt, to_us

_DEFAULTS: Final = Thresholds()
SLA: Final = "sla"
STALL: Final = "stall"

RANK: Final[dict[str, int]] = {
    "booked": 0,
    "picked_up": 1,
    "in_transit": 2,
    "out_for_delivery": 3,
    "delivery_failed": 3,
    "delivered": 4,
}
MOVING: Final = frozenset({"picked_up", "in_transit", "out_for_delivery"})
# Event class -> the status it reports (`delayed` and `temperature` report none).
_STATUS: Final[dict[type, str]] = {
    Booked: "booked",
    PickedUp: "picked_up",
    InTransit: "in_transit",
    OutForDelivery: "out_for_delivery",
    DeliveryFailed: "delivery_failed",
    Delivered: "delivered",
}
_MOVEMENTS: Final = frozenset({PickedUp, InTransit, OutForDelivery, Delivered})
_WITH_ETA: Final = frozenset({InTransit, Delayed, OutForDelivery})


class ShipmentState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One shipment. Times are whole microseconds since the epoch. Mutated in place by `apply`."""

    key: str
    seq: int = 0
    status: str | None = None
    promised_by: int | None = None
    eta: int | None = None
    eta_ts: int | None = None  # ts of the event the eta came from
    last_movement: int | None = None
    delivered_at: int | None = None  # ts of the first `delivered` in stream order
    temperature: float | None = None
    temp_min: float | None = None
    temp_max: float | None = None
    carrier: str | None = None
    origin: str | None = None
    destination: str | None = None
    order_id: str | None = None
    # Raised rules.
    sla_at_risk: bool = False
    sla_breached: bool = False
    stalled: bool = False
    stalled_for: int | None = None  # the last_movement that raised `stalled` (at most once each)
    # Deadline of the `stall` timer, fixed when last_movement or the status last changed it
    # (stored, so a changed `stall_after` never orphans a timer already set).
    stall_at: int | None = None
    temperature_excursion: bool = False
    delivery_failed: bool = False
    # Own `stall_after` (CONTRACT 2.4) as given, and in microseconds; None inherits.
    stall_after: str | None = None
    stall_after_us: int | None = None


def new(key: str) -> ShipmentState:
    return ShipmentState(key=key)


def _sla_deadline(state: ShipmentState) -> int | None:
    """promised_by while not delivered and not yet breached."""
    if state.status == "delivered" or state.sla_breached:
        return None
    return state.promised_by


def _stall_deadline(state: ShipmentState, th: Thresholds) -> int | None:
    """last_movement + stall_after while moving, unless this last_movement already raised."""
    lm = state.last_movement
    if state.status in MOVING and lm is not None and lm != state.stalled_for:
        after = state.stall_after_us
        if after is None:
            carriers = th.carriers_us
            after = carriers.get(state.carrier, th.stall_after_us) if carriers else th.stall_after_us  # type: ignore[arg-type]
        return lm + after
    return None


def _stall_after(state: ShipmentState, th: Thresholds) -> tuple[str, str]:
    """`stall_after` in effect, as written, and where it comes from: entity, carrier or config."""
    if state.stall_after is not None:
        return state.stall_after, "entity"
    carrier = state.carrier
    if carrier is not None and carrier in th.carriers:
        return th.carriers[carrier], "carrier"
    return th.stall_after_text(), "config"


# Whether `timers` can ever return a deadline: a snapshot skips the timer rows of kinds that keep none.
KEEPS_TIMERS: Final = True


def timers(state: ShipmentState) -> dict[str, int]:
    """The deadlines the state currently wants: name -> deadline_us."""
    out: dict[str, int] = {}
    sla = _sla_deadline(state)
    if sla is not None:
        out[SLA] = sla
    if state.stall_at is not None:
        out[STALL] = state.stall_at
    return out


def apply(state: ShipmentState, event: ShipmentEvent, ts_us: int, th: Thresholds) -> list[Effect]:
    """Apply one event in place; return its alerts and timer changes."""
    t = type(event)
    status = _STATUS.get(t)
    if status is None and t is not Delayed and t is not Temperature and t is not ShipmentSettings:
        raise ActorError(f"shipment:{state.key}: not a shipment event: {t.__name__}")
    old_sla = _sla_deadline(state)
    old_stall = state.stall_at

    if status is not None:
        current = state.status
        if current is None or RANK[status] >= RANK[current]:
            state.status = status
    if t is Booked:
        state.promised_by = to_us(event.promised_by)  # type: ignore[union-attr]
        if event.temp_min is not None:  # type: ignore[union-attr]
            state.temp_min = event.temp_min  # type: ignore[union-attr]
        if event.temp_max is not None:  # type: ignore[union-attr]
            state.temp_max = event.temp_max  # type: ignore[union-attr]
        for field in ("carrier", "origin", "destination", "order_id"):
            value = getattr(event, field)
            if value is not None:
                setattr(state, field, value)
    elif t is Temperature:
        state.temperature = event.celsius  # type: ignore[union-attr]
    elif t is Delivered and state.delivered_at is None:
        state.delivered_at = ts_us
    elif t is ShipmentSettings:
        # Every condition is evaluated again below; only the stall timer can move (CONTRACT 2.4).
        if event.stall_after is not None:  # type: ignore[union-attr]
            state.stall_after = event.stall_after  # type: ignore[union-attr]
            state.stall_after_us = duration_us(event.stall_after)  # type: ignore[union-attr]
        elif event.reset:  # type: ignore[union-attr]
            state.stall_after = state.stall_after_us = None
    if t in _WITH_ETA:
        eta = event.eta  # type: ignore[union-attr]
        if eta is not None and (state.eta_ts is None or ts_us >= state.eta_ts):
            state.eta = to_us(eta)
            state.eta_ts = ts_us
    if t in _MOVEMENTS:
        lm = state.last_movement
        if lm is None or ts_us > lm:
            state.last_movement = ts_us

    effects: list[Effect] = []
    key = state.key
    status = state.status
    delivered = status == "delivered"
    promised_by = state.promised_by
    eta = state.eta

    at_risk = not delivered and eta is not None and promised_by is not None and eta > promised_by
    if at_risk != state.sla_at_risk:
        state.sla_at_risk = at_risk
        if at_risk:
            msg = f"{key} at risk: eta {_t(eta)} is after promised_by {_t(promised_by)}"
        elif delivered:
            msg = f"{key} no longer at risk: delivered"
        else:
            msg = f"{key} no longer at risk: eta {_t(eta)}, promised_by {_t(promised_by)}"
        effects.append(Alert("sla_at_risk", "raised" if at_risk else "cleared", None, None, None, msg))

    if (
        delivered
        and not state.sla_breached
        and promised_by is not None
        and state.delivered_at is not None
        and state.delivered_at > promised_by
    ):
        state.sla_breached = True
        msg = f"{key} SLA breached: delivered {_t(state.delivered_at)}, promised_by {_t(promised_by)}"
        effects.append(Alert("sla_breached", "raised", None, None, None, msg))

    if state.stalled and (state.last_movement != state.stalled_for or status not in MOVING):
        state.stalled = False
        if status in MOVING:
            msg = f"{key} moving again (last movement {_t(state.last_movement)})"
        else:
            msg = f"{key} no longer stalled (status {status})"
        effects.append(Alert("stalled", "cleared", None, None, None, msg))

    celsius = state.temperature
    bound: float | None = None
    side = ""
    if celsius is not None:
        low, high = state.temp_min, state.temp_max
        if low is not None and celsius < low:
            bound, side = low, "below min"
        elif high is not None and celsius > high:
            bound, side = high, "above max"
    excursion = bound is not None
    if excursion != state.temperature_excursion:
        state.temperature_excursion = excursion
        if bound is not None:
            msg = f"{key} temperature {celsius} C {side} {bound}"
            effects.append(Alert("temperature_excursion", "raised", None, celsius, bound, msg))
        else:
            msg = f"{key} temperature back in range ({celsius} C)"
            effects.append(Alert("temperature_excursion", "cleared", None, celsius, None, msg))

    failed = status == "delivery_failed"
    if failed != state.delivery_failed:
        state.delivery_failed = failed
        if failed:
            reason = event.reason if t is DeliveryFailed else None  # type: ignore[union-attr]
            msg = f"{key} delivery failed" + (f": {reason}" if reason else "")
        else:
            msg = f"{key} delivery no longer failed (status {status})"
        effects.append(Alert("delivery_failed", "raised" if failed else "cleared", None, None, None, msg))

    new_sla = _sla_deadline(state)
    new_stall = state.stall_at = _stall_deadline(state, th)
    if new_sla != old_sla:
        effects.append(SetTimer(SLA, new_sla))
    if new_stall != old_stall:
        effects.append(SetTimer(STALL, new_stall))
    return effects


def fire(state: ShipmentState, name: str, deadline_us: int, th: Thresholds) -> list[Effect]:
    """The wall clock passed `deadline_us` for timer `name`; a stale or repeated firing is []."""
    if name == SLA and deadline_us == _sla_deadline(state):
        state.sla_breached = True
        msg = f"{state.key} SLA breached: not delivered by promised_by {_t(deadline_us)} (status {state.status})"
        return [Alert("sla_breached", "raised", None, None, None, msg), SetTimer(SLA, None)]
    if name == STALL and deadline_us == state.stall_at:
        state.stalled = True
        state.stalled_for = state.last_movement
        state.stall_at = None
        msg = f"{state.key} stalled: no movement since {_t(state.last_movement)} (status {state.status})"
        return [Alert("stalled", "raised", None, None, None, msg), SetTimer(STALL, None)]
    return []


def _t(us: int | None) -> str:
    return "none" if us is None else rfc3339(us)


def view(state: ShipmentState, th: Thresholds = _DEFAULTS) -> dict[str, Any]:
    """The `state` object of CONTRACT section 5."""
    value, source = _stall_after(state, th)
    return {
        "status": state.status,
        "promised_by": rfc3339_opt(state.promised_by),
        "eta": rfc3339_opt(state.eta),
        "last_movement": rfc3339_opt(state.last_movement),
        "temperature": state.temperature,
        "delivered_at": rfc3339_opt(state.delivered_at),
        "temp_min": state.temp_min,
        "temp_max": state.temp_max,
        "carrier": state.carrier,
        "origin": state.origin,
        "destination": state.destination,
        "order_id": state.order_id,
        "settings": {} if state.stall_after is None else {"stall_after": state.stall_after},
        "effective": {"stall_after": {"value": value, "from": source}},
    }


# Rule names in RULES order (each is a bool field of the state).
_RULES: Final = tuple(r.name for r in RULES_BY_KIND["shipment"])


def raised(state: ShipmentState) -> list[dict[str, Any]]:
    """Every rule now raised, in RULES order (`sla_breached` stays once raised)."""
    return [{"rule": rule, "location": None} for rule in _RULES if getattr(state, rule)]
