"""Effect ids name the event that caused them: the parser recovery uses after a restart (pure, fast)."""

from __future__ import annotations

from router.jetstream.recovery import effect_cause


def test_effect_ids_name_their_cause() -> None:
    assert effect_cause("dead:17") == 17
    assert effect_cause("sku:A:stockout:BLR-DS-4:raised:42") == 42
    assert effect_cause("campaign:C:cpa_exceeded::cleared:7") == 7
    assert effect_cause("shipment:S:sla_breached::raised:t1795000000000") is None  # a timer
    assert effect_cause("msg:sku:A:42:sku_out_of_stock:campaign:C") == 42
    assert effect_cause("msg:shipment:S:t17:x:y:z") is None
    assert effect_cause("p-1") is None
