"""Event payloads (CONTRACT.md section 2): one tagged union per kind, one decoder per kind."""

from __future__ import annotations

import datetime as _dt
import re
from typing import Annotated, Any, Final, Literal, Union

import msgspec
from msgspec import Meta

from contracts.config import DURATION_PATTERN, duration_us

KINDS: Final = ("sku", "shipment", "campaign")

MAX_INT: Final = 2**53 - 1
# A key (CONTRACT section 1): `KEY_RE.match(text)` checks the whole text. `\Z`, not `$`, which
# would let a trailing newline through; `Key` below writes the same class and length as `^...$`
# for msgspec and JSON Schema.
KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")

# A JSON integer within +-(2^53 - 1).
Int = Annotated[int, Meta(ge=-MAX_INT, le=MAX_INT)]
PosInt = Annotated[int, Meta(gt=0, le=MAX_INT)]
NonNegInt = Annotated[int, Meta(ge=0, le=MAX_INT)]
Key = Annotated[str, Meta(pattern="^" + KEY_RE.pattern.removesuffix("\\Z") + "$")]
# 1-128 characters, no C0/C1 control characters (checked in _AtLocation.__post_init__: a
# `pattern` here costs a regex search per event on the hot path).
Location = Annotated[str, Meta(min_length=1, max_length=128)]
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# RFC 3339 with an offset; msgspec rounds digits beyond microseconds half up.
Time = Annotated[_dt.datetime, Meta(tz=True)]
PosFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Common fields of every event. `ts` absent means the JetStream timestamp."""

    ts: Time | None = None
    id: str | None = None


# --- settings (all three kinds, CONTRACT 2.4) ------------------------------------------

Duration = Annotated[str, Meta(pattern=DURATION_PATTERN)]


def _check_reset(event: Any) -> None:
    """A name both set and reset is invalid (a name that is no setting fails at decode: a Literal)."""
    reset = event.reset
    if reset:
        for name in reset:
            if getattr(event, name) is not None:
                raise ValueError(f"`{name}` is both set and reset - at `$.reset`")


# --- sku -------------------------------------------------------------------------------


class _AtLocation(_Event, frozen=True, kw_only=True):
    """An event at one location: 1-128 characters, no control characters."""

    location: Location

    def __post_init__(self) -> None:
        loc = self.location
        if not loc.isprintable() and _CONTROL.search(loc) is not None:
            raise ValueError("Expected `str` without control characters - at `$.location`")


class Received(_AtLocation, tag="received", frozen=True):
    qty: PosInt


class Ordered(_AtLocation, tag="ordered", frozen=True):
    qty: PosInt
    order_id: str


class Cancelled(_AtLocation, tag="cancelled", frozen=True):
    qty: PosInt
    order_id: str


class Picked(_AtLocation, tag="picked", frozen=True):
    qty: PosInt
    order_id: str | None = None


class Returned(_AtLocation, tag="returned", frozen=True):
    qty: PosInt
    restockable: bool | None = None  # null or absent: true
    reason: str | None = None


class Adjusted(_AtLocation, tag="adjusted", frozen=True):
    delta: Int
    reason: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.delta == 0:
            raise ValueError("Expected `int` != 0 - at `$.delta`")


class Counted(_AtLocation, tag="counted", frozen=True):
    on_hand: NonNegInt


class CampaignLinked(_Event, tag="campaign_linked", frozen=True):
    campaign: Key


class CampaignUnlinked(_Event, tag="campaign_unlinked", frozen=True):
    campaign: Key


SKU_SETTINGS: Final = ("low_stock_threshold", "return_spike_min_units", "return_spike_ratio")
SkuSettingName = Literal["low_stock_threshold", "return_spike_min_units", "return_spike_ratio"]
# Fields a SKU sets for the whole SKU only: with `location` they are invalid.
SKU_WIDE_ONLY: Final = ("return_spike_min_units", "return_spike_ratio")


class SkuSettings(_Event, tag="settings", frozen=True):
    """Thresholds of one SKU, or with `location` of one of its locations (CONTRACT 2.4)."""

    location: Location | None = None
    low_stock_threshold: Int | None = None
    return_spike_min_units: NonNegInt | None = None
    return_spike_ratio: NonNegFloat | None = None
    reset: list[SkuSettingName] | None = None

    def __post_init__(self) -> None:
        loc = self.location
        if loc is not None:
            if not loc.isprintable() and _CONTROL.search(loc) is not None:
                raise ValueError("Expected `str` without control characters - at `$.location`")
            for name in SKU_WIDE_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(f"`{name}` is SKU-wide only: not with `location` - at `$.{name}`")
            if self.reset:
                for name in self.reset:
                    if name in SKU_WIDE_ONLY:
                        raise ValueError(f"`{name}` is SKU-wide only: not reset with `location` - at `$.reset`")
        _check_reset(self)


SkuEvent = Union[
    Received, Ordered, Cancelled, Picked, Returned, Adjusted, Counted, CampaignLinked, CampaignUnlinked,
    SkuSettings,
]

# --- shipment --------------------------------------------------------------------------


class Booked(_Event, tag="booked", frozen=True):
    promised_by: Time
    carrier: str | None = None
    origin: str | None = None
    destination: str | None = None
    order_id: str | None = None
    temp_min: float | None = None
    temp_max: float | None = None


class PickedUp(_Event, tag="picked_up", frozen=True):
    location: str | None = None


class InTransit(_Event, tag="in_transit", frozen=True):
    location: str | None = None
    eta: Time | None = None


class Delayed(_Event, tag="delayed", frozen=True):
    eta: Time
    reason: str | None = None


class OutForDelivery(_Event, tag="out_for_delivery", frozen=True):
    eta: Time | None = None


class DeliveryFailed(_Event, tag="delivery_failed", frozen=True):
    reason: str | None = None


class Delivered(_Event, tag="delivered", frozen=True):
    pass


class Temperature(_Event, tag="temperature", frozen=True):
    celsius: float


SHIPMENT_SETTINGS: Final = ("stall_after",)


class ShipmentSettings(_Event, tag="settings", frozen=True):
    """The shipment's own `stall_after` (CONTRACT 2.4)."""

    stall_after: Duration | None = None
    reset: list[Literal["stall_after"]] | None = None

    def __post_init__(self) -> None:
        if self.stall_after is not None:
            try:
                us = duration_us(self.stall_after)
            except ValueError as exc:
                raise ValueError(f"{exc} - at `$.stall_after`") from None
            if us <= 0:
                raise ValueError("Expected a duration > 0 - at `$.stall_after`")
        _check_reset(self)


ShipmentEvent = Union[
    Booked, PickedUp, InTransit, Delayed, OutForDelivery, DeliveryFailed, Delivered, Temperature,
    ShipmentSettings,
]

# --- campaign --------------------------------------------------------------------------


class Started(_Event, tag="started", frozen=True):
    skus: Annotated[list[Key], Meta(max_length=100)] | None = None
    cpa_limit: float | None = None
    budget: float | None = None


class Spend(_Event, tag="spend", frozen=True):
    amount: PosFloat


class Conversion(_Event, tag="conversion", frozen=True):
    count: Annotated[int, Meta(ge=1, le=MAX_INT)] | None = None  # null or absent: 1
    revenue: NonNegFloat | None = None


class Paused(_Event, tag="paused", frozen=True):
    pass


class Resumed(_Event, tag="resumed", frozen=True):
    pass


class Ended(_Event, tag="ended", frozen=True):
    pass


class SkuOutOfStock(_Event, tag="sku_out_of_stock", frozen=True):
    sku: Key


class SkuBackInStock(_Event, tag="sku_back_in_stock", frozen=True):
    sku: Key


CAMPAIGN_SETTINGS: Final = ("cpa_limit", "budget", "cpa_min_spend")


class CampaignSettings(_Event, tag="settings", frozen=True):
    """The campaign's limits (CONTRACT 2.4): `cpa_limit` and `budget` as `started` sets them."""

    cpa_limit: float | None = None
    budget: float | None = None
    cpa_min_spend: NonNegFloat | None = None
    reset: list[Literal["cpa_limit", "budget", "cpa_min_spend"]] | None = None

    def __post_init__(self) -> None:
        _check_reset(self)


CampaignEvent = Union[
    Started, Spend, Conversion, Paused, Resumed, Ended, SkuOutOfStock, SkuBackInStock, CampaignSettings
]

Event = Union[SkuEvent, ShipmentEvent, CampaignEvent]

EVENT_UNIONS: Final[dict[str, Any]] = {
    "sku": SkuEvent,
    "shipment": ShipmentEvent,
    "campaign": CampaignEvent,
}


def _tags(union: Any) -> frozenset[str]:
    return frozenset(t.__struct_config__.tag for t in union.__args__)


# The settable fields of a `settings` event, per kind (CONTRACT 2.4).
SETTINGS_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "sku": SKU_SETTINGS,
    "shipment": SHIPMENT_SETTINGS,
    "campaign": CAMPAIGN_SETTINGS,
}
SETTINGS_TYPES: Final[dict[str, Any]] = {
    "sku": SkuSettings,
    "shipment": ShipmentSettings,
    "campaign": CampaignSettings,
}

EVENT_TYPES: Final[dict[str, frozenset[str]]] = {k: _tags(u) for k, u in EVENT_UNIONS.items()}

DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    k: msgspec.json.Decoder(u) for k, u in EVENT_UNIONS.items()
}

_ENCODER: Final = msgspec.json.Encoder()


def encode_event(event: Any) -> bytes:
    """JSON bytes of an event, with its `type` tag (for producers and actor messages)."""
    return _ENCODER.encode(event)


def json_schema() -> dict[str, Any]:
    """JSON Schema of every event, per kind (`router schema`)."""
    schemas, components = msgspec.json.schema_components(
        [EVENT_UNIONS[k] for k in KINDS], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ops-router events",
        "description": "Payload of events.<kind>.<key>, by kind.",
        "properties": dict(zip(KINDS, schemas, strict=False)),
        "$defs": components,
    }
