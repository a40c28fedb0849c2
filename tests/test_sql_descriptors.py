"""The journaled SQL batch descriptor: typed, and byte for byte the JSON the code before
the typed descriptor wrote, so open runs it journaled still settle.

Every string below was produced by that code's ``encode_range`` (and, for the settled
archive batch, its ``json.dumps({**descriptor, "objects": objects}, sort_keys=True)``)
and is copied here literally: never regenerate them with the code under test.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal

import pytest

from retention.targets.sql.descriptors import BatchDescriptor, BatchRange

DELETE = ('{"holds": [7, 9], "lower": [{"datetime": "2023-05-01T12:30:00.250000"}, 41], '
          '"tables": {"customer_notes": 3, "customers": 40}, '
          '"upper": [{"datetime": "2023-05-02T08:00:00+00:00"}, 97]}')

ONE_PASS_PENDING = ('{"holds": [], "lower": null, "planned": [["cat/r1/orders/b3/order_items.jsonl.gz", '
                    '"order_items"], ["cat/r1/orders/b3/orders.jsonl.gz", "orders"]], '
                    '"upper": [{"date": "2024-01-31"}]}')

ARCHIVE_DONE = (
    '{"holds": [], "lower": [{"date": "2024-01-01"}, {"decimal": "10.50"}], "objects": [{"bytes": 345, '
    '"columns": [["id", "int"], ["placed_at", "datetime"]], "depth": 0, "format": "jsonl.gz", '
    '"key": "cat/r1/orders/b3/orders.jsonl.gz", "rows": 12, '
    '"sha256": "abababababababababababababababababababababababababababababababab", '
    '"storage_class": "STANDARD", "table": "orders"}, {"bytes": 512, "columns": [["id", "int"]], "depth": 1, '
    '"format": "jsonl.gz", "key": "cat/r1/orders/b3/order_items.jsonl.gz", "rows": 24, '
    '"sha256": "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd", "sse": "aws:kms", '
    '"storage_class": "STANDARD", "table": "order_items"}], "tables": {"order_items": 24, "orders": 12}, '
    '"upper": null}'
)

TWO_PHASE_PENDING = ('{"holds": [3], "lower": [{"datetime": "2022-03-04T05:06:07"}, 10], '
                     '"planned": [["cat/r1/orders/b2/orders.parquet", "orders"]], "tables": {"orders": 5}, '
                     '"upper": [{"datetime": "2022-03-04T09:00:00"}, 55]}')

TWO_PHASE_SETTLED = (
    '{"holds": [3], "lower": [{"datetime": "2022-03-04T05:06:07"}, 10], "objects": [{"bytes": 900, '
    '"columns": [["id", "int"]], "depth": 0, "format": "parquet", "key": "cat/r1/orders/b2/orders.parquet", '
    '"rows": 5, "sha256": "efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef", '
    '"storage_class": "GLACIER_IR", "table": "orders"}], '
    '"planned": [["cat/r1/orders/b2/orders.parquet", "orders"]], "tables": {"orders": 5}, '
    '"upper": [{"datetime": "2022-03-04T09:00:00"}, 55]}'
)

# Journaled before holds and row counts were recorded, with every tagged value type.
OLD_EVERY_TYPE = ('{"lower": [{"uuid": "12345678-1234-5678-1234-567812345678"}, {"bytes": "AP9rZXk="}, "text", '
                  '1.5, true, null], "upper": [{"str": "odd-value"}]}')


def test_a_delete_batch_decodes_to_its_typed_range_rows_and_holds():
    descriptor = BatchDescriptor.decode(DELETE)

    assert descriptor.span == BatchRange((datetime(2023, 5, 1, 12, 30, 0, 250000), 41),
                                         (datetime(2023, 5, 2, 8, 0, tzinfo=timezone.utc), 97))
    assert descriptor.tables == {"customers": 40, "customer_notes": 3}
    assert descriptor.holds == (7, 9)
    assert descriptor.planned is None and descriptor.objects is None
    assert descriptor.archived_objects() == [] and descriptor.planned_keys() == []


def test_an_archive_batch_pending_before_its_count_has_planned_keys_and_no_tables():
    descriptor = BatchDescriptor.decode(ONE_PASS_PENDING)

    assert descriptor.span == BatchRange(None, (date(2024, 1, 31),))
    assert descriptor.tables is None and descriptor.holds == ()
    assert descriptor.planned == (("cat/r1/orders/b3/order_items.jsonl.gz", "order_items"),
                                  ("cat/r1/orders/b3/orders.jsonl.gz", "orders"))
    assert descriptor.planned_keys() == ["cat/r1/orders/b3/order_items.jsonl.gz", "cat/r1/orders/b3/orders.jsonl.gz"]


def test_a_done_archive_batch_lists_its_objects_as_recorded():
    descriptor = BatchDescriptor.decode(ARCHIVE_DONE)

    assert descriptor.span.lower == (date(2024, 1, 1), Decimal("10.50"))
    objects = descriptor.archived_objects()
    assert [o["key"] for o in objects] == ["cat/r1/orders/b3/orders.jsonl.gz", "cat/r1/orders/b3/order_items.jsonl.gz"]
    assert objects[1]["sse"] == "aws:kms" and "sse" not in objects[0]  # as recorded, nothing added
    assert objects[0]["columns"] == [["id", "int"], ["placed_at", "datetime"]]


def test_old_descriptors_decode_every_tagged_value():
    descriptor = BatchDescriptor.decode(OLD_EVERY_TYPE)

    assert descriptor.span.lower == (uuid.UUID("12345678-1234-5678-1234-567812345678"), b"\x00\xffkey", "text", 1.5,
                                     True, None)
    assert descriptor.span.upper == ("odd-value",)
    assert descriptor.holds is None and descriptor.tables is None  # absent, not empty


@pytest.mark.parametrize("text", [DELETE, ONE_PASS_PENDING, ARCHIVE_DONE, TWO_PHASE_PENDING, TWO_PHASE_SETTLED,
                                  OLD_EVERY_TYPE])
def test_a_descriptor_read_back_and_written_again_keeps_its_bytes(text):
    assert BatchDescriptor.decode(text).encode() == text


def test_the_actions_descriptors_encode_as_before():
    span = BatchRange((datetime(2023, 5, 1, 12, 30, 0, 250000), 41), (datetime(2023, 5, 2, 8, 0, tzinfo=timezone.utc), 97))
    assert BatchDescriptor(span, tables={"customers": 40, "customer_notes": 3}, holds=(7, 9)).encode() == DELETE

    planned = (("cat/r1/orders/b3/order_items.jsonl.gz", "order_items"), ("cat/r1/orders/b3/orders.jsonl.gz", "orders"))
    assert BatchDescriptor(BatchRange(None, (date(2024, 1, 31),)), planned=planned, holds=()).encode() == ONE_PASS_PENDING

    pending = BatchDescriptor(BatchRange((datetime(2022, 3, 4, 5, 6, 7), 10), (datetime(2022, 3, 4, 9, 0), 55)),
                              tables={"orders": 5}, planned=(("cat/r1/orders/b2/orders.parquet", "orders"),), holds=(3,))
    assert pending.encode() == TWO_PHASE_PENDING
    settled_objects = BatchDescriptor.decode(TWO_PHASE_SETTLED).archived_objects()
    assert dataclasses.replace(pending, objects=tuple(settled_objects)).encode() == TWO_PHASE_SETTLED


def test_a_field_no_version_wrote_is_refused_not_dropped():
    with pytest.raises(ValueError, match="unknown field 'rows'"):
        BatchDescriptor.decode('{"lower": null, "rows": 3, "upper": null}')
