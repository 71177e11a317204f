"""The actors' front door: one pure module per kind, `step` to apply an event, state (de)serialization.

Layers: `actors.effects` holds the effect types and thresholds; `actors.sku`, `actors.shipment` and
`actors.campaign` each own one kind's state and behaviour as plain functions
(`new`, `apply`, `fire`, `timers`, `view`, `raised`) with no clock, I/O or logging; this
module dispatches on the kind and guards against applying a sequence twice.

Effects lists returned here are new lists the caller owns.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Final

import msgspec

from actors import campaign, shipment, sku
from actors.campaign import CampaignState
from actors.effects import ActorError, Alert, Effect, Send, SetTimer, Thresholds
from actors.shipment import ShipmentState
from actors.sku import SkuState

State = SkuState | ShipmentState | CampaignState

ACTORS: Final[dict[str, ModuleType]] = {"sku": sku, "shipment": shipment, "campaign": campaign}
# Kinds whose actors can hold timers; the others' `timers` is always empty.
TIMED_KINDS: Final = frozenset(kind for kind, mod in ACTORS.items() if mod.KEEPS_TIMERS)
STATE_TYPES: Final[dict[str, type[State]]] = {
    "sku": SkuState,
    "shipment": ShipmentState,
    "campaign": CampaignState,
}

__all__ = [
    "ACTORS",
    "STATE_TYPES",
    "TIMED_KINDS",
    "ActorError",
    "Alert",
    "CampaignState",
    "Effect",
    "Send",
    "SetTimer",
    "ShipmentState",
    "SkuState",
    "State",
    "Thresholds",
    "decode_state",
    "encode_state",
    "fire",
    "raised",
    "step",
    "timers",
    "view",
]


def step(
    kind: str, state: State | None, key: str, seq: int, event: Any, ts_us: int, th: Thresholds
) -> tuple[State, list[Effect]]:
    """Apply the event at stream sequence `seq` to the key's state (created when None).

    A `seq` at or below the state's last applied one (a redelivery or replay) changes
    nothing and returns no effects. A failure inside the actor raises ActorError naming the
    key and sequence; actors check what can fail before they mutate the state.
    """
    actor = ACTORS[kind]
    if state is None:
        state = actor.new(key)
    if seq <= state.seq:
        return state, []
    try:
        effects: list[Effect] = actor.apply(state, event, ts_us, th)
    except ActorError:
        raise
    except Exception as exc:
        raise ActorError(f"{kind}:{key} seq {seq}: {type(exc).__name__}: {exc}") from exc
    state.seq = seq
    return state, effects


def fire(kind: str, state: State, name: str, deadline_us: int, th: Thresholds) -> list[Effect]:
    """The wall clock passed `deadline_us` for timer `name`: [] when stale or already fired."""
    effects: list[Effect] = ACTORS[kind].fire(state, name, deadline_us, th)
    return effects


def timers(kind: str, state: State) -> dict[str, int]:
    """Timer name -> deadline_us the state wants now."""
    wanted: dict[str, int] = ACTORS[kind].timers(state)
    return wanted


def view(kind: str, state: State, th: Thresholds | None = None) -> dict[str, Any]:
    """The `state` object of a state reply (CONTRACT section 5); `th` for `effective` (default: the defaults)."""
    mod = ACTORS[kind]
    out: dict[str, Any] = mod.view(state) if th is None else mod.view(state, th)
    return out


def raised(kind: str, state: State) -> list[dict[str, Any]]:
    """The `exceptions` list of a state reply: rules now raised, in RULES order then location."""
    out: list[dict[str, Any]] = ACTORS[kind].raised(state)
    return out


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODERS: Final[dict[str, msgspec.msgpack.Decoder[Any]]] = {
    kind: msgspec.msgpack.Decoder(cls) for kind, cls in STATE_TYPES.items()
}


def encode_state(state: State) -> bytes:
    """msgpack bytes of a state (for snapshots)."""
    return _ENCODER.encode(state)


def decode_state(kind: str, data: bytes) -> State:
    """The state of `kind` from `encode_state` bytes."""
    state: State = _DECODERS[kind].decode(data)
    return state
