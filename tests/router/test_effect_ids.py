"""Effect ids name the event that caused them: the builders and the parser recovery uses after a restart (pure, fast)."""

from __future__ import annotations

from contracts.exceptions import dead_letter_id, effect_cause, exception_id, message_id, timer_cause


def test_effect_ids_name_their_cause() -> None:
    assert effect_cause("dead:17") == 17
    assert effect_cause("sku:A:stockout:BLR-DS-4:raised:42") == 42
    assert effect_cause("campaign:C:cpa_exceeded::cleared:7") == 7
    assert effect_cause("shipment:S:sla_breached::raised:t1795000000000") is None  # a timer
    assert effect_cause("msg:sku:A:42:sku_out_of_stock:campaign:C") == 42
    assert effect_cause("msg:shipment:S:t17:x:y:z") is None
    assert effect_cause("p-1") is None


def test_the_parser_reads_the_ids_the_builders_write() -> None:
    assert effect_cause(dead_letter_id(17)) == 17
    assert effect_cause(exception_id("sku", "A", "stockout", "BLR-DS-4", "raised", "42")) == 42
    assert effect_cause(exception_id("shipment", "S", "stalled", None, "raised", timer_cause(1_795_000_000_123))) is None
    assert effect_cause(message_id("sku", "A", "42", "sku_out_of_stock", "campaign", "C")) == 42
    assert message_id("sku", "A", "42", "sku_out_of_stock", "campaign", "C") == "msg:sku:A:42:sku_out_of_stock:campaign:C"
