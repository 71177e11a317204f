"""The simulated brand's catalog and network: locations, hubs, carriers, SKUs, campaign names."""

from __future__ import annotations

from typing import Any, Final

SEC: Final = 1_000_000

Item = tuple[str, bytes]
Payload = dict[str, Any]

LOCATIONS: Final = (
    "BLR-DS-4",
    "BLR-DS-7",
    "BLR-WH-1",
    "DEL-WH-1",
    "DEL-DS-2",
    "MUM-DS-2",
    "MUM-WH-1",
    "HYD-DS-1",
    "PUN-DS-3",
    "CHN-WH-1",
)
HUBS: Final = ("BLR-HUB-2", "DEL-HUB-1", "MUM-HUB-3", "HYD-HUB-1", "NAG-HUB-1", "KOL-HUB-2")
CARRIERS: Final = ("Delhivery", "BlueDart", "Shadowfax", "Ekart", "XpressBees", "DTDC")
DESTINATIONS: Final = ("560034", "560102", "110017", "400050", "500081", "411014", "600040", "700091")
RETURN_REASONS: Final = ("size_mismatch", "damaged", "not_as_described", "changed_mind", "late_delivery")
FAIL_REASONS: Final = ("customer_unreachable", "address_incomplete", "premises_closed", "refused_cod")

# (product, variants): SKU keys are PRODUCT-VARIANT, e.g. TEE-BLK-M, SERUM-VITC-30.
CATALOG: Final = (
    ("SERUM-VITC", ("30", "50")),
    ("KURTA-IND", ("S", "M", "L", "XL")),
    ("TEE-BLK", ("S", "M", "L", "XL")),
    ("TEE-WHT", ("S", "M", "L", "XL")),
    ("SUNSCREEN-SPF50", ("50", "100")),
    ("COFFEE-COLD", ("250", "500")),
    ("GRANOLA-HNY", ("400", "1KG")),
    ("PROTEIN-CHOC", ("500", "1KG", "2KG")),
    ("JOGGER-GRY", ("S", "M", "L", "XL")),
    ("SNEAKER-WHT", ("7", "8", "9", "10")),
    ("BOTTLE-STEEL", ("750", "1L")),
    ("SHAMPOO-ONION", ("200", "400")),
    ("FACEWASH-NEEM", ("100", "150")),
    ("KAJAL-BLK", ("STD",)),
    ("HOODIE-NVY", ("M", "L", "XL")),
    ("DRESS-FLR", ("XS", "S", "M", "L")),
    ("SOCKS-ANK", ("3PK", "6PK")),
    ("TOTE-CNV", ("STD",)),
    ("LIPBALM-BRY", ("STD",)),
    ("CHAI-MASALA", ("250", "500")),
)
CAMPAIGN_NAMES: Final = (
    "MONSOON-TEES",
    "INSTA-REELS",
    "GOOGLE-PMAX",
    "FESTIVE-KURTA",
    "COFFEE-SUBS",
    "SKINCARE-SAVER",
    "RUN-CLUB",
    "META-LOOKALIKE",
    "YT-SHORTS",
    "APP-INSTALLS",
    "EOSS-SALE",
    "GIFTING",
)

# The scripted first minute (scenario=True).
HOT_SKU: Final = "SERUM-VITC-30"
HOT_LOCATION: Final = "BLR-DS-4"
SPIKE_SKU: Final = "KURTA-IND-L"

# Returns stay below this share of the units picked (the return_spike ratio is 0.2).
RETURN_SHARE: Final = 0.08



def sku_keys(n: int) -> list[str]:
    """`n` SKU keys from the catalog (with a batch suffix beyond it); the scripted two first."""
    base = [f"{p}-{v}" for p, vs in CATALOG for v in vs]
    first = [HOT_SKU, SPIKE_SKU]
    base = first + [k for k in base if k not in first]
    out = base[:n]
    batch = 2
    while len(out) < n:
        out.extend(f"{k}-B{batch}" for k in base[: n - len(out)])
        batch += 1
    return out
